"""Draft-model proposer: a second, smaller model with the target's vocabulary drafts k tokens
autoregressively with each request's own sampling settings.

How a sampled draft token is drawn decides how it is verified (spec_decode/rejection_sampler.py):
``coupled`` draws x_j = argmax(q_j / E_j) with the *target's* noise E_j of that position (a
Gumbel-max coupling of draft and target) and returns no law: given the noise the draft is a point
mass, verified by sample-and-match, and the output equals plain seeded decoding token for token.
``standard`` draws x_j with its own DRAFT noise and returns its laws q for the standard
rejection sampler.

Its KV cache has the same slots as the target's and uses the target's block tables, so a
position's draft keys and values live in the same slot as the target's. After verification the
draft's valid prefix is just a length (``Sequence.num_draft_computed_tokens``): rejected
drafts' slots are overwritten later, and tokens the draft has not seen yet (the bonus token,
or steps without drafting) are caught up at the start of its next proposal.

With structured outputs, a sequence's draft law is masked by its grammar at every drafted
position (the grammar is advanced through the drafts and rolled back), so drafts stay valid.

A draft with a shorter context than the target (``max_len``) drafts only for sequences whose
drafts still fit in it, as vLLM does; longer sequences decode plainly.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from quickdraft.engine.block_manager import BlockManager
from quickdraft.engine.model_runner import ModelRunner, SeqInput
from quickdraft.engine.sequence import Sequence as Seq
from quickdraft.sample.noise import DRAFT, TARGET, NoiseCache, NoiseKey
from quickdraft.sample.sampler import argmax_rows, drawable, penalized_logits, process_logits, sample_from_probs
from quickdraft.sample.sampling_metadata import build_sampling_metadata
from quickdraft.spec_decode.proposer import Draft
from quickdraft.structured_output.bitmask import allocate_bitmask, apply_bitmask


class DraftModelProposer:
    drafts_know_odds = False

    def __init__(self, runner: ModelRunner, block_manager: BlockManager, eos_token_ids: frozenset[int],
                 method: str = "coupled", max_len: int | None = None) -> None:
        assert method in ("coupled", "standard")
        self.runner = runner
        self.max_len = max_len  # the draft's context: no proposals that would reach past it
        self.num_skipped = 0  # proposals skipped because the sequence outgrew the draft's context
        self.block_manager = block_manager
        self.eos_token_ids = eos_token_ids
        self.coupled = method == "coupled"

    def finish(self, seq: Seq) -> None:
        pass

    def propose(self, seqs: Sequence[Seq], max_tokens: Sequence[int], noise: NoiseCache,
                after: Sequence[list[int]] | None = None) -> list[Draft]:
        """Draft after seqs[i].token_ids + after[i]; a sequence with a grammar (structured
        outputs) drafts from its draft law masked by the grammar, so that its drafts are valid."""
        after = after or [[] for _ in seqs]
        drafts = [Draft([], None) for _ in seqs]
        active = [i for i, k in enumerate(max_tokens) if k > 0]
        if self.max_len is not None:  # the last draft token sits at position num_tokens + k - 1
            fits = [i for i in active if seqs[i].num_tokens + len(after[i]) + max_tokens[i] <= self.max_len]
            self.num_skipped += len(active) - len(fits)
            active = fits
        if not active:
            return drafts
        q_rows: dict[int, list[torch.Tensor]] = {i: [] for i in active}
        advanced: dict[int, int] = {}
        try:
            self._draft(seqs, max_tokens, noise, after, active, drafts, q_rows, advanced)
        finally:  # every grammar ends where it started, whatever happened
            for i, n in advanced.items():
                seqs[i].grammar.rollback(n)
        for i, s in enumerate(seqs):
            k = len(after[i]) + len(drafts[i].token_ids)
            if drafts[i].token_ids:
                # Cache holds the sequence plus drafts 1..k-1.
                s.num_draft_computed_tokens = s.num_tokens + k - 1
                if q_rows[i]:
                    drafts[i].probs = torch.stack(q_rows[i])  # [k', V]
        return drafts

    def _draft(self, seqs: Sequence[Seq], max_tokens: Sequence[int], noise: NoiseCache, after: Sequence[list[int]],
               active: list[int], drafts: list[Draft], q_rows: dict[int, list[torch.Tensor]],
               advanced: dict[int, int]) -> None:
        """The drafting loop of `propose`: fills drafts[i] (and q_rows[i]) for i in active;
        advanced[i] counts the tokens sequence i's grammar accepted (the caller rolls back).
        A sequence's draft ends before a position where its masked draft law leaves no token to
        draw (verification then decides with the target's own law there)."""
        for i in active:
            if seqs[i].grammar is not None:
                advanced[i] = 0
                for t in after[i]:  # one at a time: what was accepted is rolled back, whatever happens
                    if not seqs[i].grammar.accept_tokens([t]):
                        raise RuntimeError("the grammar rejected its own forced tokens")
                    advanced[i] += 1
        active = [i for i in active if i not in advanced or not seqs[i].grammar.is_terminated()]
        if not active:
            return
        # First pass: catch the draft's cache up to the sequence (includes its last token) and the
        # tokens drafted before it.
        inputs = []
        for i in active:
            s = seqs[i]
            start = min(s.num_draft_computed_tokens, s.num_tokens - 1)
            tokens = s.token_ids[start:] + after[i]
            inputs.append(SeqInput(tokens, start, self.block_manager.block_table(s.seq_id), len(tokens) - 1))
        logits = self.runner.execute(inputs)  # [A, V]
        step = 0
        while True:
            rows = [seqs[i] for i in active]
            self._mask(logits, [seqs[i].grammar for i in active])
            md = build_sampling_metadata(rows, self.eos_token_ids, logits.shape[1], logits.device,
                                         extra_output_tokens=[after[i] + drafts[i].token_ids for i in active])
            penalized = penalized_logits(logits, md)
            tokens = argmax_rows(penalized)
            best = drawable(penalized, tokens).tolist()
            if not md.all_greedy:
                q = process_logits(logits, md).softmax(dim=-1)
                stream = TARGET if self.coupled else DRAFT
                keys = [None if s.params.greedy else
                        NoiseKey(s.seed, s.index, s.num_output_tokens + len(after[i]) + step, stream)
                        for s, i in zip(rows, active)]
                tokens = torch.where(md.greedy, tokens, sample_from_probs(q, noise.rows(keys)))
            token_list = tokens.tolist()
            ended = set()
            for r, i in enumerate(active):
                if not math.isfinite(best[r]):  # nothing to draw here: the draft ends before it
                    ended.add(i)
                    continue
                drafts[i].token_ids.append(token_list[r])
                if not self.coupled and not rows[r].params.greedy:
                    q_rows[i].append(q[r])
                g = rows[r].grammar
                if g is not None:
                    if not g.accept_tokens([token_list[r]]):
                        raise RuntimeError(f"the grammar rejected draft token {token_list[r]} drawn under its mask")
                    advanced[i] += 1
                    if g.is_terminated():
                        ended.add(i)
            step += 1
            active = [i for i in active if len(drafts[i].token_ids) < max_tokens[i] and i not in ended]
            if not active:
                return
            inputs = []
            for i in active:
                s = seqs[i]
                pos = s.num_tokens + len(after[i]) + step - 1  # the previous draft token's position
                inputs.append(SeqInput([drafts[i].token_ids[-1]], pos, self.block_manager.block_table(s.seq_id), 0))
            logits = self.runner.execute(inputs)

    @staticmethod
    def _mask(logits: torch.Tensor, grammars: list) -> None:
        """Mask the rows of sequences with a grammar by its current state (in place)."""
        rows = [r for r, g in enumerate(grammars) if g is not None]
        if not rows:
            return
        bitmask = allocate_bitmask(len(rows), logits.shape[1])
        for j, r in enumerate(rows):
            grammars[r].fill_bitmask(bitmask, j)
        apply_bitmask(logits, bitmask, rows)
