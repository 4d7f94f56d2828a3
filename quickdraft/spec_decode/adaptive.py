"""Adaptive draft length: how many tokens to draft for a sequence, from its recent acceptance
and the batch size. Any choice keeps outputs exact (greedy stays token-identical, sampling
keeps the target law); it only decides how much verification work is spent on drafts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DraftLengthPolicy:
    max_k: int
    probe_interval: int = 4  # steps without drafting before trying one token again
    rows_budget: int = 128  # verification rows per step (sum of k_i + 1) worth spending on drafts

    def update(self, k: int, drafted: int, accepted: int) -> int:
        """Next draft length after a verification of ``drafted`` tokens, ``accepted`` of them
        accepted: double after a full hit, halve after a full miss, else one past the hit."""
        if drafted == 0:
            return k
        if accepted == drafted:
            return min(self.max_k, max(1, 2 * drafted, k))
        if accepted == 0:
            return drafted // 2
        return min(self.max_k, accepted + 1)

    def for_batch(self, k: int, batch_size: int) -> int:
        """Cap k so that a large batch does not spend its step verifying drafts."""
        return max(0, min(k, self.rows_budget // max(batch_size, 1) - 1))
