"""Logits processing and sampling on flat tensors (one row per sequence that samples).

The same `process_logits` turns raw logits into the distribution p that plain sampling draws
from and that speculative verification compares drafts against, so both paths follow one law.
Order (vLLM's): allowed_token_ids, bad_words and min_tokens bans, logit_bias, then penalties on
raw logits (greedy takes the argmax here), then temperature, min-p, top-k and top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SamplingMetadata:
    """Per-row settings; optional tensors are None when no row uses the option."""

    temperature: torch.Tensor  # [N] float32; rows with greedy[i] ignore it
    greedy: torch.Tensor  # [N] bool
    all_greedy: bool
    top_k: torch.Tensor | None = None  # [N] int64, 0 = off
    top_p: torch.Tensor | None = None  # [N] float32, 1 = off
    min_p: torch.Tensor | None = None  # [N] float32, 0 = off
    presence_penalty: torch.Tensor | None = None  # [N]
    frequency_penalty: torch.Tensor | None = None  # [N]
    repetition_penalty: torch.Tensor | None = None  # [N]
    prompt_mask: torch.Tensor | None = None  # [N, V] bool, token appears in the prompt
    output_counts: torch.Tensor | None = None  # [N, V] float32, occurrences in the output so far
    allowed_mask: torch.Tensor | None = None  # [N, V] bool, False = banned (allowed_token_ids); None = all
    banned_tokens: list[list[int]] | None = None  # per row, ids masked out (min_tokens, bad_words)
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows, cols, values) [B] each


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition penalty r on tokens seen in prompt or output (logit / r if positive, * r if
    not), then logit -= frequency * count + presence * [count > 0] over output tokens."""
    if md.repetition_penalty is not None:
        seen = md.output_counts > 0
        if md.prompt_mask is not None:
            seen = seen | md.prompt_mask
        r = md.repetition_penalty.unsqueeze(1).expand_as(logits)
        penalized = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(seen, penalized, logits)
    if md.frequency_penalty is not None:
        logits = logits - md.frequency_penalty.unsqueeze(1) * md.output_counts
    if md.presence_penalty is not None:
        logits = logits - md.presence_penalty.unsqueeze(1) * (md.output_counts > 0).to(logits.dtype)
    return logits


def apply_bans_and_bias(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Tokens outside allowed_token_ids and banned tokens (bad words, min_tokens) to -inf, then
    logit_bias added. Returns a new tensor when anything applies."""
    if md.allowed_mask is not None:
        logits = logits.masked_fill(~md.allowed_mask, float("-inf"))
    if md.banned_tokens:
        rows = [i for i, ids in enumerate(md.banned_tokens) for _ in ids]
        cols = [t for ids in md.banned_tokens for t in ids]
        if rows:
            logits = logits.clone() if md.allowed_mask is None else logits
            logits[rows, cols] = float("-inf")
    if md.logit_bias is not None:
        rows, cols, values = md.logit_bias
        logits = logits.index_put((rows, cols), values, accumulate=True)
    return logits


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Keep the k most likely tokens, then the smallest set whose probability reaches p.
    top_k: [N] (0 = off), top_p: [N] (1 = off)."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)  # ascending: [N, V]
    V = logits.shape[-1]
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V)).clamp(max=V)
        threshold = sorted_logits.gather(1, (V - k).unsqueeze(1))  # [N, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < threshold, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        cum = probs.cumsum(dim=-1)
        drop = cum <= (1 - top_p).unsqueeze(1)
        drop[:, -1] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top probability."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def penalized_logits(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Raw logits [N, V] with bans, logit bias and penalties applied (what greedy takes the
    argmax of)."""
    return apply_penalties(apply_bans_and_bias(logits, md), md)


def process_logits(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Raw float32 logits [N, V] -> processed logits whose softmax is the sampling law p.
    Greedy rows are left at temperature 1 (their law is the argmax)."""
    logits = penalized_logits(logits, md)
    temp = torch.where(md.greedy, torch.ones_like(md.temperature), md.temperature)
    logits = logits / temp.unsqueeze(1)
    if md.min_p is not None:
        logits = apply_min_p(logits, md.min_p)
    if md.top_k is not None or md.top_p is not None:
        logits = apply_top_k_top_p(logits, md.top_k, md.top_p)
    return logits


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """[N, V] -> [N] int64: the index of the first maximum of each row, NaN counting as the
    maximum (torch.argmax's rule, and numpy's). On CPU numpy's argmax, ~10x faster than torch's
    on a 49k vocabulary row, does the work; every greedy choice, plain or speculative, goes
    through here."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[0] > 0:
        return torch.from_numpy(np.argmax(x.numpy(), axis=-1).astype(np.int64, copy=False))
    return x.argmax(dim=-1)


def drawable(penalized: torch.Tensor, argmax: torch.Tensor) -> torch.Tensor:
    """[N] float: each row's largest penalized logit (the value at its argmax). -inf means no
    token can be drawn (bans, allowed ids and a grammar's mask exclude every token); NaN or +inf
    means the row's logits are not finite. Any other value: the row has a token to draw, and
    every law derived from it (temperature, top-k, top-p, min-p) keeps at least that token.
    penalized: [N, V] from penalized_logits; argmax: [N] from argmax_rows of it."""
    return penalized.gather(1, argmax.unsqueeze(1).to(penalized.device)).squeeze(1)


def sample_from_probs(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Draw one token per row of probs [N, V] by the exponential race argmax(p / E), which
    picks token v with probability p[v]."""
    return argmax_rows(probs / noise)


def sample(logits: torch.Tensor, md: SamplingMetadata, noise: torch.Tensor | None) -> torch.Tensor:
    """Raw float32 logits [N, V] -> sampled token ids [N]. noise: Exp(1) [N, V], row i the
    noise of row i's sequence at the position it samples (see sample/noise.py); unused by
    greedy rows and may be None when every row is greedy."""
    return sample_checked(logits, md, noise)[0]


def sample_checked(logits: torch.Tensor, md: SamplingMetadata, noise: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample`, and each row's `drawable` value [N]: where it is not finite the row has no
    token to draw and its sampled id means nothing."""
    penalized = penalized_logits(logits, md)
    greedy_tokens = argmax_rows(penalized)
    best = drawable(penalized, greedy_tokens)
    if md.all_greedy:
        return greedy_tokens, best
    probs = process_logits(logits, md).softmax(dim=-1)
    sampled = sample_from_probs(probs, noise)
    return torch.where(md.greedy, greedy_tokens, sampled), best


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the raw distribution: (top_ids [N, num_top], top_logprobs [N, num_top],
    chosen_logprob [N], chosen_rank [N]) where rank 1 is the most likely token."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    rank = (logprobs > chosen.unsqueeze(1)).sum(dim=-1) + 1
    if num_top > 0:
        top_lp, top_ids = logprobs.topk(num_top, dim=-1)
    else:
        top_lp = logprobs.new_empty(logits.shape[0], 0)
        top_ids = token_ids.new_empty(logits.shape[0], 0)
    return top_ids, top_lp, chosen, rank
