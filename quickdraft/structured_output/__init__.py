"""Structured outputs: grammars (JSON schema, regex, choice, EBNF/Lark) that constrain what a
request may generate, exact under speculative decoding (see manager.py)."""

from quickdraft.structured_output.backend import Grammar, StructuredOutputBackend
from quickdraft.structured_output.manager import StructuredOutputManager

__all__ = ["Grammar", "StructuredOutputBackend", "StructuredOutputManager"]
