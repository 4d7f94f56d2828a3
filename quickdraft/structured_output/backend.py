"""What a grammar backend offers the engine: a compiler (once per distinct constraint) and, per
sequence, a matcher that follows the tokens emitted so far."""

from __future__ import annotations

import json
from typing import Any, Iterator, Protocol

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


# An integer the schema leaves unbounded is read as |x| <= 2**53 - 1, the range JSON numbers
# hold exactly everywhere (RFC 7493's I-JSON; 16 digits, as llama.cpp's JSON grammars allow).
# Unbounded, a small model that does not know a number writes digits until max_tokens (seen
# with SmolLM2: "population": 1111111111...).
MAX_JSON_INTEGER = 2**53 - 1
# Keywords whose values are subschemas, maps of them, or lists of them. ("not" is left out on
# purpose: bounds added under it would reverse their meaning.)
_SCHEMA_KEYS = frozenset({"items", "additionalItems", "additionalProperties", "contains", "propertyNames", "if",
                          "then", "else", "unevaluatedItems", "unevaluatedProperties"})
_SCHEMA_MAP_KEYS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_SCHEMA_LIST_KEYS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})


def schema_of(params: StructuredOutputsParams) -> dict | bool:
    """The JSON schema of a ``json`` constraint as an object (a copy): integers bounded where the
    schema is silent (MAX_JSON_INTEGER), additionalProperties closed where the schema is silent
    if ``disable_additional_properties``."""
    schema = json.loads(params.json if isinstance(params.json, str) else json.dumps(params.json))
    if isinstance(schema, dict):
        _bound_integers(schema)
        if params.disable_additional_properties:
            _closed(schema)
    return schema


def _bound_integers(schema: dict) -> None:
    """In place: every integer-typed subschema without a lower (upper) bound gets minimum
    -MAX_JSON_INTEGER (maximum MAX_JSON_INTEGER)."""
    for node in _subschemas(schema):
        types = node.get("type")
        types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
        if "integer" in types and "number" not in types:
            if "minimum" not in node and "exclusiveMinimum" not in node:
                node["minimum"] = -MAX_JSON_INTEGER
            if "maximum" not in node and "exclusiveMaximum" not in node:
                node["maximum"] = MAX_JSON_INTEGER


def _closed(schema: dict) -> None:
    """In place: objects without additionalProperties get additionalProperties false."""
    for node in _subschemas(schema):
        if node.get("type") == "object" or "properties" in node:
            node.setdefault("additionalProperties", False)


def _subschemas(node: Any) -> Iterator[dict]:
    """Every subschema of a schema by its keywords, the schema first (property names, enum and
    const values and defaults are data, not schemas); each is yielded before its own
    subschemas are visited, so it may be changed then."""
    if not isinstance(node, dict):
        return
    yield node
    for key, value in list(node.items()):
        if key in _SCHEMA_KEYS:
            children = value if isinstance(value, list) else [value]  # items may be a list (draft 4)
        elif key in _SCHEMA_MAP_KEYS and isinstance(value, dict):
            children = list(value.values())
        elif key in _SCHEMA_LIST_KEYS and isinstance(value, list):
            children = value
        else:
            continue
        for child in children:
            yield from _subschemas(child)
