"""The proposer interface and the n-gram (prompt lookup) proposer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from quickdraft.engine.sequence import Sequence as Seq
from quickdraft.sample.noise import NoiseCache
from quickdraft.spec_decode.ngram import find_ngram_draft


@dataclass
class Draft:
    token_ids: list[int]  # k' <= k drafted tokens (possibly none)
    probs: torch.Tensor | None  # [k', vocab] draft law q per token; None = a point mass given the noise


class Proposer(Protocol):
    def propose(self, seqs: Sequence[Seq], max_tokens: Sequence[int], noise: NoiseCache) -> list[Draft]:
        """Draft up to max_tokens[i] tokens to follow seqs[i].token_ids; ``noise`` holds the
        step's per-position randomness (see sample/noise.py)."""
        ...


class NgramProposer:
    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seqs: Sequence[Seq], max_tokens: Sequence[int], noise: NoiseCache | None = None
                ) -> list[Draft]:
        return [Draft(find_ngram_draft(s.token_ids, self.min_n, self.max_n, k) if k > 0 else [], None)
                for s, k in zip(seqs, max_tokens)]
