"""Prefix caching's pure parts: the hash chain of a sequence's full KV blocks, and the lookup of
the longest cached chain.

Block i of a sequence (tokens [i * B, (i + 1) * B)) is named by

    h_i = sha256(h_{i-1} || extra_key || token ids of block i as int64, little-endian)

with h_{-1} = b"" and ``extra_key`` whatever else changes the keys and values (none today: a
LoRA adapter or multimodal inputs would go there). Equal hashes mean an equal token prefix, so
the blocks' KV, which the native kernels compute row by row independently of batching and
chunking, are the same bits as a cold computation of that prefix. Only full blocks are named;
a partial last block is never shared.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np

BlockHash = bytes


def hash_block(parent: BlockHash, token_ids: Sequence[int], extra_key: bytes = b"") -> BlockHash:
    h = hashlib.sha256(parent)
    h.update(len(extra_key).to_bytes(4, "little"))
    h.update(extra_key)
    h.update(np.asarray(token_ids, dtype="<i8").tobytes())
    return h.digest()


def block_hashes(token_ids: Sequence[int], block_size: int, extra_key: bytes = b"",
                 known: Sequence[BlockHash] = ()) -> list[BlockHash]:
    """Hashes of every full block of ``token_ids``; ``known``: the first hashes, already
    computed (only the blocks after them are hashed)."""
    out = list(known)
    parent = out[-1] if out else b""
    for start in range(len(out) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start:start + block_size], extra_key)
        out.append(parent)
    return out


def max_cached_blocks(num_tokens: int, block_size: int) -> int:
    """Most blocks a sequence of ``num_tokens`` may take from the cache: full blocks only, and
    at least one token left to compute (its logits sample the next token)."""
    return max(num_tokens - 1, 0) // block_size


def longest_cached_prefix(hashes: Sequence[BlockHash], lookup: Callable[[BlockHash], int | None]) -> list[int]:
    """Block ids of the longest run of ``hashes`` from the start that ``lookup`` knows; the chain
    makes any later match meaningless once one block misses."""
    blocks: list[int] = []
    for h in hashes:
        b = lookup(h)
        if b is None:
            break
        blocks.append(b)
    return blocks
