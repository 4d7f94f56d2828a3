"""SpeculativeConfig: vLLM's `speculative_config` keys and rules, validated once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "draft_model")
REJECTION_SAMPLE_METHODS = ("coupled", "standard")
DRAFT_LENGTH_POLICIES = ("adaptive", "fixed")
DEFAULT_REJECTION_SAMPLE_METHOD = "coupled"  # chosen from benchmarks/coupling.py's figures (README)


@dataclass(frozen=True)
class SpeculativeConfig:
    """How to draft tokens for verification by the target model.

    method: "ngram" (prompt lookup) or "draft_model" (inferred when ``model`` is given).
    num_speculative_tokens: k >= 1, the most tokens drafted per step.
    prompt_lookup_min / prompt_lookup_max: n-gram lengths searched (ngram); both unset means 5
        and 5, one set means the other copies it.
    model: the draft model for draft_model, with the target's vocabulary: an HF folder, a GGUF
        file, or a Hugging Face id (ORG/NAME, ORG/NAME:QUANT), as LLM(model=...).
    revision: the draft's hub revision (branch, tag or commit) when ``model`` is a hub id.
    draft_dtype: the draft model's dtype (default: the target's).
    quantization: how the draft's weights are held, as ``LLM(quantization=...)``: "auto" (the
        default: a GGUF draft runs as stored where the native integer kernels run), "gguf",
        "q8_0", "q4_0", or None / "none" (dequantized to draft_dtype).
    disable_by_batch_size: no drafting while at least this many sequences are running.
    draft_length_policy: "adaptive" (the default: per sequence, from its recent acceptance and
        the verification cost measured at start, never drafting where plain decoding is faster;
        see adaptive.py) or "fixed" (always num_speculative_tokens, as vLLM does).
    rejection_sample_method: how a draft model's sampled drafts are drawn and verified:
        "coupled" (the draft samples with the target's per-position noise and is verified by
        sample-and-match: output identical to plain decoding with the same seed) or "standard"
        (the draft samples with its own noise; Leviathan et al.'s rejection sampler). n-gram
        drafts are point masses and are always verified by sample-and-match.
    """

    num_speculative_tokens: int
    method: str | None = None
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    model: str | None = None
    revision: str | None = None
    draft_dtype: str | None = None
    disable_by_batch_size: int | None = None
    rejection_sample_method: str | None = None
    quantization: str | None = "auto"
    draft_length_policy: str = "adaptive"

    def __post_init__(self) -> None:
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"num_speculative_tokens must be an integer of at least 1, got {k!r}.")
        method = self.method
        if method is None:
            method = "draft_model" if self.model is not None else "ngram"
        if method not in METHODS:
            raise ValueError(f"speculative method must be one of {list(METHODS)}, got {method!r}.")
        object.__setattr__(self, "method", method)
        if method == "ngram":
            if self.model is not None or self.revision is not None:
                raise ValueError("speculative_config 'model' and 'revision' are only used with method='draft_model'.")
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            if lo is None and hi is None:
                lo = hi = 5
            elif lo is None:
                lo = hi
            elif hi is None:
                hi = lo
            for name, v in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ValueError(f"{name} must be an integer of at least 1, got {v!r}.")
            if lo > hi:
                raise ValueError(f"prompt_lookup_min={lo} must be <= prompt_lookup_max={hi}")
            object.__setattr__(self, "prompt_lookup_min", lo)
            object.__setattr__(self, "prompt_lookup_max", hi)
        else:
            if not self.model:
                raise ValueError("speculative_config needs 'model' (the draft model's path) for method='draft_model'.")
            if self.prompt_lookup_min is not None or self.prompt_lookup_max is not None:
                raise ValueError("prompt_lookup_min/prompt_lookup_max only apply to method='ngram'.")
        rsm = self.rejection_sample_method
        if rsm is None:
            rsm = DEFAULT_REJECTION_SAMPLE_METHOD
        elif rsm not in REJECTION_SAMPLE_METHODS:
            raise ValueError(f"rejection_sample_method must be one of {list(REJECTION_SAMPLE_METHODS)}, got {rsm!r}.")
        elif method == "ngram" and rsm != "coupled":
            raise ValueError("rejection_sample_method='standard' applies to method='draft_model'; n-gram drafts are "
                             "point masses, always verified by sample-and-match ('coupled').")
        object.__setattr__(self, "rejection_sample_method", rsm)
        if self.draft_length_policy not in DRAFT_LENGTH_POLICIES:
            raise ValueError(f"draft_length_policy must be one of {list(DRAFT_LENGTH_POLICIES)}, "
                             f"got {self.draft_length_policy!r}.")
        b = self.disable_by_batch_size
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
            raise ValueError(f"disable_by_batch_size must be a positive integer, got {b!r}.")

    @classmethod
    def from_any(cls, value: "SpeculativeConfig | Mapping[str, Any] | None") -> "SpeculativeConfig | None":
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"speculative_config must be a dict or SpeculativeConfig, got {type(value).__name__}.")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(valid))
        if unknown:
            raise ValueError(f"Unknown speculative_config keys {unknown}; valid keys: {valid}.")
        if "num_speculative_tokens" not in value:
            raise ValueError("speculative_config needs 'num_speculative_tokens'.")
        return cls(**dict(value))
