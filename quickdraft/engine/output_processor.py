"""Turns sampled tokens into outputs: incremental detokenization, stop conditions (EOS, stop
token ids, stop strings, length), logprobs, and the final RequestOutput."""

from __future__ import annotations

import torch

from quickdraft.engine.sequence import Request, Sequence
from quickdraft.outputs import CompletionOutput, Logprob, RequestOutput
from quickdraft.sample.sampler import compute_logprobs
from quickdraft.tokenizer import Tokenizer, detokenize_incrementally

# Prompt tokens decoded together with the first output tokens, so that merges and leading
# spaces come out as they would in the full text.
_DETOKENIZE_CONTEXT = 5

# (top_ids, top_logprobs, chosen_logprob, chosen_rank) of one position.
LogprobEntry = tuple[list[int], list[float], float, int]


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, eos_token_ids: frozenset[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def init_sequence(self, seq: Sequence) -> None:
        seq.read_offset = seq.num_prompt_tokens
        seq.prefix_offset = max(seq.num_prompt_tokens - _DETOKENIZE_CONTEXT, 0)
        if seq.params.logprobs is not None:
            seq.logprobs = []

    def _logprob_dict(self, token: int, entry: LogprobEntry) -> dict[int, Logprob]:
        top_ids, top_lps, chosen_lp, chosen_rank = entry
        text = self.tokenizer.token_text
        out = {t: Logprob(lp, r + 1, text(t)) for r, (t, lp) in enumerate(zip(top_ids, top_lps))}
        out[token] = Logprob(chosen_lp, chosen_rank, text(token))
        return out

    def append_tokens(self, seq: Sequence, tokens: list[int], logprobs: list[LogprobEntry] | None) -> int:
        """Append sampled tokens in order until one finishes the sequence; returns how many were
        kept. Text, token ids and logprobs are cut together at the finishing token."""
        params = seq.params
        kept = 0
        for i, token in enumerate(tokens):
            seq.token_ids.append(token)
            kept += 1
            if logprobs is not None and seq.logprobs is not None:
                top_ids, top_lps, chosen_lp, rank = logprobs[i]
                # The batch computes the largest top-N any row asked for; keep this request's N.
                n_top = params.logprobs
                seq.logprobs.append(self._logprob_dict(token, (top_ids[:n_top], top_lps[:n_top], chosen_lp, rank)))
                seq.cumulative_logprob += chosen_lp
            n_out = seq.num_output_tokens
            check_stops = n_out >= params.min_tokens
            if check_stops and not params.ignore_eos and token in self.eos_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", None
            elif check_stops and token in params.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
            else:
                if params.detokenize:
                    self._detokenize(seq)
                    # vLLM: a stop string counts only once it is completed after min_tokens tokens.
                    if params.stop and n_out > params.min_tokens:
                        self._check_stop_strings(seq)
                if seq.finish_reason is None and (
                        n_out >= seq.max_output_tokens or seq.num_tokens >= self.max_model_len):
                    seq.finish_reason = "length"
            if seq.finish_reason is not None:
                if params.detokenize and not (seq.finish_reason == "stop" and isinstance(seq.stop_reason, str)):
                    # EOS / stop token (its own text excluded) or length: emit text still held back
                    # for an incomplete character, so the text is the decode of the kept tokens.
                    self._flush_text(seq, seq.num_tokens - (1 if seq.finish_reason == "stop" else 0))
                break
        return kept

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish a sequence for a reason found outside (its grammar ended), its text complete."""
        seq.finish_reason, seq.stop_reason = reason, None
        if seq.params.detokenize:
            self._flush_text(seq, seq.num_tokens)

    def _flush_text(self, seq: Sequence, end: int) -> None:
        if seq.read_offset >= end:
            return
        delta, seq.prefix_offset, seq.read_offset = detokenize_incrementally(
            self.tokenizer, seq.token_ids[:end], seq.prefix_offset, seq.read_offset,
            seq.params.skip_special_tokens, seq.params.spaces_between_special_tokens, final=True)
        seq.output_text += delta

    def _detokenize(self, seq: Sequence) -> None:
        delta, seq.prefix_offset, seq.read_offset = detokenize_incrementally(
            self.tokenizer, seq.token_ids, seq.prefix_offset, seq.read_offset,
            seq.params.skip_special_tokens, seq.params.spaces_between_special_tokens)
        seq.output_text += delta
        seq.last_delta_len = len(delta)

    def _check_stop_strings(self, seq: Sequence) -> None:
        text = seq.output_text
        new_len = seq.last_delta_len
        best: tuple[int, str] | None = None
        for stop in seq.params.stop:
            start = max(0, len(text) - new_len - len(stop) + 1)
            idx = text.find(stop, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is not None:
            idx, stop = best
            seq.output_text = text[:idx + len(stop)] if seq.params.include_stop_str_in_output else text[:idx]
            seq.finish_reason, seq.stop_reason = "stop", stop

    def add_prompt_logprobs(self, req: Request, logits: torch.Tensor, start_pos: int) -> None:
        """logits: [n, vocab] for prompt positions start_pos.. ; row r predicts token start_pos+r+1.
        Entries already recorded (before a preemption) are kept, not appended twice."""
        prompt = req.prompt_token_ids
        skip = max(0, len(req.prompt_logprobs) - 1 - start_pos)  # rows whose entries exist
        n = min(logits.shape[0], len(prompt) - 1 - start_pos)
        if n <= skip:
            return
        targets = torch.tensor(prompt[start_pos + 1 + skip:start_pos + 1 + n], device=logits.device)
        entries = zip(*[t.tolist() for t in compute_logprobs(logits[skip:n], targets, req.params.prompt_logprobs)])
        for token, entry in zip(targets.tolist(), entries):
            req.prompt_logprobs.append(self._logprob_dict(token, entry))

    def make_output(self, req: Request) -> RequestOutput:
        outputs = []
        for seq in req.seqs:
            wants_lp = seq.params.logprobs is not None
            outputs.append(CompletionOutput(
                index=seq.index, text=seq.output_text, token_ids=list(seq.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob if wants_lp else None,
                logprobs=seq.logprobs if wants_lp else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        req.metrics.num_generation_tokens = sum(len(o.token_ids) for o in outputs)
        return RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                             prompt_logprobs=req.prompt_logprobs, outputs=outputs, finished=req.is_finished,
                             metrics=req.metrics, num_cached_tokens=req.seqs[0].num_cached_tokens)
