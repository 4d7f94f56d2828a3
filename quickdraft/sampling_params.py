"""SamplingParams: vLLM's per-request generation settings, validated once at construction."""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field
from typing import Any

_GREEDY_EPS = 1e-5
# Above this, logits / temperature is uniform sampling for any practical purpose; the bound keeps
# every temperature finite in float32 (3.5e38 would turn into inf and every logit into NaN).
MAX_TEMPERATURE = 1e4
MAX_SEED = 2**64 - 1
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values: [-100, 100]


STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "grammar", "json_object")
# JSON outputs: between two JSON tokens, by default, nothing, one space, or a newline and at
# most this many spaces or tabs of indentation (llama.cpp's JSON grammars' rule). Enough to
# pretty-print nested objects; a small model can no longer write whitespace until max_tokens.
DEFAULT_MAX_INDENT = 20


@dataclass
class StructuredOutputsParams:
    """A constraint on the text a request generates (vLLM's ``StructuredOutputsParams``):
    exactly one of ``json`` (a JSON schema, as a dict or its text), ``regex`` (the whole output
    must match it), ``choice`` (the output is one of these strings), ``grammar`` (EBNF or Lark)
    or ``json_object=True`` (any JSON object). ``disable_any_whitespace`` makes JSON compact
    (no whitespace between tokens); otherwise the whitespace between two JSON tokens is
    nothing, one space, or a newline and at most ``max_indent`` spaces or tabs (default 20, as
    llama.cpp's JSON grammars allow), or with ``max_indent=None`` any whitespace of any length
    (vLLM's default, in which a small model can write whitespace until max_tokens);
    ``disable_additional_properties`` treats a schema's objects as closed where it does not
    say otherwise."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    max_indent: int | None = DEFAULT_MAX_INDENT

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one constraint of json, regex, choice, grammar "
                             f"and json_object, got {', '.join(given) if given else 'none'}.")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = json.loads(self.json)
                except ValueError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}.") from None
            else:
                schema = self.json
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"structured_outputs.json must be a JSON schema (an object), got {self.json!r}.")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError(f"structured_outputs.regex must be a non-empty string, got {self.regex!r}.")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError(f"structured_outputs.grammar must be a non-empty string, got {self.grammar!r}.")
        if self.choice is not None:
            if isinstance(self.choice, str) or not self.choice:
                raise ValueError(f"structured_outputs.choice must be a non-empty list of strings, got {self.choice!r}.")
            self.choice = list(self.choice)
            bad = [c for c in self.choice if not isinstance(c, str) or not c]
            if bad:
                raise ValueError(f"structured_outputs.choice must hold non-empty strings, got {bad[0]!r}.")
        if self.max_indent is not None and (not _is_int(self.max_indent) or self.max_indent < 0):
            raise ValueError(f"structured_outputs.max_indent must be an integer >= 0, or None (any whitespace), "
                             f"got {self.max_indent!r}.")
        if self.json_object not in (None, True, False):
            raise ValueError(f"structured_outputs.json_object must be a boolean, got {self.json_object!r}.")

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[Any, ...]:
        """What identifies the compiled grammar (the compile cache's key)."""
        spec = getattr(self, self.kind)
        if isinstance(spec, dict):
            spec = json.dumps(spec, sort_keys=True)
        elif isinstance(spec, list):
            spec = tuple(spec)
        return (self.kind, spec, self.disable_any_whitespace, self.disable_additional_properties, self.max_indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StructuredOutputsParams":
        """From a request's ``structured_outputs`` object; unknown keys name themselves."""
        if not isinstance(d, dict):
            raise ValueError(f"structured_outputs must be an object, got {d!r}.")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"structured_outputs has unknown field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}.")
        return cls(**d)


@dataclass
class SamplingParams:
    """How to generate for one prompt. Field names, defaults and meanings follow vLLM.

    ``temperature=0`` is greedy decoding. ``top_k`` of 0 or -1 disables top-k. ``logprobs=N``
    returns, for each generated token, the N most likely tokens plus the sampled one, with
    log-probabilities of the model's raw distribution (as vLLM does by default).
    ``seed`` (0 .. 2**64 - 1) fixes the request's randomness: the same seed gives the same text
    whatever else is batched and with or without speculative decoding (see sample/noise.py).
    ``logit_bias`` ({token id: bias}) is added to the logits; ``allowed_token_ids`` restricts
    sampling to those tokens; ``bad_words`` are never generated (their last token is banned
    wherever the output ends with the rest of the word); ``truncate_prompt_tokens=N`` keeps
    only the last N prompt tokens. ``structured_outputs`` constrains the text to a JSON schema, a
    regex, a choice or a grammar (StructuredOutputsParams; a dict of its fields also works).
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # Derived at validation time; not part of the constructor.
    output_text_buffer_length: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        for name in ("n", "top_k", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
                     "truncate_prompt_tokens"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _as_int(value, name))
        self.stop_token_ids = [] if self.stop_token_ids is None else _token_ids(self.stop_token_ids, "stop_token_ids")
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            self.logit_bias = _int_keyed(self.logit_bias)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _token_ids(self.allowed_token_ids, "allowed_token_ids")
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        elif self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams (or a dict of its fields), "
                             f"got {self.structured_outputs!r}.")
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        elif self.bad_words is not None:
            self.bad_words = list(self.bad_words)
        self._verify()
        if self.stop and not self.include_stop_str_in_output:
            # Hold back enough characters that a stop string split across steps is never shown.
            self.output_text_buffer_length = max(len(s) for s in self.stop) - 1

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def _verify(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not (_is_number(self.repetition_penalty) and 0.0 < self.repetition_penalty < math.inf):
            raise ValueError(f"repetition_penalty must be a finite number greater than zero, "
                             f"got {self.repetition_penalty}.")
        if not _is_number(self.temperature) or self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be at most {MAX_TEMPERATURE:g}, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}."
            )
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be non-negative, got {self.logprobs}.")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs must be non-negative, got {self.prompt_logprobs}.")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be an integer in [0, 2**64 - 1], got {self.seed!r}.")
        if any(s == "" for s in self.stop):
            raise ValueError("stop cannot contain an empty string.")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative, got {self.stop_token_ids}.")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings are only supported when detokenize is True. Set detokenize=True to use stop.")
        if self.greedy and self.n > 1:
            raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")
        self._verify_token_options()

    def _verify_token_options(self) -> None:
        for token, bias in (self.logit_bias or {}).items():
            if token < 0:
                raise ValueError(f"logit_bias token ids must be non-negative, got {token}.")
            if not _is_number(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {bias!r} for token {token}.")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty (None allows every token).")
            bad = [t for t in self.allowed_token_ids if not _is_int(t) or t < 0]
            if bad:
                raise ValueError(f"allowed_token_ids must be non-negative integers, got {bad[0]!r}.")
        for word in self.bad_words or []:
            if not isinstance(word, str) or not word.strip():
                raise ValueError(f"bad_words must be non-empty strings, got {word!r}.")
        t = self.truncate_prompt_tokens
        if t is not None and (not _is_int(t) or t < 1):
            raise ValueError(f"truncate_prompt_tokens must be >= 1, got {t!r}.")


def _as_int(value: object, name: str) -> int:
    """An integer setting as a Python int: ints and integer types such as numpy's are taken,
    bools, floats (8.5, and 8.0 too) and strings are refused with a message naming ``name``."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise ValueError(f"{name} must be an integer, got {value!r}.")


def _token_ids(values: object, name: str) -> list[int]:
    """A list of token ids as Python ints (numpy integers welcome)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a list of token ids, got {values!r}.")
    out = []
    for v in values:
        try:
            out.append(_as_int(v, name))
        except ValueError:
            raise ValueError(f"{name} must be a list of integer token ids, got {v!r} in it.") from None
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _int_keyed(bias: object) -> dict[int, float]:
    """logit_bias with int keys; JSON gives token ids as strings ("50256": -100)."""
    if not hasattr(bias, "items"):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {bias!r}.")
    out = {}
    for key, value in bias.items():
        if isinstance(key, str):  # JSON's keys
            try:
                token = int(key)
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}.") from None
        else:
            try:
                token = _as_int(key, "logit_bias keys")
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}.") from None
        out[token] = float(value) if _is_number(value) else value
    return out
