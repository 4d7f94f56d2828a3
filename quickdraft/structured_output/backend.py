"""What a grammar backend offers the engine: a compiler (once per distinct constraint) and, per
sequence, a matcher that follows the tokens emitted so far."""

from __future__ import annotations

import json
from typing import Any, Protocol

import torch

from quickdraft.sampling_params import StructuredOutputsParams


class Grammar(Protocol):
    """One sequence's position in its grammar. Token-level; never sees text."""

    def accept_tokens(self, tokens: list[int]) -> bool:
        """Advance through ``tokens``; False (and the state undefined) if one is not allowed."""
        ...

    def validate_tokens(self, tokens: list[int]) -> int:
        """How many of ``tokens`` (a prefix) the grammar allows from here; the state is unchanged."""
        ...

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens."""
        ...

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """bitmask[row] ([ceil(V / 32)] int32, CPU): bit t set iff token t may come next."""
        ...

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar alone determines from here (its forced continuation, tokenised;
        may be empty). The state is unchanged."""
        ...

    def is_terminated(self) -> bool:
        """The grammar has ended (its stop token was accepted): nothing may follow."""
        ...


class StructuredOutputBackend(Protocol):
    name: str

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar; ValueError naming the problem if the constraint does not compile."""
        ...

    def new_grammar(self, compiled: Any) -> Grammar:
        ...


def choice_alternatives(choices: list[str]) -> str:
    """``"a" | "b" | ...``: the choices as string literals of an EBNF or Lark rule (JSON escapes,
    which both grammar formats read)."""
    return " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def schema_of(params: StructuredOutputsParams) -> dict | bool:
    """The JSON schema of a ``json`` constraint as an object, additionalProperties closed where
    the schema is silent if ``disable_additional_properties``."""
    schema = json.loads(params.json) if isinstance(params.json, str) else params.json
    if params.disable_additional_properties and isinstance(schema, dict):
        schema = _closed(json.loads(json.dumps(schema)))
    return schema


def _closed(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            node.setdefault("additionalProperties", False)
        for v in node.values():
            _closed(v)
    elif isinstance(node, list):
        for v in node:
            _closed(v)
    return node
