"""Exact verification of drafted tokens (Leviathan et al. 2023; Chen et al. 2023).

For a sequence with drafts x_1..x_k, target laws p_1..p_{k+1} and draft laws q_1..q_k:
accept x_j with probability min(1, p_j(x_j) / q_j(x_j)); at the first rejection emit a token
drawn from normalize(max(0, p_j - q_j)) and stop; if all k are accepted emit a bonus token
drawn from p_{k+1}. Every emitted token is then distributed exactly as p. A one-hot q (n-gram
drafts) makes the acceptance probability p_j(x_j) and the residual p_j with x_j removed.
Greedy sequences accept while x_j equals the target argmax and then emit the argmax.

The sampler sees flat tensors and token lists only, never requests. Each sequence draws its
randomness from its own generator in a fixed order (k uniforms, then one Exp(1) vector), so a
sequence with no draft consumes exactly what plain sampling would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RejectionResult:
    emitted: list[list[int]]  # per sequence: accepted drafts followed by one recovered/bonus token
    num_accepted: list[int]  # per sequence: how many drafts were accepted


def _race(weights: torch.Tensor, generator: torch.Generator) -> int:
    """Draw index v with probability weights[v] / sum(weights) (exponential race)."""
    noise = torch.empty_like(weights).exponential_(generator=generator)
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return int((weights / noise).argmax())


def rejection_sample(target_probs: torch.Tensor | None, target_argmax: torch.Tensor,
                     draft_token_ids: list[list[int]], draft_probs: list[torch.Tensor | None],
                     greedy: list[bool], generators: list[torch.Generator]) -> RejectionResult:
    """Verify each sequence's drafts.

    target_probs: [R, V] float32, the target's processed law at each verified position, where
        sequence i owns k_i + 1 consecutive rows (R = sum(k_i + 1)); may be None if all greedy.
    target_argmax: [R] the target's greedy token at each position.
    draft_token_ids: per sequence, its k_i drafted tokens (k_i may be 0).
    draft_probs: per sequence, q as [k_i, V] float32, or None for one-hot drafts (n-gram).
    greedy: per sequence, whether it decodes greedily.
    generators: per sequence, the generator its random draws come from.
    """
    emitted: list[list[int]] = []
    accepted_counts: list[int] = []
    argmax = target_argmax.tolist()
    row = 0
    for drafts, q, is_greedy, gen in zip(draft_token_ids, draft_probs, greedy, generators):
        k = len(drafts)
        out: list[int] = []
        if is_greedy:
            for j, x in enumerate(drafts):
                if x != argmax[row + j]:
                    break
                out.append(x)
            out.append(argmax[row + len(out)])
        else:
            p = target_probs[row:row + k + 1]  # [k + 1, V]
            m = k
            if k:
                xs = torch.tensor(drafts, device=p.device)
                p_x = p[:-1].gather(1, xs.unsqueeze(1)).squeeze(1)  # [k]
                q_x = torch.ones_like(p_x) if q is None else q.gather(1, xs.unsqueeze(1)).squeeze(1)
                u = torch.rand(k, generator=gen, device=p.device)
                rejected = (u * q_x >= p_x).tolist()  # accept iff u < p(x) / q(x)
                m = rejected.index(True) if True in rejected else k
                out.extend(drafts[:m])
            if m < k:
                if q is None:
                    residual = p[m].clone()
                    residual[drafts[m]] = 0.0
                else:
                    residual = (p[m] - q[m]).clamp_min(0.0)
                if not bool((residual > 0).any()):
                    residual = p[m]  # unreachable in exact arithmetic (rejection had probability 0)
                out.append(_race(residual, gen))
            else:
                out.append(_race(p[k], gen))
        emitted.append(out)
        accepted_counts.append(len(out) - 1)
        row += k + 1
    return RejectionResult(emitted, accepted_counts)
