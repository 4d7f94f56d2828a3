"""The paged KV cache's bookkeeping: fixed-size blocks, per-sequence block tables, and the
prefix cache (blocks named by the hash of their token prefix, engine/prefix_cache.py).

It only counts and hands out block ids; the tensors live in the model runner.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from quickdraft.engine.prefix_cache import BlockHash, block_hashes, longest_cached_prefix, max_cached_blocks


class BlockManager:
    """Allocates KV-cache blocks of ``block_size`` token slots to sequences.

    A sequence holding ``n`` tokens in the cache owns ``ceil(n / block_size)`` blocks, listed in
    its block table; token ``i`` of the sequence lives in slot
    ``block_table[i // block_size] * block_size + i % block_size``.

    With prefix caching, a block full of verified tokens is registered under its hash. Blocks
    are reference-counted: sequences that share a prefix share its blocks. A block whose count
    drops to zero keeps its contents and stays findable by hash in the free queue, which is
    least-recently-used first: a finished sequence's blocks enter it tail first (its last
    blocks are evicted before its first ones), blocks without a hash go to the front (nothing
    to keep). Allocation takes the front block and forgets its hash.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._ref = [0] * num_blocks
        self._hash: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}
        self._draft_valid = [False] * num_blocks  # the draft model's KV of the block is its prefix's too
        self._tables: dict[int, list[int]] = {}
        self._seq_hashes: dict[int, list[BlockHash]] = {}  # hash chain of each sequence's full blocks
        self.queries = 0  # prompt tokens looked up in the cache
        self.hits = 0  # of them, tokens served from it

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached ones included: they are evicted on demand)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences, in [0, 1]."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

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
            table.append(self._take_free())
        return table

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        h = self._hash[block]
        if h is not None:  # evicted: its contents are about to be overwritten
            del self._cached[h]
            self._hash[block] = None
        self._draft_valid[block] = False
        self._ref[block] = 1
        return block

    def free(self, seq_id: int) -> None:
        """Release a sequence's blocks (finish, abort or preemption). Blocks that other
        sequences hold stay theirs; the others enter the free queue, cached ones findable."""
        table = self._tables.pop(seq_id, [])
        self._seq_hashes.pop(seq_id, None)
        for block in reversed(table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                self._free[block] = None
                if self._hash[block] is None:
                    self._free.move_to_end(block, last=False)

    def num_allocated_blocks(self) -> int:
        return sum(len(t) for t in self._tables.values())

    # ---- prefix caching -------------------------------------------------------------------
    def lookup(self, token_ids: Sequence[int]) -> tuple[list[int], list[BlockHash]]:
        """(cached blocks, their hashes) of the longest cached prefix of ``token_ids``, at most
        max_cached_blocks of them. Nothing is acquired."""
        if not self.enable_prefix_caching:
            return [], []
        n = max_cached_blocks(len(token_ids), self.block_size)
        hashes = block_hashes(token_ids[:n * self.block_size], self.block_size)
        blocks = longest_cached_prefix(hashes, self._cached.get)
        return blocks, hashes[:len(blocks)]

    def acquire_cached(self, seq_id: int, blocks: list[int], hashes: list[BlockHash]) -> None:
        """Start a sequence's (empty) table with cached blocks, taking a reference to each."""
        assert not self._tables.get(seq_id), "cached blocks start a table"
        for block in blocks:
            if self._ref[block] == 0:
                del self._free[block]
            self._ref[block] += 1
        self._tables[seq_id] = list(blocks)
        self._seq_hashes[seq_id] = list(hashes)

    def count_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.queries += num_tokens
        self.hits += num_hit_tokens

    def register(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        """Name the sequence's blocks that ``num_computed`` verified tokens fill. A block whose
        prefix is cached already (computed twice, side by side) stays unnamed."""
        if not self.enable_prefix_caching:
            return
        table = self._tables.get(seq_id)
        if not table:
            return
        known = self._seq_hashes.setdefault(seq_id, [])
        full = min(num_computed // self.block_size, len(table))
        if full <= len(known):
            return
        hashes = block_hashes(token_ids[:full * self.block_size], self.block_size, known=known)
        for i in range(len(known), full):
            block, h = table[i], hashes[i]
            if h not in self._cached and self._hash[block] is None:
                self._cached[h] = block
                self._hash[block] = h
        self._seq_hashes[seq_id] = hashes

    def mark_draft_valid(self, seq_id: int, num_draft_computed: int) -> None:
        """The draft model's KV of the sequence's first ``num_draft_computed`` tokens is in place."""
        table = self._tables.get(seq_id, [])
        for block in table[:min(num_draft_computed // self.block_size, len(table))]:
            self._draft_valid[block] = True

    def draft_valid_blocks(self, blocks: list[int]) -> int:
        """How many of ``blocks``, from the first, hold the draft model's KV too."""
        n = 0
        while n < len(blocks) and self._draft_valid[blocks[n]]:
            n += 1
        return n

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (vLLM's reset_prefix_cache). Refused (False) while
        sequences hold blocks, whose tables would keep pointing at named blocks."""
        if len(self._free) != self.num_blocks:
            return False
        self._cached.clear()
        self._hash = [None] * self.num_blocks
        self._draft_valid = [False] * self.num_blocks
        return True
