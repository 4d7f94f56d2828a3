"""Dataset rows in and out of the batch processor: pure functions, testable without Ray.

A row holds ``prompt`` (text), ``messages`` (a chat: a list of {"role", "content"} dicts) or
``prompt_token_ids``, and optionally ``sampling_params`` (a dict of `SamplingParams` fields that
override the processor's). A row that cannot run becomes an output row with ``error`` set, so
one bad row never fails the job.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from quickdraft.outputs import RequestOutput
from quickdraft.sampling_params import SamplingParams
from quickdraft.tokenizer import Tokenizer

# The columns every output row gets, in this order, after its input columns.
OUTPUT_COLUMNS = ("generated_text", "generated_token_ids", "finish_reason", "num_input_tokens",
                  "num_generated_tokens", "num_drafts", "num_draft_tokens", "num_accepted_tokens", "error")
PROMPT_COLUMNS = ("prompt", "messages", "prompt_token_ids")
_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams) if f.init)


@dataclass
class PreparedRow:
    """A row ready for the engine: its text (None for token ids), token ids and parameters."""

    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams


def sampling_params_for(defaults: Mapping[str, Any], overrides: Any) -> SamplingParams:
    """The processor's sampling parameters updated with a row's own. In a dataset whose rows set
    different fields, Arrow stores every field in every row: a None field counts as not given."""
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, Mapping):
        raise ValueError(f"sampling_params must be a dict of SamplingParams fields, got {overrides!r}.")
    merged = {**defaults, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(set(merged) - _SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"Unknown sampling parameter(s) {', '.join(map(repr, unknown))}.")
    params = SamplingParams(**merged)
    if params.n != 1:
        raise ValueError(f"n={params.n}: a row gives one output; repeat the row to sample it several times.")
    return params


def prepare_row(row: Mapping[str, Any], defaults: Mapping[str, Any], tokenizer: Tokenizer) -> PreparedRow:
    """Raise ValueError (or TypeError) naming what is wrong with ``row``."""
    params = sampling_params_for(defaults, row.get("sampling_params"))
    given = [c for c in PROMPT_COLUMNS if row.get(c) is not None]
    if len(given) != 1:
        raise ValueError(f"A row needs exactly one of {', '.join(PROMPT_COLUMNS)}; "
                         f"it has {', '.join(given) if given else 'none'}.")
    value = row[given[0]]
    if given[0] == "prompt":
        if not isinstance(value, str):
            raise ValueError(f"prompt must be a string, got {type(value).__name__}.")
        return PreparedRow(value, tokenizer.encode(value), params)
    if given[0] == "prompt_token_ids":
        if not isinstance(value, Sequence) or isinstance(value, str) or not all(isinstance(t, int) for t in value):
            raise ValueError(f"prompt_token_ids must be a list of ints, got {value!r}.")
        return PreparedRow(None, list(value), params)
    if (not isinstance(value, Sequence) or isinstance(value, str) or not value
            or not all(isinstance(m, Mapping) and "role" in m for m in value)):
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts.")
    text = tokenizer.apply_chat_template([dict(m) for m in value], add_generation_prompt=True)
    return PreparedRow(text, tokenizer.encode(text, add_special_tokens=False), params)


def output_columns(out: RequestOutput | None, error: str | None) -> dict[str, Any]:
    """The columns added to a row: its generation, or ``error`` and nulls."""
    if out is None:
        return {**dict.fromkeys(OUTPUT_COLUMNS), "error": error}
    completion, m = out.outputs[0], out.metrics
    return {"generated_text": completion.text, "generated_token_ids": list(completion.token_ids),
            "finish_reason": completion.finish_reason, "num_input_tokens": len(out.prompt_token_ids),
            "num_generated_tokens": len(completion.token_ids),
            "num_drafts": m.num_drafts if m else 0, "num_draft_tokens": m.num_draft_tokens if m else 0,
            "num_accepted_tokens": m.num_accepted_tokens if m else 0, "error": None}
