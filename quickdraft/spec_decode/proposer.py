"""The proposer interface, and the n-gram (prompt lookup) and suffix-decoding proposers."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from quickdraft.engine.sequence import Sequence as Seq
from quickdraft.sample.noise import NoiseCache
from quickdraft.spec_decode.ngram import find_ngram_draft
from quickdraft.spec_decode.suffix import SuffixCache


@dataclass
class Draft:
    token_ids: list[int]  # k' <= k drafted tokens (possibly none)
    probs: torch.Tensor | None  # [k', vocab] draft law q per token; None = a point mass given the noise
    source: str | None = None  # suffix decoding: "request" or "global", the trie that supplied it
    confidence: list[float] | None = None  # suffix decoding: P(first i + 1 tokens accepted), its estimate


class Proposer(Protocol):
    # Whether drafts carry ``confidence``: their length is then chosen per draft from it
    # (engine ``_propose``), not from the sequence's acceptance history.
    drafts_know_odds: bool

    def propose(self, seqs: Sequence[Seq], max_tokens: Sequence[int], noise: NoiseCache,
                after: Sequence[list[int]] | None = None) -> list[Draft]:
        """Draft up to max_tokens[i] tokens to follow seqs[i].token_ids + after[i] (``after``:
        tokens already drafted for it, a grammar's forced ones; not part of the returned draft);
        ``noise`` holds the step's per-position randomness (see sample/noise.py)."""
        ...

    def finish(self, seq: Seq) -> None:
        """The sequence finished or was aborted (proposers that learn from outputs keep them)."""
        ...


class NgramProposer:
    drafts_know_odds = False

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seqs: Sequence[Seq], max_tokens: Sequence[int], noise: NoiseCache | None = None,
                after: Sequence[list[int]] | None = None) -> list[Draft]:
        after = after or [[] for _ in seqs]
        return [Draft(find_ngram_draft(s.token_ids + a if a else s.token_ids, self.min_n, self.max_n, k)
                      if k > 0 else [], None) for s, k, a in zip(seqs, max_tokens, after)]

    def finish(self, seq: Seq) -> None:
        pass


class SuffixProposer:
    """Suffix decoding (suffix.py) over the engine's sequences. The tries catch up with a
    sequence's new tokens when it next drafts or finishes; ``seconds`` measures what updating
    and drafting cost."""

    drafts_know_odds = True

    def __init__(self, cache: SuffixCache) -> None:
        self.cache = cache
        self.seconds = 0.0

    def propose(self, seqs: Sequence[Seq], max_tokens: Sequence[int], noise: NoiseCache | None = None,
                after: Sequence[list[int]] | None = None) -> list[Draft]:
        t0 = time.perf_counter()
        out = []
        for s, k, a in zip(seqs, max_tokens, after or [[] for _ in seqs]):
            self.cache.update(s.seq_id, s.token_ids, s.num_prompt_tokens)
            d = self.cache.speculate(s.seq_id, s.token_ids, k, a) if k > 0 else None
            out.append(Draft(d.token_ids, None, d.source, d.probs) if d and d.token_ids else Draft([], None))
        self.seconds += time.perf_counter() - t0
        return out

    def finish(self, seq: Seq) -> None:
        t0 = time.perf_counter()
        self.cache.finish(seq.seq_id, seq.token_ids, seq.num_prompt_tokens)
        self.seconds += time.perf_counter() - t0


class GrammarProposer:
    """method="grammar": no drafts of its own; the engine drafts the tokens a request's grammar
    forces (structured outputs) and nothing else."""

    drafts_know_odds = False

    def propose(self, seqs: Sequence[Seq], max_tokens: Sequence[int], noise: NoiseCache | None = None,
                after: Sequence[list[int]] | None = None) -> list[Draft]:
        return [Draft([], None) for _ in seqs]

    def finish(self, seq: Seq) -> None:
        pass
