"""Paged attention over the block-structured KV cache, using torch SDPA (works on CPU and CUDA).

The new tokens of a step are flat ([T, heads, head_dim]); their keys and values are written to
their cache slots first, then each *segment* of sequences attends over its cached context. A
segment is either a batch of short queries (decodes, verification runs) padded to a common
length, or one long prefill; a prefill with no cached prefix is plain causal attention on the
new tokens. On CPU in float32 the native decoder stack (kernels/decoder.py) attends instead,
from a NativeQueries segment, reading the paged cache in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class NativeQueries:
    """Every query of a step for the native paged-attention kernel (no gather, no mask)."""
    query_token: torch.Tensor  # [Nq] int64 flat index of each query token
    query_pos: torch.Tensor  # [Nq] int64 absolute position
    query_seq: torch.Tensor  # [Nq] int64 row of block_tables
    block_tables: torch.Tensor  # [B, max_blocks] int64
    block_size: int
    window: int  # sliding window, 0 = none
    max_context: int  # longest context of any query


@dataclass
class AttentionSegment:
    token_index: torch.Tensor  # [B, Qmax] flat index of each query token (padding -> any valid index)
    valid: torch.Tensor  # [B, Qmax] bool, which query slots are real tokens
    out_index: torch.Tensor  # [n_valid] flat index receiving each valid query's output
    kv_slots: torch.Tensor | None  # [B, Kmax] cache slot of each key position; None = causal self-attention
    mask: torch.Tensor | None  # [B, 1, Qmax, Kmax] bool, True = attend; None with kv_slots=None
    native: NativeQueries | None = None  # set instead of the fields above for the native decoder


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot written by each new token
    segments: list[AttentionSegment] = field(default_factory=list)


def _attention_float64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v computed in float64 and rounded back: q [B, H, Q, D], k and v
    [B, Hkv, K, D], mask [B, 1, Q, K] (True = attend) or None.

    CPU matmul kernels round differently depending on how many rows share a call, so a query's
    result would depend on the batch and on how many draft tokens are verified with it. In
    float64 those differences are ~1e-16 and vanish when rounding to float32 or bfloat16, which
    makes one query's attention the same whatever else is computed beside it (batch invariance).
    Short queries only (decode and verification), where attention is a small part of the cost.
    """
    B, H, Q, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    qg = q.double().reshape(B, Hkv, G * Q, D)  # query head h = kv_head * G + g
    scores = torch.matmul(qg, k.double().transpose(-1, -2)) * scale  # [B, Hkv, G*Q, K]
    if mask is not None:
        keep = mask.unsqueeze(2).expand(B, 1, G, Q, mask.shape[-1]).reshape(B, 1, G * Q, mask.shape[-1])
        scores = scores.masked_fill(~keep, float("-inf"))
    out = torch.matmul(scores.softmax(dim=-1), v.double())  # [B, Hkv, G*Q, D]
    return out.reshape(B, H, Q, D).to(q.dtype)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D]; kv_cache: [2, num_slots, Hkv, D]. Returns [T, H * D]."""
    T, H, D = q.shape
    kv_cache[0].index_copy_(0, meta.slot_mapping, k)
    kv_cache[1].index_copy_(0, meta.slot_mapping, v)
    if len(meta.segments) == 1 and meta.segments[0].kv_slots is None:
        # One prefill without cached prefix: causal attention on the new tokens.
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            is_causal=True, scale=scale, enable_gqa=True)  # [H, T, D]
        return out.transpose(0, 1).reshape(T, H * D)
    out = q.new_empty(T, H * D)
    for seg in meta.segments:
        if seg.kv_slots is None:
            idx = seg.token_index[0]
            o = F.scaled_dot_product_attention(
                q[idx].transpose(0, 1), k[idx].transpose(0, 1), v[idx].transpose(0, 1),
                is_causal=True, scale=scale, enable_gqa=True)  # [H, n, D]
            out.index_copy_(0, seg.out_index, o.transpose(0, 1).reshape(-1, H * D))
            continue
        qs = q[seg.token_index].transpose(1, 2)  # [B, H, Qmax, D]
        ks = kv_cache[0][seg.kv_slots].transpose(1, 2)  # [B, Hkv, Kmax, D]
        vs = kv_cache[1][seg.kv_slots].transpose(1, 2)
        if q.device.type == "cpu":
            o = _attention_float64(qs, ks, vs, seg.mask, scale)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=seg.mask, scale=scale, enable_gqa=True)
        o = o.transpose(1, 2).reshape(qs.shape[0], qs.shape[2], H * D)  # [B, Qmax, H*D]
        out.index_copy_(0, seg.out_index, o[seg.valid])
    return out
