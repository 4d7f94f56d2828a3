"""The paged KV cache's bookkeeping: fixed-size blocks and per-sequence block tables.

It only counts and hands out block ids; the tensors live in the model runner.
"""

from __future__ import annotations


class BlockManager:
    """Allocates KV-cache blocks of ``block_size`` token slots to sequences.

    A sequence holding ``n`` tokens in the cache owns ``ceil(n / block_size)`` blocks, listed in
    its block table; token ``i`` of the sequence lives in slot
    ``block_table[i // block_size] * block_size + i % block_size``.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: the blocks freed last are reused first, so a new sequence writes into pages
        # that are already mapped and likely cached instead of faulting in fresh ones.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[int, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: int) -> list[int]:
        return self._tables.get(seq_id, [])

    def can_grow_to(self, seq_id: int, num_tokens: int) -> bool:
        """Whether the sequence can own enough blocks to hold ``num_tokens`` tokens."""
        extra = self.blocks_needed(num_tokens) - len(self._tables.get(seq_id, ()))
        return extra <= len(self._free)

    def grow_to(self, seq_id: int, num_tokens: int) -> list[int]:
        """Ensure the sequence's table covers ``num_tokens`` tokens; returns the table."""
        table = self._tables.setdefault(seq_id, [])
        extra = self.blocks_needed(num_tokens) - len(table)
        if extra > len(self._free):
            raise RuntimeError(f"Out of KV-cache blocks: need {extra}, have {len(self._free)}.")
        for _ in range(extra):
            table.append(self._free.pop())
        return table

    def free(self, seq_id: int) -> None:
        """Return all of a sequence's blocks to the pool (finish, abort or preemption)."""
        self._free.extend(reversed(self._tables.pop(seq_id, [])))

    def num_allocated_blocks(self) -> int:
        return sum(len(t) for t in self._tables.values())
