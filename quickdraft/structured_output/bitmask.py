"""Token bitmasks (32 tokens per int32, bit t % 32 of word t // 32 set iff token t is allowed)
applied to logits. Pure tensor code, so it runs wherever the logits live."""

from __future__ import annotations

import numpy as np
import torch


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """[rows, ceil(vocab / 32)] int32, every token allowed."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, W] int32 -> [R, vocab] bool, True where allowed."""
    if bitmask.device.type == "cpu":  # numpy's bit unpacking: ~20x faster than shifts on a CPU
        words = np.ascontiguousarray(bitmask.numpy()).astype("<i4", copy=False)
        bits = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")  # [R, W * 32]
        return torch.from_numpy(bits[:, :vocab_size]).bool()
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [R, W, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """In place: logits[rows[i], t] = -inf where bitmask[i] disallows t.
    logits: [N, V] float; bitmask: [len(rows), W] int32 (CPU)."""
    if not rows:
        return
    with torch.inference_mode():  # the runner's logits are inference tensors
        blocked = ~unpack_bitmask(bitmask, logits.shape[1]).to(logits.device)  # [R, V]
        for i, r in enumerate(rows):
            logits[r].masked_fill_(blocked[i], float("-inf"))
