"""Build the sampler's flat per-row tensors from the sequences that sample this step."""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from quickdraft.engine.sequence import Sequence
from quickdraft.sample.sampler import SamplingMetadata


def build_sampling_metadata(seqs: Seq[Sequence], eos_token_ids: frozenset[int], vocab_size: int,
                            device: torch.device, extra_output_tokens: Seq[Seq[int]] | None = None
                            ) -> SamplingMetadata:
    """One row per sequence. ``extra_output_tokens[i]`` are tokens to count as already generated
    for row i (a speculative draft prefix), for penalties, min_tokens and bad words."""
    params = [s.params for s in seqs]
    outputs = [s.output_token_ids + (list(extra_output_tokens[i]) if extra_output_tokens else [])
               for i, s in enumerate(seqs)]
    greedy = [p.greedy for p in params]
    md = SamplingMetadata(
        temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
        greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
        all_greedy=all(greedy),
    )
    f32 = dict(dtype=torch.float32, device=device)
    if any(p.top_k > 0 for p in params):
        md.top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device)
    if any(p.top_p < 1.0 for p in params):
        md.top_p = torch.tensor([p.top_p for p in params], **f32)
    if any(p.min_p > 0.0 for p in params):
        md.min_p = torch.tensor([p.min_p for p in params], **f32)
    use_rep = any(p.repetition_penalty != 1.0 for p in params)
    use_freq = any(p.frequency_penalty != 0.0 for p in params)
    use_pres = any(p.presence_penalty != 0.0 for p in params)
    if use_rep or use_freq or use_pres:
        counts = torch.zeros(len(seqs), vocab_size, **f32)
        rows, cols = _flat_index(outputs, device)
        counts.index_put_((rows, cols), torch.ones(rows.shape[0], **f32), accumulate=True)  # exact: integer sums
        md.output_counts = counts
        if use_rep:
            md.repetition_penalty = torch.tensor([p.repetition_penalty for p in params], **f32)
            mask = torch.zeros(len(seqs), vocab_size, dtype=torch.bool, device=device)
            mask[_flat_index([s.prompt_token_ids for s in seqs], device)] = True
            md.prompt_mask = mask
        if use_freq:
            md.frequency_penalty = torch.tensor([p.frequency_penalty for p in params], **f32)
        if use_pres:
            md.presence_penalty = torch.tensor([p.presence_penalty for p in params], **f32)
    banned: list[list[int]] = []
    for s, p, out in zip(seqs, params, outputs):
        ids: set[int] = set()
        if len(out) < p.min_tokens:
            ids.update(p.stop_token_ids)
            if not p.ignore_eos:
                ids.update(eos_token_ids)
        for word in s.bad_words_token_ids:
            if len(word) == 1 or (len(out) >= len(word) - 1 and out[len(out) - len(word) + 1:] == word[:-1]):
                ids.add(word[-1])
        banned.append(sorted(t for t in ids if t < vocab_size))
    if any(banned):
        md.banned_tokens = banned
    if any(p.allowed_token_ids is not None for p in params):
        restricted = torch.tensor([p.allowed_token_ids is not None for p in params], device=device)
        allowed = ~restricted.unsqueeze(1).expand(len(seqs), vocab_size).clone()  # [N, V]
        allowed[_flat_index([p.allowed_token_ids or [] for p in params], device)] = True
        md.allowed_mask = allowed
    if any(p.logit_bias for p in params):
        biases = [p.logit_bias or {} for p in params]
        values = torch.tensor([v for b in biases for v in b.values()], **f32)
        md.logit_bias = (*_flat_index([list(b) for b in biases], device), values)
    return md


def _flat_index(token_lists: Seq[Seq[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs of every token of every row, as two int64 tensors."""
    rows = [i for i, tokens in enumerate(token_lists) for _ in tokens]
    cols = [t for tokens in token_lists for t in tokens]
    return (torch.tensor(rows, dtype=torch.int64, device=device), torch.tensor(cols, dtype=torch.int64, device=device))
