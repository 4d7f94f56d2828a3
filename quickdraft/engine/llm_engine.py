"""LLMEngine: requests in, outputs out. A step is schedule -> run -> sample -> postprocess."""

from __future__ import annotations

import time
from typing import Iterable

import torch

from quickdraft.config import EngineConfig
from quickdraft.engine.block_manager import BlockManager
from quickdraft.engine.model_runner import ModelRunner, SeqInput
from quickdraft.engine.output_processor import OutputProcessor
from quickdraft.engine.scheduler import ScheduledSeq, Scheduler
from quickdraft.engine.sequence import Request, Sequence
from quickdraft.models.loader import LoadedModel
from quickdraft.outputs import RequestMetrics, RequestOutput
from quickdraft.sample.sampler import compute_logprobs, sample
from quickdraft.sample.sampling_metadata import build_sampling_metadata
from quickdraft.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel) -> None:
        self.config = config
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(loaded.model, config.num_kv_blocks, config.block_size, config.dtype, config.device)
        eos = set(loaded.config.eos_token_ids)
        eos.update(_as_id_list(loaded.generation_config.get("eos_token_id")))
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids, config.max_model_len)
        self.generator = torch.Generator(device=config.device)
        self.generator.manual_seed(config.seed)
        self.requests: dict[str, Request] = {}
        self._next_seq_id = 0
        self._arrivals = 0
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        self.validate_prompt(prompt_token_ids)
        max_len = self.config.max_model_len
        room = max_len - len(prompt_token_ids)
        max_out = room if params.max_tokens is None else min(params.max_tokens, room)
        metrics = RequestMetrics(arrival_time=arrival_time or time.time(), num_prompt_tokens=len(prompt_token_ids))
        seqs = []
        for index in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.config.device)
                generator.manual_seed(params.seed if index == 0 else hash((params.seed, index)) % (2**63))
            seq = Sequence(seq_id=self._next_seq_id, request_id=request_id, index=index,
                           prompt_token_ids=list(prompt_token_ids), params=params, generator=generator,
                           arrival_order=self._arrivals, max_output_tokens=max_out)
            self.output_processor.init_sequence(seq)
            self._next_seq_id += 1
            seqs.append(seq)
        self._arrivals += 1
        self.requests[request_id] = Request(request_id, prompt, list(prompt_token_ids), params, seqs, metrics)
        for seq in seqs:
            self.scheduler.add(seq)

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise ValueError("The prompt is empty: give at least one token.")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
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
                self.scheduler.finish(seq)
        req.metrics.finished_time = time.time()
        return self.output_processor.make_output(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns the outputs of requests that finished in it."""
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            if self.scheduler.has_unfinished():
                raise RuntimeError("The scheduler could not schedule any sequence: the KV cache is too small.")
            return []
        now = time.time()
        inputs, samplers, prompt_lp = self._prepare(sched.scheduled, now)
        logits = self.runner.execute(inputs)  # [rows, vocab]
        # Rows are laid out per scheduled sequence: its prompt-logprob rows, then its sampling row.
        row = 0
        sample_rows: list[int] = []
        rows_per_seq = [len(inp.token_ids) - inp.logits_from for inp in inputs]
        for item, inp, n_rows, samples, wants_prompt_lp in zip(sched.scheduled, inputs, rows_per_seq, samplers, prompt_lp):
            if wants_prompt_lp:
                self.output_processor.add_prompt_logprobs(self.requests[item.seq.request_id],
                                                          logits[row:row + n_rows], inp.start_pos)
            if samples:
                sample_rows.append(row + n_rows - 1)
            row += n_rows
        sampled_seqs = [item.seq for item, s in zip(sched.scheduled, samplers) if s]
        new_tokens: list[int] = []
        logprob_data = None
        if sampled_seqs:
            rows_t = torch.tensor(sample_rows, device=logits.device)
            seq_logits = logits.index_select(0, rows_t)  # [S, vocab]
            md = build_sampling_metadata(sampled_seqs, self.eos_token_ids, seq_logits.shape[1], seq_logits.device)
            tokens = sample(seq_logits, md, self.generator)
            num_top = max((s.params.logprobs or 0) for s in sampled_seqs)
            if any(s.params.logprobs is not None for s in sampled_seqs):
                logprob_data = [t.tolist() for t in compute_logprobs(seq_logits, tokens, num_top)]
            new_tokens = tokens.tolist()
        for item in sched.scheduled:
            item.seq.num_computed_tokens += item.num_tokens
        finished: list[RequestOutput] = []
        now = time.time()
        for i, (seq, token) in enumerate(zip(sampled_seqs, new_tokens)):
            req = self.requests[seq.request_id]
            lp = None if logprob_data is None else tuple(x[i] for x in logprob_data)
            self.output_processor.append_tokens(seq, [token], [lp] if seq.params.logprobs is not None else None)
            self.num_generation_tokens_total += 1
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            req.metrics.last_token_time = now
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                if req.is_finished:
                    req.metrics.finished_time = now
                    finished.append(self.output_processor.make_output(req))
                    del self.requests[seq.request_id]
        return finished

    def _prepare(self, scheduled: list[ScheduledSeq], now: float) -> tuple[list[SeqInput], list[bool], list[bool]]:
        inputs: list[SeqInput] = []
        samplers: list[bool] = []
        prompt_lp: list[bool] = []
        for item in scheduled:
            seq, n = item.seq, item.num_tokens
            req = self.requests[seq.request_id]
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
            start = seq.num_computed_tokens
            if start == 0 and seq.num_preemptions == 0:
                self.num_prompt_tokens_total += seq.num_prompt_tokens if seq.index == 0 else 0
            samples = start + n == seq.num_tokens
            wants = (req.params.prompt_logprobs is not None and seq.index == 0 and seq.num_preemptions == 0
                     and start < seq.num_prompt_tokens)
            logits_from = 0 if wants else (n - 1 if samples else n)
            inputs.append(SeqInput(seq.token_ids[start:start + n], start, self.block_manager.block_table(seq.seq_id),
                                   logits_from))
            samplers.append(samples)
            prompt_lp.append(wants)
        return inputs, samplers, prompt_lp


def _as_id_list(value: int | Iterable[int] | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]
