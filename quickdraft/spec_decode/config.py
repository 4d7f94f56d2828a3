"""SpeculativeConfig: vLLM's `speculative_config` keys and rules, validated once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "suffix", "draft_model", "grammar")
SUFFIX_KEYS = ("suffix_decoding_max_tree_depth", "suffix_decoding_max_cached_requests",
               "suffix_decoding_max_spec_factor", "suffix_decoding_min_token_prob")
REJECTION_SAMPLE_METHODS = ("coupled", "standard")
DRAFT_LENGTH_POLICIES = ("adaptive", "fixed")
DEFAULT_REJECTION_SAMPLE_METHOD = "coupled"  # chosen from benchmarks/coupling.py's figures (README)


@dataclass(frozen=True)
class SpeculativeConfig:
    """How to draft tokens for verification by the target model.

    method: "ngram" (prompt lookup), "suffix" (suffix decoding: suffix tries of this request's
        text and of earlier requests' outputs, spec_decode/suffix.py), "draft_model" (inferred
        when ``model`` is given) or "grammar" (only the tokens a request's structured-output
        grammar forces; the other methods draft those too, followed by their own draft).
    num_speculative_tokens: k >= 1, the most tokens drafted per step (16-32 is typical for suffix,
        whose drafts stop where its tries lose confidence).
    prompt_lookup_min / prompt_lookup_max: n-gram lengths searched (ngram); both unset means 5
        and 5, one set means the other copies it.
    model: the draft model for draft_model, with the target's vocabulary: an HF folder, a GGUF
        file, or a Hugging Face id (ORG/NAME, ORG/NAME:QUANT), as LLM(model=...).
    revision: the draft's hub revision (branch, tag or commit) when ``model`` is a hub id.
    draft_dtype: the draft model's dtype (default: the target's).
    quantization: how the draft's weights are held, as ``LLM(quantization=...)``: "auto" (the
        default: a GGUF draft runs as stored where the native integer kernels run), "gguf",
        "q8_0", "q4_0", or None / "none" (dequantized to draft_dtype).
    suffix_decoding_max_tree_depth: the longest string the suffix tries hold (24): match plus
        draft length; an integer >= 2.
    suffix_decoding_max_cached_requests: finished requests whose outputs the global trie keeps,
        the oldest evicted first (10000); 0 turns the global trie off.
    suffix_decoding_max_spec_factor: a draft is at most this times the matched length (1.0), > 0.
    suffix_decoding_min_token_prob: drafting stops where the draft's cumulative empirical
        probability falls below this (0.1), in [0, 1].
    disable_by_batch_size: no drafting while at least this many sequences are running.
    num_speculative_tokens_per_batch_size: vLLM's map from batch-size ranges to draft lengths,
        e.g. ``{"1-16": 5, "17-64": 2, "65-1024": 0}`` ("N" alone is the range N-N); ranges must
        not overlap, values are 0..num_speculative_tokens; batch sizes outside every range draft
        up to num_speculative_tokens. Every method; the adaptive policy works within it.
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
    suffix_decoding_max_tree_depth: int = 24
    suffix_decoding_max_cached_requests: int = 10000
    suffix_decoding_max_spec_factor: float = 1.0
    suffix_decoding_min_token_prob: float = 0.1
    # Given as a dict; held parsed, as sorted (lo, hi, k) ranges.
    num_speculative_tokens_per_batch_size: Mapping[str, int] | tuple[tuple[int, int, int], ...] | None = None

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
        if method != "draft_model" and (self.model is not None or self.revision is not None):
            raise ValueError("speculative_config 'model' and 'revision' are only used with method='draft_model'.")
        if method != "suffix":
            set_keys = [f.name for f in fields(self) if f.name in SUFFIX_KEYS and getattr(self, f.name) != f.default]
            if set_keys:
                raise ValueError(f"{set_keys} only apply to method='suffix' (method is {method!r}).")
        if method == "suffix":
            self._check_suffix_keys()
            if self.prompt_lookup_min is not None or self.prompt_lookup_max is not None:
                raise ValueError("prompt_lookup_min/prompt_lookup_max only apply to method='ngram'.")
        elif method == "ngram":
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
        elif method == "grammar":
            if self.prompt_lookup_min is not None or self.prompt_lookup_max is not None:
                raise ValueError("prompt_lookup_min/prompt_lookup_max only apply to method='ngram'.")
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
        elif method != "draft_model" and rsm != "coupled":
            raise ValueError(f"rejection_sample_method='standard' applies to method='draft_model'; {method} drafts are "
                             "point masses, always verified by sample-and-match ('coupled').")
        object.__setattr__(self, "rejection_sample_method", rsm)
        if self.draft_length_policy not in DRAFT_LENGTH_POLICIES:
            raise ValueError(f"draft_length_policy must be one of {list(DRAFT_LENGTH_POLICIES)}, "
                             f"got {self.draft_length_policy!r}.")
        b = self.disable_by_batch_size
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
            raise ValueError(f"disable_by_batch_size must be a positive integer, got {b!r}.")
        if self.num_speculative_tokens_per_batch_size is not None:
            object.__setattr__(self, "num_speculative_tokens_per_batch_size",
                               parse_batch_size_map(self.num_speculative_tokens_per_batch_size, k))

    def _check_suffix_keys(self) -> None:
        depth = self.suffix_decoding_max_tree_depth
        if not _is_int(depth) or depth < 2:
            raise ValueError(f"suffix_decoding_max_tree_depth must be an integer >= 2, got {depth!r}.")
        cached = self.suffix_decoding_max_cached_requests
        if not _is_int(cached) or cached < 0:
            raise ValueError(f"suffix_decoding_max_cached_requests must be an integer >= 0 (0 turns the global "
                             f"tree off), got {cached!r}.")
        factor = self.suffix_decoding_max_spec_factor
        if not _is_number(factor) or not factor > 0:
            raise ValueError(f"suffix_decoding_max_spec_factor must be a number > 0, got {factor!r}.")
        prob = self.suffix_decoding_min_token_prob
        if not _is_number(prob) or not 0.0 <= prob <= 1.0:
            raise ValueError(f"suffix_decoding_min_token_prob must be a number in [0, 1], got {prob!r}.")

    def draft_length_for_batch(self, batch_size: int) -> int:
        """The most tokens to draft per sequence while ``batch_size`` sequences run: from
        num_speculative_tokens_per_batch_size, then disable_by_batch_size."""
        if self.disable_by_batch_size is not None and batch_size >= self.disable_by_batch_size:
            return 0
        for lo, hi, k in self.num_speculative_tokens_per_batch_size or ():
            if lo <= batch_size <= hi:
                return k
        return self.num_speculative_tokens

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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_batch_size_map(value: Any, max_k: int) -> tuple[tuple[int, int, int], ...]:
    """vLLM's ``num_speculative_tokens_per_batch_size`` ({"1-16": 5, "17-64": 2, "65": 0}) as
    sorted (lo, hi, k) ranges; a tuple of such ranges (already parsed) passes through."""
    name = "num_speculative_tokens_per_batch_size"
    if isinstance(value, tuple):
        items = [(f"{lo}-{hi}", k) for lo, hi, k in value]
    elif isinstance(value, Mapping):
        items = list(value.items())
    else:
        raise ValueError(f"{name} must be a dict like {{\"1-16\": 5, \"17-64\": 2}}, got {value!r}.")
    ranges = []
    for key, k in items:
        parts = str(key).split("-")
        try:
            lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, -1)
        except ValueError:
            lo, hi = 0, -1
        if not 1 <= lo <= hi:
            raise ValueError(f"{name}: batch-size range {key!r} must be 'LO-HI' with 1 <= LO <= HI, or 'N'.")
        if not _is_int(k) or not 0 <= k <= max_k:
            raise ValueError(f"{name}[{key!r}] must be an integer in [0, num_speculative_tokens={max_k}], "
                             f"got {k!r}.")
        ranges.append((lo, hi, k))
    ranges.sort()
    for (lo1, hi1, _), (lo2, hi2, _) in zip(ranges, ranges[1:]):
        if lo2 <= hi1:
            raise ValueError(f"{name}: batch-size ranges {lo1}-{hi1} and {lo2}-{hi2} overlap.")
    return tuple(ranges)
