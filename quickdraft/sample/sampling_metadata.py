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
    for row i (a speculative draft prefix), for penalties and min_tokens."""
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
        for i, out in enumerate(outputs):
            if out:
                ids = torch.tensor(out, dtype=torch.int64, device=device)
                counts[i].index_add_(0, ids, torch.ones(len(out), **f32))
        md.output_counts = counts
        if use_rep:
            md.repetition_penalty = torch.tensor([p.repetition_penalty for p in params], **f32)
            mask = torch.zeros(len(seqs), vocab_size, dtype=torch.bool, device=device)
            for i, s in enumerate(seqs):
                mask[i, torch.tensor(s.prompt_token_ids, dtype=torch.int64, device=device)] = True
            md.prompt_mask = mask
        if use_freq:
            md.frequency_penalty = torch.tensor([p.frequency_penalty for p in params], **f32)
        if use_pres:
            md.presence_penalty = torch.tensor([p.presence_penalty for p in params], **f32)
    banned: list[list[int]] = []
    for p, out in zip(params, outputs):
        if len(out) < p.min_tokens:
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            banned.append(sorted(t for t in stops if t < vocab_size))
        else:
            banned.append([])
    if any(banned):
        md.banned_tokens = banned
    if any(s.generator is not None for s in seqs):
        md.generators = [s.generator for s in seqs]
    return md
