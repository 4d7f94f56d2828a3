"""LLMEngine: requests in, outputs out. A step is schedule -> run -> sample -> postprocess."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch

from quickdraft.config import EngineConfig
from quickdraft.engine.block_manager import BlockManager
from quickdraft.engine.errors import RequestError, UnsatisfiableRequestError
from quickdraft.engine.model_runner import ModelRunner, SeqInput
from quickdraft.engine.output_processor import LogprobEntry, OutputProcessor
from quickdraft.engine.scheduler import ScheduledSeq, Scheduler
from quickdraft.engine.sequence import Request, Sequence
from quickdraft.models.loader import LoadedModel
from quickdraft.outputs import RequestMetrics, RequestOutput
from quickdraft.sample.noise import ACCEPT, TARGET, NoiseCache, NoiseKey, uniform
from quickdraft.sample.sampler import (argmax_rows, compute_logprobs, drawable, penalized_logits, process_logits,
                                      sample_checked)
from quickdraft.sample.sampling_metadata import build_sampling_metadata
from quickdraft.sampling_params import SamplingParams
from quickdraft.spec_decode.adaptive import DraftLengthPolicy
from quickdraft.spec_decode.config import SpeculativeConfig
from quickdraft.spec_decode.draft_model import DraftModelProposer
from quickdraft.spec_decode.metrics import SpecDecodeStats
from quickdraft.spec_decode.proposer import Draft, GrammarProposer, NgramProposer, Proposer, SuffixProposer
from quickdraft.spec_decode.rejection_sampler import rejection_sample
from quickdraft.spec_decode.step_cost import BATCH_ROWS, measure_row_times, measure_step_costs
from quickdraft.spec_decode.suffix import SuffixCache
from quickdraft.structured_output.manager import StructuredOutputManager
from quickdraft.tokenizer import encode_bad_words

logger = logging.getLogger("quickdraft")


@dataclass
class SamplingSeq:
    """A sequence that samples this step: its rows of the step's logits start at ``first_row``
    (the law of its next token), followed by one row per drafted token; sampling or
    verification fills in what it emits."""

    seq: Sequence
    first_row: int
    draft: Draft | None
    emitted: list[int] = field(default_factory=list)  # accepted drafts, then one sampled token
    num_accepted: int = 0
    logprobs: list[LogprobEntry] | None = None  # of the emitted tokens, if the request asked

    @property
    def draft_ids(self) -> list[int]:
        return self.draft.token_ids if self.draft else []


class LLMEngine:
    log_interval_s = 5.0

    def __init__(self, config: EngineConfig, loaded: LoadedModel,
                 speculative_config: SpeculativeConfig | None = None, draft: LoadedModel | None = None) -> None:
        self.config = config
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(loaded.model, config.num_kv_blocks, config.block_size, config.dtype, config.device)
        eos = set(loaded.config.eos_token_ids)
        eos.update(_as_id_list(loaded.generation_config.get("eos_token_id")))
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids, config.max_model_len)
        self.structured = StructuredOutputManager(config.structured_outputs_backend, self.tokenizer,
                                                  loaded.config.vocab_size, sorted(self.eos_token_ids))
        # Seeds for requests without one: reproducible from the engine seed and arrival order.
        self._seed_rng = random.Random(config.seed)
        self.requests: dict[str, Request] = {}
        self._failed: dict[str, RequestError] = {}  # requests failed in the current step
        self._next_seq_id = 0
        self._arrivals = 0
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self._last_log_time = time.time()
        self.speculative_config = speculative_config
        self.proposer: Proposer | None = None
        self.spec_stats: SpecDecodeStats | None = None
        if speculative_config is not None:
            self.spec_stats = SpecDecodeStats(speculative_config.num_speculative_tokens)
            k = speculative_config.num_speculative_tokens
            draft_runner = None
            if speculative_config.method == "grammar":
                self.proposer = GrammarProposer()
            elif speculative_config.method == "ngram":
                self.proposer = NgramProposer(speculative_config.prompt_lookup_min, speculative_config.prompt_lookup_max)
            elif speculative_config.method == "suffix":
                self.proposer = SuffixProposer(SuffixCache(
                    speculative_config.suffix_decoding_max_tree_depth,
                    speculative_config.suffix_decoding_max_cached_requests,
                    speculative_config.suffix_decoding_max_spec_factor,
                    speculative_config.suffix_decoding_min_token_prob))
            else:
                assert draft is not None
                draft_runner = ModelRunner(draft.model, config.num_kv_blocks, config.block_size,
                                           draft.model.embed_tokens.dtype, config.device)
                draft_len = min(draft.config.max_position_embeddings, config.max_model_len)
                self.proposer = DraftModelProposer(draft_runner, self.block_manager, self.eos_token_ids,
                                                   speculative_config.rejection_sample_method, draft_len)
            if speculative_config.draft_length_policy == "fixed" or speculative_config.method == "grammar":
                self.draft_policy = DraftLengthPolicy(k, fixed=True)
            else:
                max_len = getattr(self.proposer, "max_len", None)
                costs = measure_step_costs(self.runner, self.block_manager, k, draft_runner, max_len=max_len)
                # Steps of up to 128 rows, within the batch budget, the context and the KV cache.
                room = min(config.max_model_len, config.num_kv_blocks * config.block_size)
                rows = tuple(r for r in BATCH_ROWS if r <= min(config.max_num_batched_tokens, room // 2))
                row_time = (measure_row_times(self.runner, self.block_manager, rows, max_len=room)
                            if len(rows) > 1 else None)
                self.draft_policy = DraftLengthPolicy(k, step_cost=costs, row_time=row_time)
                logger.info("Speculative step cost (plain step = 1) by draft length 0..%d: %s; drafting pays "
                            "from an acceptance rate of %.2f", k, " ".join(f"{c:.2f}" for c in costs),
                            self.draft_policy.break_even())

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float | None = None) -> None:
        """Queue a request. Raises ValueError (and queues nothing) if it is invalid."""
        if request_id in self.requests:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        prompt_token_ids = self.validate_request(prompt_token_ids, params)
        bad_words = encode_bad_words(self.tokenizer, params.bad_words) if params.bad_words else []
        so = params.structured_outputs
        grammars = [self.structured.grammar_for(so) for _ in range(params.n)] if so is not None else [None] * params.n
        max_len = self.config.max_model_len
        room = max_len - len(prompt_token_ids)
        max_out = room if params.max_tokens is None else min(params.max_tokens, room)
        metrics = RequestMetrics(arrival_time=arrival_time or time.time(), num_prompt_tokens=len(prompt_token_ids))
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(64)
        seqs = []
        for index in range(params.n):
            seq = Sequence(seq_id=self._next_seq_id, request_id=request_id, index=index,
                           prompt_token_ids=list(prompt_token_ids), params=params, seed=seed,
                           arrival_order=self._arrivals, max_output_tokens=max_out,
                           bad_words_token_ids=bad_words, grammar=grammars[index])
            self.output_processor.init_sequence(seq)
            self._next_seq_id += 1
            seqs.append(seq)
        self._arrivals += 1
        self.requests[request_id] = Request(request_id, prompt, list(prompt_token_ids), params, seqs, metrics,
                                            prompt_logprobs=None if params.prompt_logprobs is None else [None])
        for seq in seqs:
            self.scheduler.add(seq)

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> list[int]:
        """Check a request against the model (vocabulary, context) before anything is queued;
        returns the prompt as it will run (``truncate_prompt_tokens`` applied)."""
        if params.truncate_prompt_tokens is not None:
            prompt_token_ids = prompt_token_ids[-params.truncate_prompt_tokens:]
        self.validate_prompt(prompt_token_ids)
        if params.structured_outputs is not None:
            self.structured.compile(params.structured_outputs)  # ValueError if it does not compile (cached)
        vocab = self.model_config.vocab_size
        most = vocab if self.config.max_logprobs < 0 else min(self.config.max_logprobs, vocab)
        for name, kind, value in (("logprobs", "sample", params.logprobs),
                                  ("prompt_logprobs", "prompt", params.prompt_logprobs)):
            if value is not None and value > most:
                raise ValueError(f"{name} must be at most {most} (the engine's max_logprobs; {kind} logprobs), "
                                 f"got {value}.")
        for name, ids in (("logit_bias", params.logit_bias or {}), ("allowed_token_ids", params.allowed_token_ids or [])):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise ValueError(f"{name} contains out-of-vocabulary token id {bad[0]} (vocab size {vocab}).")
        return list(prompt_token_ids)

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise ValueError("The prompt is empty: give at least one token.")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"Token id {bad[0]!r} is out of vocabulary (vocab size {vocab}).")
        n, max_len = len(prompt_token_ids), self.config.max_model_len
        if n >= max_len:
            raise ValueError(
                f"The prompt (length {n}) is longer than the maximum model length of {max_len}"
                + (" (it must leave room for at least one generated token)." if n == max_len else "."))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self._finish(seq)
        req.metrics.finished_time = time.time()
        return self.output_processor.make_output(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step -------------------------------------------------------------------------
    def step(self, stream: bool = False) -> list[RequestOutput]:
        """One step: schedule -> propose -> run -> sample or verify -> postprocess. Returns the
        outputs of requests that finished in it or, with ``stream``, of every request that got
        new tokens (cumulative text and tokens so far; ``finished`` tells which are done).
        A failure that belongs to one request (engine/errors.py) aborts that request alone: its
        output, finished with ``error`` set, is among those returned."""
        self._failed = {}
        lookahead = self._lookahead if self.proposer is not None else None
        sched = self.scheduler.schedule(lookahead)
        if not sched.scheduled:
            if self._failed:  # failed while being scheduled
                return self._postprocess([], stream)
            if self.scheduler.has_unfinished():
                raise RuntimeError("The scheduler could not schedule any sequence: the KV cache is too small.")
            return []
        now = time.time()
        noise = NoiseCache(self.model_config.vocab_size, self.config.device)
        drafts = self._propose(sched.scheduled, noise)
        inputs, samplers, prompt_lp = self._prepare(sched.scheduled, drafts, now)
        logits = self.runner.execute(inputs)  # [rows, vocab]
        # Each scheduled sequence owns len(tokens) - logits_from consecutive rows: its prompt-logprob
        # rows (if any), then, if it samples, 1 + len(draft) verification rows.
        row = 0
        sampling: list[SamplingSeq] = []
        for item, inp, samples, wants_prompt_lp in zip(sched.scheduled, inputs, samplers, prompt_lp):
            n_rows = len(inp.token_ids) - inp.logits_from
            if wants_prompt_lp:
                self.output_processor.add_prompt_logprobs(self.requests[item.seq.request_id],
                                                          logits[row:row + n_rows], inp.start_pos)
            if samples:
                draft = drafts.get(item.seq.seq_id)
                sampling.append(SamplingSeq(item.seq, row + n_rows - 1 - (len(draft.token_ids) if draft else 0),
                                            draft))
            row += n_rows
        self._mask(logits, sampling)
        sampling = self._live(sampling)
        if self.proposer is None or not any(s.draft for s in sampling):  # nothing to verify: plain sampling
            self._sample(sampling, logits, noise)
        else:
            self._verify(sampling, logits, noise)
        sampling = self._live(sampling)  # less those whose law had no token to draw
        self._logprobs(sampling, logits)
        for item, samples in zip(sched.scheduled, samplers):
            item.seq.num_computed_tokens += item.num_tokens
            if not samples and item.seq.request_id not in self._failed:
                self._cache_blocks(item.seq)  # a prompt chunk; sampling sequences are cached in _postprocess
        return self._postprocess(sampling, stream)

    def _fail(self, request_id: str, error: Exception, doing: str | None = None) -> None:
        """Mark a request failed in this step (it is aborted in _postprocess)."""
        if request_id in self._failed:
            return
        if not isinstance(error, RequestError):
            logger.error("Request %s failed while %s; aborting it alone", request_id, doing, exc_info=error)
            error = RequestError(request_id, f"the engine failed while {doing} ({type(error).__name__}); "
                                             "the other requests go on")
        self._failed[request_id] = error

    def _live(self, sampling: list[SamplingSeq]) -> list[SamplingSeq]:
        """Those of the sequences whose request has not failed in this step."""
        return [s for s in sampling if s.seq.request_id not in self._failed]

    def _mask(self, logits: torch.Tensor, sampling: list[SamplingSeq]) -> None:
        """Structured outputs: the masked law at every position sampled or verified."""
        constrained = [s for s in self._live(sampling) if s.seq.grammar is not None]
        if not constrained:
            return
        errors = self.structured.mask_rows(logits, [(s.seq.grammar, s.first_row, s.draft_ids)
                                                     for s in constrained])
        for i, e in errors.items():
            self._fail(constrained[i].seq.request_id, e, "masking its rows with its grammar")

    def _lookahead(self, seq: Sequence) -> int:
        """Draft slots a decoding sequence may use: k, within the context and the output budget
        (the step also emits one token of its own) and the batch-size rules of the config, then
        what the adaptive policy allows."""
        spec = self.speculative_config
        batch = len(self.scheduler.running)
        room = min(self.config.max_model_len - seq.num_tokens, seq.max_output_tokens - seq.num_output_tokens,
                   spec.draft_length_for_batch(batch) + 1) - 1
        if room <= 0:
            return 0
        forced = self._forced(seq, room)
        if seq.request_id in self._failed:
            return 0
        return max(len(forced), self._method_lookahead(seq, room, batch))

    def _method_lookahead(self, seq: Sequence, room: int, batch: int) -> int:
        """Draft slots the speculation method may use (a grammar's forced tokens aside)."""
        spec = self.speculative_config
        if spec.method == "grammar":
            return 0
        policy = self.draft_policy
        if policy.fixed:
            return min(policy.max_k, room)
        if self.proposer.drafts_know_odds:
            # The draft's own odds decide its length (see _propose), within the batch's rows.
            return max(0, min(policy.for_batch(policy.max_k, batch), room))
        if seq.spec_k < 0:
            seq.spec_k = spec.num_speculative_tokens
        cap = policy.for_batch(policy.max_k, batch)
        if cap == 0:
            return 0
        k = policy.worth(min(seq.spec_k, cap), policy.acceptance(seq.spec_hits, seq.spec_misses), batch)
        if k == 0:  # drafts failing or not paying: try one token now and then
            seq.spec_idle_steps += 1
            if seq.spec_idle_steps < policy.probe_interval:
                return 0
            seq.spec_k, seq.spec_idle_steps, k = max(seq.spec_k, 1), 0, 1
        return max(0, min(k, room))

    def _propose(self, scheduled: list[ScheduledSeq], noise: NoiseCache) -> dict[int, Draft]:
        # A grammar's forced tokens come first; the method drafts what follows them. (A request
        # failed while scheduled has no lookahead; one whose grammar fails here is not drafted for.)
        with_forced = [(it, self._forced(it.seq, it.num_lookahead)) for it in scheduled if it.num_lookahead > 0]
        with_forced = [(it, f) for it, f in with_forced if it.seq.request_id not in self._failed]
        if not with_forced:
            return {}
        items, forced = [it for it, _ in with_forced], [f for _, f in with_forced]
        seqs = [it.seq for it in items]
        proposals = self._proposals(seqs, [it.num_lookahead - len(f) for it, f in zip(items, forced)], noise, forced)
        for s, f, d in zip(seqs, forced, proposals):
            if f:
                d.token_ids[:0] = f
                if d.probs is not None:  # forced tokens: a point mass for the standard rule too
                    d.probs = torch.cat([torch.nn.functional.one_hot(torch.tensor(f, device=d.probs.device),
                                                                     d.probs.shape[1]).to(d.probs.dtype), d.probs])
                if d.confidence is not None:
                    d.confidence[:0] = [1.0] * len(f)
                d.source = "grammar"  # metrics: drafts led by forced tokens
            if s.grammar is not None and d.token_ids:
                try:
                    self._cut(d, self.structured.valid_prefix(s.grammar, d.token_ids))
                except Exception as e:  # noqa: BLE001 - this sequence's grammar only
                    self._fail(s.request_id, e, "checking its draft against its grammar")
                    self._cut(d, 0)
        policy = self.draft_policy
        for it, d in zip(items, proposals):
            if d.confidence is not None and d.token_ids:
                # Drafts that know their odds: verify only the prefix that pays most, by the odds
                # capped with the sequence's own record; when none pays, probe one token now and
                # then so that the record can recover.
                seq = it.seq
                p = policy.acceptance(seq.spec_hits, seq.spec_misses)
                keep = policy.trim(d.confidence, p, len(self.scheduler.running))
                if keep == 0 and not policy.fixed:
                    seq.spec_idle_steps += 1
                    if seq.spec_idle_steps >= policy.probe_interval:
                        seq.spec_idle_steps, keep = 0, 1
                self._cut(d, keep)
        return {it.seq.seq_id: d for it, d in zip(items, proposals) if d.token_ids}

    def _forced(self, seq: Sequence, k: int) -> list[int]:
        """Up to k tokens the sequence's grammar determines (none without a grammar, or when
        its grammar fails: the request is then failed)."""
        if seq.grammar is None:
            return []
        try:
            return self.structured.forced(seq.grammar, k)
        except Exception as e:  # noqa: BLE001 - this sequence's grammar only
            self._fail(seq.request_id, e, "finding its grammar's forced tokens")
            return []

    def _proposals(self, seqs: list[Sequence], ks: list[int], noise: NoiseCache, after: list[list[int]]
                   ) -> list[Draft]:
        """The proposer's drafts for the batch. If it fails, each sequence is drafted for alone,
        and a sequence whose own drafting fails is failed; the others draft as before."""
        try:
            return self.proposer.propose(seqs, ks, noise, after)
        except Exception:  # noqa: BLE001 - find whose drafting fails
            logger.warning("Drafting for %d sequences failed; drafting for each alone", len(seqs), exc_info=True)
        drafts = []
        for s, k, a in zip(seqs, ks, after):
            try:
                drafts.append(self.proposer.propose([s], [k], noise, [a])[0])
            except Exception as e:  # noqa: BLE001 - this sequence's drafting only
                self._fail(s.request_id, e, "drafting for it")
                drafts.append(Draft([], None))
        return drafts

    @staticmethod
    def _cut(draft: Draft, n: int) -> None:
        """Keep the first n tokens of a draft (and their laws and odds)."""
        del draft.token_ids[n:]
        if draft.confidence is not None:
            del draft.confidence[n:]
        if draft.probs is not None:
            draft.probs = draft.probs[:n]

    def _prepare(self, scheduled: list[ScheduledSeq], drafts: dict[int, Draft], now: float
                 ) -> tuple[list[SeqInput], list[bool], list[bool]]:
        inputs: list[SeqInput] = []
        samplers: list[bool] = []
        prompt_lp: list[bool] = []
        for item in scheduled:
            seq, n = item.seq, item.num_tokens
            req = self.requests[seq.request_id]
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
            start = seq.num_computed_tokens
            if start == 0 and seq.num_preemptions == 0 and seq.index == 0:
                self.num_prompt_tokens_total += seq.num_prompt_tokens
            samples = start + n == seq.num_tokens
            wants = seq.index == 0 and _needs_prompt_logprobs(req, start, n)
            logits_from = 0 if wants else (n - 1 if samples else n)
            draft = drafts.get(seq.seq_id)
            tokens = seq.token_ids[start:start + n] + (draft.token_ids if draft else [])
            inputs.append(SeqInput(tokens, start, self.block_manager.block_table(seq.seq_id), logits_from))
            samplers.append(samples)
            prompt_lp.append(wants)
        return inputs, samplers, prompt_lp

    def _sample(self, sampling: list[SamplingSeq], logits: torch.Tensor, noise: NoiseCache) -> None:
        """Draw each sequence's next token from its first row (no drafts to verify)."""
        if not sampling:
            return
        seqs = [s.seq for s in sampling]
        rows = [s.first_row for s in sampling]
        if rows == list(range(logits.shape[0])):  # decode: one row per sequence, already in order
            seq_logits = logits  # [S, vocab]
        else:
            seq_logits = logits.index_select(0, torch.tensor(rows, device=logits.device))  # [S, vocab]
        md = build_sampling_metadata(seqs, self.eos_token_ids, seq_logits.shape[1], seq_logits.device)
        rows_noise = None if md.all_greedy else noise.rows(
            [None if s.params.greedy else NoiseKey(s.seed, s.index, s.num_output_tokens, TARGET) for s in seqs])
        tokens, best = sample_checked(seq_logits, md, rows_noise)
        for s, token, value in zip(sampling, tokens.tolist(), best.tolist()):
            s.emitted = [token]
            if not math.isfinite(value):
                self._fail(s.seq.request_id, self._no_token_error(s.seq, 0, value))

    def _verify(self, sampling: list[SamplingSeq], logits: torch.Tensor, noise: NoiseCache) -> None:
        """Rejection-sample every sampling sequence's draft (possibly empty) against the target."""
        if not sampling:
            return
        seqs = [s.seq for s in sampling]
        draft_ids = [s.draft_ids for s in sampling]
        rows = [s.first_row + j for s in sampling for j in range(len(s.draft_ids) + 1)]
        row_seqs = [s for s, d in zip(seqs, draft_ids) for _ in range(len(d) + 1)]
        extras = [d[:j] for d in draft_ids for j in range(len(d) + 1)]
        target_logits = logits.index_select(0, torch.tensor(rows, device=logits.device))  # [R, vocab]
        md = build_sampling_metadata(row_seqs, self.eos_token_ids, target_logits.shape[1], target_logits.device,
                                     extra_output_tokens=extras)
        penalized = penalized_logits(target_logits, md)
        target_argmax = argmax_rows(penalized)
        best = drawable(penalized, target_argmax).tolist()
        target_probs = None if md.all_greedy else process_logits(target_logits, md).softmax(dim=-1)
        result = rejection_sample(target_probs, target_argmax, draft_ids,
                                  [s.draft.probs if s.draft else None for s in sampling],
                                  [s.params.greedy for s in seqs], _SequenceNoise(seqs, noise))
        # A row with no token to draw fails its sequence only where verification reached it:
        # drafts rejected before it make the same output plain decoding would.
        row = 0
        for s, emitted, n_acc in zip(sampling, result.emitted, result.num_accepted):
            s.emitted, s.num_accepted = emitted, n_acc
            k = len(s.draft_ids)
            dead = next((j for j in range(k + 1) if not math.isfinite(best[row + j])), None)
            if dead is not None and n_acc >= dead:
                self._fail(s.seq.request_id, self._no_token_error(s.seq, dead, best[row + dead]))
            row += k + 1

    def _no_token_error(self, seq: Sequence, offset: int, value: float) -> RequestError:
        """The error of a sequence whose law at output position num_output_tokens + offset has
        no token to draw (``value``: that row's `drawable` value)."""
        position = seq.num_output_tokens + offset
        p = seq.params
        why = [f"structured_outputs ({p.structured_outputs.kind})"] if seq.grammar is not None else []
        if p.allowed_token_ids is not None:
            why.append(f"allowed_token_ids ({len(p.allowed_token_ids)} ids)")
        if p.bad_words:
            why.append("bad_words")
        if position < p.min_tokens:
            why.append(f"min_tokens={p.min_tokens} (EOS and stop_token_ids banned before {p.min_tokens} tokens)")
        if value == -math.inf and why:
            return UnsatisfiableRequestError(
                seq.request_id, f"no token can be generated at output position {position}: "
                                f"{' and '.join(why)} together allow none.")
        logger.error("Request %s: no token to draw at output position %d (largest logit after masks and bans: %s)",
                     seq.request_id, position, value)
        return RequestError(seq.request_id, f"the model's logits at output position {position} are not finite.")

    def _logprobs(self, sampling: list[SamplingSeq], logits: torch.Tensor) -> None:
        """Raw-distribution logprobs of each emitted token, for the sequences that asked."""
        want = [s for s in sampling if s.seq.params.logprobs is not None]
        if not want:
            return
        rows = [s.first_row + j for s in want for j in range(len(s.emitted))]
        tokens = [t for s in want for t in s.emitted]
        num_top = max(s.seq.params.logprobs for s in want)
        data = [t.tolist() for t in compute_logprobs(
            logits.index_select(0, torch.tensor(rows, device=logits.device)),
            torch.tensor(tokens, device=logits.device), num_top)]
        k = 0
        for s in want:
            s.logprobs = [tuple(x[k + j] for x in data) for j in range(len(s.emitted))]
            k += len(s.emitted)

    def _postprocess(self, sampling: list[SamplingSeq], stream: bool = False) -> list[RequestOutput]:
        finished: list[RequestOutput] = []
        updated: dict[str, Request] = {}
        now = time.time()
        for s in sampling:
            seq = s.seq
            if seq.request_id in self._failed:  # another sequence of its request failed this step
                continue
            req = self.requests[seq.request_id]
            self._append(s)
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            req.metrics.last_token_time = now
            updated[req.request_id] = req
            if seq.finish_reason is not None and seq.request_id not in self._failed:
                self._finish(seq)
                if req.is_finished:
                    req.metrics.finished_time = now
                    finished.append(self.output_processor.make_output(req))
                    del self.requests[seq.request_id]
        for request_id, error in self._failed.items():
            updated.pop(request_id, None)
            out = self.abort_request(request_id)
            if out is not None:
                out.error = error
                finished.append(out)
        self._failed = {}
        self._maybe_log_stats(now)
        if stream:
            done = {o.request_id: o for o in finished}
            return [done.get(rid) or self.output_processor.make_output(req) for rid, req in updated.items()] + [
                o for o in finished if o.request_id not in updated]
        return finished

    def _append(self, s: SamplingSeq) -> None:
        """One sequence's verified tokens: into its output (a failure there, in its grammar or
        its detokenizing, fails its request alone), its cache bookkeeping and the speculation
        counters."""
        seq, draft, n_acc = s.seq, s.draft, s.num_accepted
        req = self.requests[seq.request_id]
        # The accepted drafts' keys/values were computed by this step's forward pass.
        seq.num_computed_tokens += n_acc
        try:
            tokens = s.emitted
            if seq.grammar is not None:  # nothing follows the grammar's end
                tokens = tokens[:self.structured.advance(seq.grammar, tokens)]
            kept = self.output_processor.append_tokens(seq, tokens, s.logprobs)
            if seq.grammar is not None and seq.finish_reason is None and seq.grammar.is_terminated():
                self.output_processor.finish(seq, "stop")  # its stop token kept (ignore_eos)
        except Exception as e:  # noqa: BLE001 - this request's grammar or text only
            self._fail(seq.request_id, e, "processing its output")
            return
        # A stop inside an accepted run drops the tokens after it, whose keys and values were
        # computed too: only those of tokens kept count.
        seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens)
        seq.num_draft_computed_tokens = min(seq.num_draft_computed_tokens, seq.num_tokens - 1)
        self._cache_blocks(seq)  # before a finish frees the blocks: they stay findable
        self.num_generation_tokens_total += kept
        if draft is not None:
            n_draft = len(draft.token_ids)
            seq.spec_k = self.draft_policy.update(seq.spec_k, n_draft, n_acc)
            seq.spec_hits, seq.spec_misses = self.draft_policy.observe(seq.spec_hits, seq.spec_misses,
                                                                       n_draft, n_acc)
            self.spec_stats.observe(n_draft, n_acc, draft.source)
            req.metrics.num_drafts += 1
            req.metrics.num_draft_tokens += n_draft
            req.metrics.num_accepted_tokens += n_acc

    def _finish(self, seq: Sequence) -> None:
        """Free a finished or aborted sequence; a proposer that learns from outputs keeps its own."""
        self.scheduler.finish(seq)
        if self.proposer is not None:
            self.proposer.finish(seq)

    def _cache_blocks(self, seq: Sequence) -> None:
        """Name the sequence's blocks that verified tokens now fill (prefix caching); only
        computed, verified tokens count, never drafts that may be rejected."""
        bm = self.block_manager
        if bm.enable_prefix_caching:
            bm.register(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            if self.proposer is not None:
                bm.mark_draft_valid(seq.seq_id, min(seq.num_draft_computed_tokens, seq.num_computed_tokens))

    def reset_prefix_cache(self) -> bool:
        return self.block_manager.reset_prefix_cache()

    def _maybe_log_stats(self, now: float) -> None:
        if self.config.disable_log_stats or now - self._last_log_time < self.log_interval_s:
            return
        self._last_log_time = now
        sched = self.scheduler
        bm = self.block_manager
        cache = (f", Prefix cache hit rate: {100 * bm.hits / bm.queries:.1f}%" if bm.queries
                 else ", Prefix cache hit rate: -" if bm.enable_prefix_caching else "")
        logger.info("Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%%s, Prompt tokens: %d, "
                    "Generation tokens: %d", len(sched.running), len(sched.waiting), 100 * bm.usage, cache,
                    self.num_prompt_tokens_total, self.num_generation_tokens_total)
        if self.spec_stats is not None:
            logger.info(self.spec_stats.log_line())


def _needs_prompt_logprobs(req: Request, start: int, n: int) -> bool:
    """Whether computing positions [start, start + n) yields prompt logprobs not recorded yet.
    Position i's logits give the entry of prompt token i + 1; entries 1..done are recorded (a
    sequence preempted mid-prompt recomputes from 0 and only fills in the rest)."""
    if req.prompt_logprobs is None:
        return False
    done = len(req.prompt_logprobs) - 1
    return max(start, done) <= min(start + n - 1, len(req.prompt_token_ids) - 2)


class _SequenceNoise:
    """The verifier's view of the step's noise: (sequence i, draft offset j) -> the sequence's
    key at output position num_output_tokens + j."""

    def __init__(self, seqs: list[Sequence], cache: NoiseCache) -> None:
        self.seqs, self.cache = seqs, cache

    def _key(self, i: int, offset: int, stream: int) -> NoiseKey:
        s = self.seqs[i]
        return NoiseKey(s.seed, s.index, s.num_output_tokens + offset, stream)

    def exponential(self, i: int, offset: int, stream: int) -> torch.Tensor:
        return self.cache.exponential(self._key(i, offset, stream))

    def uniform(self, i: int, offset: int) -> float:
        return uniform(self._key(i, offset, ACCEPT))


def _as_id_list(value: int | Iterable[int] | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]
