"""Continuous-batching scheduler: decides which sequences compute how many tokens each step.

One token budget covers prefill and decode alike (vLLM v1 style): a sequence's uncomputed
tokens are its prompt (a prefill, possibly in chunks) or its last sampled token (a decode).
When KV blocks run out, the newest running sequence is preempted: its blocks are freed and it
is recomputed from its tokens later, which gives the same output as without pressure. With
prefix caching a sequence starts from the longest cached prefix of its tokens (block_manager.py).
The scheduler does bookkeeping only; it never touches tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from quickdraft.engine.block_manager import BlockManager
from quickdraft.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed this step, from seq.num_computed_tokens on
    num_lookahead: int = 0  # extra slots reserved for speculative drafts after them


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens + s.num_lookahead for s in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, lookahead: Callable[[Sequence], int] | None = None) -> SchedulerOutput:
        """Pick this step's work. ``lookahead(seq)`` is how many draft slots a decoding sequence
        may use (speculative decoding); they count against the token budget and are dropped
        before anything is preempted for them."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            extra = 0
            if lookahead is not None and n == seq.num_uncomputed_tokens == 1:
                extra = max(0, min(lookahead(seq), budget - n))
                if extra and not bm.can_grow_to(seq.seq_id, seq.num_computed_tokens + n + extra):
                    extra = 0
            while not bm.can_grow_to(seq.seq_id, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break  # the sequence preempted itself: nothing younger is left to schedule
            bm.grow_to(seq.seq_id, seq.num_computed_tokens + n + extra)
            out.scheduled.append(ScheduledSeq(seq, n, extra))
            budget -= n + extra
            i += 1
        if out.preempted:
            return out  # no admissions in a step that had to preempt
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if bm.enable_prefix_caching and self._sibling_prefilling(seq):
                break  # n > 1: the other samples take the prompt's blocks from the cache next step
            cached = self._take_cached_prefix(seq) if seq.num_computed_tokens == 0 else 0
            n = min(seq.num_uncomputed_tokens, budget)
            if not bm.can_grow_to(seq.seq_id, seq.num_computed_tokens + n):
                if cached:
                    bm.free(seq.seq_id)
                    seq.num_computed_tokens = seq.num_draft_computed_tokens = 0
                break
            if bm.enable_prefix_caching and seq.reads_prefix_cache:
                bm.count_query(seq.num_tokens, cached)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = cached
            self.waiting.popleft()
            bm.grow_to(seq.seq_id, seq.num_computed_tokens + n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return out

    def _take_cached_prefix(self, seq: Sequence) -> int:
        """Start a sequence from the longest cached prefix of its tokens (prompt, and output
        after a preemption); returns the tokens it covers. The draft model's KV counts as
        computed only over the blocks that hold it."""
        bm = self.block_manager
        if not (bm.enable_prefix_caching and seq.reads_prefix_cache):
            return 0
        blocks, hashes = bm.lookup(seq.token_ids)
        if not blocks:
            return 0
        bm.acquire_cached(seq.seq_id, blocks, hashes)
        seq.num_computed_tokens = len(blocks) * bm.block_size
        seq.num_draft_computed_tokens = bm.draft_valid_blocks(blocks) * bm.block_size
        return seq.num_computed_tokens

    def _sibling_prefilling(self, seq: Sequence) -> bool:
        """Whether another sample of the same request is still computing its prompt."""
        return seq.num_computed_tokens == 0 and any(
            s.request_id == seq.request_id and s.num_computed_tokens < s.num_prompt_tokens for s in self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.num_draft_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq.seq_id)
        seq.status = SequenceStatus.FINISHED
