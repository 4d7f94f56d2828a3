"""Sequence: one generated continuation of a request, with its tokens, cache and output state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from quickdraft.outputs import Logprob, RequestMetrics
from quickdraft.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """Token state of one continuation. ``token_ids`` is prompt + output; the first
    ``num_computed_tokens`` of them have their keys and values in the KV cache."""

    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # the request's seed (or one the engine drew for it): its noise stream, see sample/noise.py
    arrival_order: int
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    max_output_tokens: int = 0  # max_tokens clipped to the context
    bad_words_token_ids: list[list[int]] = field(default_factory=list)  # SamplingParams.bad_words, tokenized
    # Output state.
    output_text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # Incremental detokenizer offsets into token_ids.
    prefix_offset: int = 0
    read_offset: int = 0
    last_delta_len: int = 0  # characters the last detokenized token added
    num_preemptions: int = 0
    # Speculative decoding: tokens whose keys/values the draft model has cached.
    num_draft_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache when first scheduled
    spec_k: int = -1  # adaptive draft length (-1 = not started)
    spec_idle_steps: int = 0  # steps without drafting while drafts are not worth it
    spec_hits: float = 0.0  # discounted accepted draft tokens (adaptive.py)
    spec_misses: float = 0.0  # discounted rejections
    grammar: Any = None  # structured outputs: its Grammar (structured_output/backend.py), else None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def reads_prefix_cache(self) -> bool:
        """Prompt logprobs need every prompt row computed: such requests write the cache only."""
        return self.params.prompt_logprobs is None


@dataclass
class Request:
    """A prompt and its ``n`` sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    _first_unfinished: int = field(default=0, repr=False)

    @property
    def is_finished(self) -> bool:
        # A finished sequence stays finished: scan on from the first one not known finished,
        # so that checking after every step costs O(1) amortised even with a large n.
        seqs = self.seqs
        while self._first_unfinished < len(seqs) and seqs[self._first_unfinished].is_finished:
            self._first_unfinished += 1
        return self._first_unfinished == len(seqs)
