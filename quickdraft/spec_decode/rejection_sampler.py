"""Exact verification of drafted tokens.

Sequence i drafted x_1..x_k (k may be 0); p_1..p_{k+1} are the target's processed laws at those
positions (penalties aware of the drafted prefix). Every emitted token is distributed exactly
as p, by one of two rules, chosen per sequence by whether its draft comes with a law q:

* **Sample-and-match** (no q: n-gram drafts, and the draft model's coupled drafts, which are a
  point mass once the noise is fixed). At each position j the target's own sample
  y_j = argmax(p_j / E_j) is drawn with that position's TARGET noise E_j (Exp(1) per token, an
  exponential race, so y_j ~ p_j); drafts are accepted while y_j == x_j and the first y_j that
  differs is emitted (y_{k+1} after k acceptances). A draft x is thus accepted with probability
  p_j(x), as the rejection sampler accepts a one-hot q, and every emitted token is y_j: the very
  token plain decoding draws at that position with the same noise. Same seed, same text, with or
  without speculation, whatever k was.
* **Standard rejection sampling** (Leviathan et al. 2023; Chen et al. 2023) for drafts x_j ~ q_j:
  accept x_j iff u_j < p_j(x_j) / q_j(x_j) (u_j uniform, ACCEPT stream); at the first rejection
  emit a sample of normalize(max(0, p_j - q_j)) (RESIDUAL stream) and stop; after k acceptances
  emit y_{k+1} (TARGET stream, as plain decoding would).

Greedy sequences accept while x_j equals the target's argmax and then emit the argmax.
The verifier sees flat tensors, token lists and a noise source only, never requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from quickdraft.sample.noise import ACCEPT, RESIDUAL, TARGET
from quickdraft.sample.sampler import argmax_rows


class VerificationNoise(Protocol):
    """The randomness of sequence ``seq`` at draft offset ``offset`` (0 = its next output token)."""

    def exponential(self, seq: int, offset: int, stream: int) -> torch.Tensor:
        """Exp(1) noise [V] float32."""
        ...

    def uniform(self, seq: int, offset: int) -> float:
        """One U[0, 1) draw (the ACCEPT stream)."""
        ...


@dataclass
class RejectionResult:
    emitted: list[list[int]]  # per sequence: accepted drafts followed by one recovered/bonus token
    num_accepted: list[int]  # per sequence: how many drafts were accepted


def race(weights: torch.Tensor, noise: torch.Tensor) -> int:
    """argmax(weights / noise): index v with probability weights[v] / sum(weights) (the
    exponential race; the same arithmetic as plain sampling's, so the same token)."""
    return int(argmax_rows((weights / noise).unsqueeze(0))[0])


def rejection_sample(target_probs: torch.Tensor | None, target_argmax: torch.Tensor,
                     draft_token_ids: list[list[int]], draft_probs: list[torch.Tensor | None],
                     greedy: list[bool], noise: VerificationNoise) -> RejectionResult:
    """Verify each sequence's drafts.

    target_probs: [R, V] float32, the target's processed law at each verified position, where
        sequence i owns k_i + 1 consecutive rows (R = sum(k_i + 1)); may be None if all greedy.
    target_argmax: [R] the target's greedy token at each position.
    draft_token_ids: per sequence, its k_i drafted tokens (k_i may be 0).
    draft_probs: per sequence, q as [k_i, V] float32 (standard rejection sampling), or None for
        drafts verified by sample-and-match.
    greedy: per sequence, whether it decodes greedily.
    noise: the per-(sequence, offset, stream) randomness.
    """
    emitted: list[list[int]] = []
    argmax = target_argmax.tolist()
    row = 0
    for i, (drafts, q, is_greedy) in enumerate(zip(draft_token_ids, draft_probs, greedy)):
        k = len(drafts)
        if is_greedy:
            out = _match(drafts, lambda j: argmax[row + j])
        elif q is None:
            p = target_probs[row:row + k + 1]  # [k + 1, V]
            out = _match(drafts, lambda j: race(p[j], noise.exponential(i, j, TARGET)))
        else:
            out = _standard(target_probs[row:row + k + 1], q, drafts, i, noise)
        emitted.append(out)
        row += k + 1
    return RejectionResult(emitted, [len(out) - 1 for out in emitted])


def _match(drafts: list[int], target_token) -> list[int]:
    """Accept drafts while the target's token at the position equals them; then emit the
    target's token at the first mismatch (or after the last draft)."""
    out: list[int] = []
    for j, x in enumerate(drafts):
        y = target_token(j)
        out.append(y)
        if y != x:
            return out
    out.append(target_token(len(drafts)))
    return out


def _standard(p: torch.Tensor, q: torch.Tensor, drafts: list[int], i: int, noise: VerificationNoise) -> list[int]:
    """p: [k + 1, V], q: [k, V]."""
    out: list[int] = []
    for j, x in enumerate(drafts):
        p_x, q_x = float(p[j, x]), float(q[j, x])
        if noise.uniform(i, j) * q_x < p_x:  # accept with probability min(1, p(x) / q(x))
            out.append(x)
            continue
        residual = (p[j] - q[j]).clamp_min(0.0)
        if not bool((residual > 0).any()):
            residual = p[j]  # unreachable in exact arithmetic (rejection had probability 0)
        out.append(race(residual, noise.exponential(i, j, RESIDUAL)))
        return out
    out.append(race(p[len(drafts)], noise.exponential(i, len(drafts), TARGET)))
    return out
