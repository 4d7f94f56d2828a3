"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over one continuously batching engine.

Endpoints: /v1/completions, /v1/chat/completions (streaming as server-sent events ending in
``data: [DONE]``), /v1/models, /tokenize, /detokenize, /health, /metrics (Prometheus), /version.
Errors use OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``: 400 for
invalid parameters or a prompt that does not fit the context, 401 without the API key, 404 for an
unknown model. A client that disconnects aborts its requests, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from tokenizers import decoders

import quickdraft
from quickdraft.entrypoints.async_engine import AsyncLLM, EngineDeadError, RequestGroup
from quickdraft.entrypoints.protocol import (ChatCompletionRequest, ChatMessage, CompletionRequest,
                                             DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest)
from quickdraft.entrypoints.serve_metrics import CONTENT_TYPE, ServeMetrics
from quickdraft.outputs import Logprob, RequestOutput
from quickdraft.sampling_params import SamplingParams, StructuredOutputsParams
from quickdraft.tokenizer import Tokenizer

logger = logging.getLogger("quickdraft.server")

_MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI and vLLM clamp to this
_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowedError", 413: "RequestTooLargeError", 500: "InternalServerError",
                503: "ServiceUnavailableError"}
_SAMPLING_FIELDS = {"n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p",
                    "top_k", "min_p", "seed", "stop", "stop_token_ids", "max_tokens", "min_tokens", "logprobs",
                    "prompt_logprobs", "logit_bias", "allowed_token_ids", "bad_words", "truncate_prompt_tokens"}
_SEED_RANGE = (-(2**63), 2**64 - 1)  # OpenAI's int64 seeds and SamplingParams' uint64 ones


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, err_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.err_type = err_type or _ERROR_TYPES.get(status, "APIError")


def error_body(status: int, message: str, param: str | None = None, err_type: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type or _ERROR_TYPES.get(status, "APIError"),
                      "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None, err_type: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, err_type), status_code=status)


def _bad_request(e: Exception, default_param: str | None = None) -> APIError:
    """A 400 from a SamplingParams / engine ValueError; ``param`` is the field it names, if any."""
    message = str(e)
    first = message.split(" ", 1)[0]
    return APIError(400, message, param=first if first in _SAMPLING_FIELDS else default_param)


def _clamp(lp: float) -> float:
    return lp if lp > _MIN_LOGPROB else _MIN_LOGPROB  # also maps -inf and NaN


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ---- token text and bytes ---------------------------------------------------------------------
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte alphabet (printable bytes stand for themselves, the rest at 256+)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _visible_delta(text: str, sent: int, hold: int, finished: bool) -> tuple[str, int]:
    """Text to stream after ``sent`` characters, holding back the last ``hold`` characters
    (a possible stop string) until the sequence finishes; returns (delta, new sent)."""
    end = len(text) if finished else max(sent, len(text) - hold)
    return text[sent:end], end


class TokenTexts:
    """Per-token text (as in vLLM's logprobs: each token decoded on its own) and the token's
    UTF-8 bytes (exact for byte-level BPE, so split characters can be put back together)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        backend = tokenizer.backend
        self._byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        self._byte_decoder = _byte_decoder() if self._byte_level else {}
        self._added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self._bytes: dict[int, list[int]] = {}

    def text(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id)

    def bytes(self, token_id: int, text: str | None = None) -> list[int]:
        b = self._bytes.get(token_id)
        if b is None:
            b = None
            if self._byte_level and token_id not in self._added:
                piece = self.tokenizer.backend.id_to_token(token_id)
                if piece is not None and all(c in self._byte_decoder for c in piece):
                    b = [self._byte_decoder[c] for c in piece]
            if b is None:
                b = list((text if text is not None else self.text(token_id)).encode("utf-8", errors="replace"))
            self._bytes[token_id] = b
        return b


def completion_logprobs(token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob] | None],
                        texts: TokenTexts, text_offset: int) -> tuple[dict, int]:
    """OpenAI completions logprobs {tokens, token_logprobs, top_logprobs, text_offset} of some
    tokens (a None entry is a first prompt token, which has no logprob); returns it and the
    text offset after the last token. top_logprobs holds the top N plus the chosen token."""
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for tid, entry in zip(token_ids, logprobs):
        if entry is None:
            t = texts.text(tid)
            token_lps.append(None)
            tops.append(None)
        else:
            chosen = entry.get(tid)
            t = chosen.decoded_token if chosen is not None and chosen.decoded_token is not None else texts.text(tid)
            token_lps.append(_clamp(chosen.logprob) if chosen is not None else None)
            tops.append({(lp.decoded_token if lp.decoded_token is not None else texts.text(i)): _clamp(lp.logprob)
                         for i, lp in entry.items()})
        tokens.append(t)
        offsets.append(text_offset)
        text_offset += len(t)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}, text_offset


def chat_logprobs(token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob]], texts: TokenTexts,
                  top_n: int) -> list[dict]:
    """OpenAI chat logprobs content entries {token, logprob, bytes, top_logprobs[top_n]}."""
    content = []
    for tid, entry in zip(token_ids, logprobs):
        chosen = entry.get(tid)
        t = chosen.decoded_token if chosen is not None and chosen.decoded_token is not None else texts.text(tid)
        top = []
        for i, lp in list(entry.items())[:top_n]:
            tt = lp.decoded_token if lp.decoded_token is not None else texts.text(i)
            top.append({"token": tt, "logprob": _clamp(lp.logprob), "bytes": texts.bytes(i, tt)})
        content.append({"token": t, "logprob": _clamp(chosen.logprob) if chosen is not None else _MIN_LOGPROB,
                        "bytes": texts.bytes(tid, t), "top_logprobs": top})
    return content


# ---- the server state -------------------------------------------------------------------------
@dataclass
class _Prompt:
    text: str | None
    token_ids: list[int]


class OpenAIServing:
    """Request handling shared by the endpoints: model names, prompts, sampling params, streams."""

    def __init__(self, engine: AsyncLLM, served_model_names: Sequence[str], *, max_logprobs: int = 20,
                 max_n: int | None = None, model_root: str | None = None) -> None:
        if not served_model_names:
            raise ValueError("served_model_names must name at least one model.")
        self.engine = engine
        self.served_model_names = list(served_model_names)
        self.max_logprobs = max_logprobs
        self.max_n = max_n or engine.llm.config.max_num_seqs
        self.model_root = model_root or str(engine.llm.model_path)
        self.tokenizer = engine.tokenizer
        self.texts = TokenTexts(self.tokenizer)
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.llm.model_config.vocab_size
        self.defaults = engine.get_default_sampling_params()
        self.prefix_caching = engine.llm.config.enable_prefix_caching

    # -- checks ---------------------------------------------------------------------------------
    def model_name(self, requested: str | None) -> str:
        if requested is None or requested == "":
            return self.served_model_names[0]
        if requested not in self.served_model_names:
            raise APIError(404, f"The model `{requested}` does not exist.", param="model")
        return requested

    def check_prompt(self, token_ids: list[int], params: SamplingParams, param: str = "prompt") -> list[int]:
        """The prompt as it will run (``truncate_prompt_tokens`` applied), or a 400."""
        if params.truncate_prompt_tokens is not None:
            token_ids = token_ids[-params.truncate_prompt_tokens:]
        n = len(token_ids)
        if n >= self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                f"your request has {n} input tokens, which leaves no room for a completion. "
                                f"Please reduce the length of the input.", param=param)
        try:
            self.engine.validate_request(token_ids, params)
        except ValueError as e:
            if params.structured_outputs is not None and "structured_outputs" in str(e):
                raise APIError(400, str(e), param="response_format") from None
            raise _bad_request(e, default_param=param) from None
        return token_ids

    def sampling_params(self, body: CompletionRequest | ChatCompletionRequest, *, max_tokens: int | None,
                        logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "Stream options can only be defined when `stream=True`.", param="stream_options")
        if body.n > self.max_n:
            raise APIError(400, f"n must be at most {self.max_n}, got {body.n}.", param="n")
        for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if value is not None and not 0 <= value <= self.max_logprobs:
                raise APIError(400, f"{name} must be between 0 and {self.max_logprobs}, got {value}.", param=name)
        if body.seed is not None and not _SEED_RANGE[0] <= body.seed <= _SEED_RANGE[1]:
            raise APIError(400, f"seed must be a 64-bit integer, got {body.seed}.", param="seed")
        d = self.defaults
        top_k = body.top_k
        if top_k is not None and top_k >= self.vocab_size:
            top_k = 0  # keeping every token is no top-k (and keeps huge values out of int64 tensors)

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        structured = _structured_outputs(body)
        try:
            return SamplingParams(
                n=body.n, presence_penalty=pick(body.presence_penalty, 0.0),
                frequency_penalty=pick(body.frequency_penalty, 0.0),
                repetition_penalty=pick(body.repetition_penalty, d.repetition_penalty),
                temperature=pick(body.temperature, d.temperature), top_p=pick(body.top_p, d.top_p),
                top_k=pick(top_k, d.top_k), min_p=pick(body.min_p, d.min_p),
                seed=None if body.seed is None else body.seed % 2**64, stop=body.stop,
                stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos, max_tokens=max_tokens,
                min_tokens=body.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                skip_special_tokens=body.skip_special_tokens,
                spaces_between_special_tokens=body.spaces_between_special_tokens,
                include_stop_str_in_output=body.include_stop_str_in_output, logit_bias=body.logit_bias,
                allowed_token_ids=body.allowed_token_ids, bad_words=body.bad_words,
                truncate_prompt_tokens=body.truncate_prompt_tokens, structured_outputs=structured)
        except (ValueError, TypeError) as e:
            raise _bad_request(e) from None

    # -- prompts ----------------------------------------------------------------------------------
    def completion_prompts(self, body: CompletionRequest) -> list[_Prompt]:
        p = body.prompt
        if isinstance(p, str):
            items: list[str | list[int]] = [p]
        elif p and all(isinstance(x, int) for x in p):
            items = [list(p)]
        else:
            items = list(p)
        if not items:
            raise APIError(400, "prompt must not be empty.", param="prompt")
        out = []
        for item in items:
            if isinstance(item, str):
                out.append(_Prompt(item, self.tokenizer.encode(item, add_special_tokens=body.add_special_tokens)))
            else:
                out.append(_Prompt(None, list(item)))
        return out

    def render_chat(self, messages: list[ChatMessage], *, add_generation_prompt: bool, continue_final_message: bool,
                    chat_template_kwargs: dict[str, Any] | None, add_special_tokens: bool) -> _Prompt:
        if not messages:
            raise APIError(400, "messages must not be empty.", param="messages")
        if continue_final_message and add_generation_prompt:
            raise APIError(400, "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                           param="continue_final_message")
        conversation = []
        for m in messages:
            if m.content is None:
                content = ""
            elif isinstance(m.content, str):
                content = m.content
            else:
                parts = []
                for part in m.content:
                    if part.type != "text" or part.text is None:
                        raise APIError(400, f"Unsupported content part of type {part.type!r}: only 'text' parts "
                                            "are supported.", param="messages")
                    parts.append(part.text)
                content = "\n".join(parts)
            msg = dict(m.model_extra or {})
            msg.update(role=m.role, content=content)
            if m.name is not None:
                msg["name"] = m.name
            conversation.append(msg)
        try:
            text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                      **dict(chat_template_kwargs or {}))
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise APIError(400, f"The chat template could not render these messages: {e}", param="messages") from None
        if continue_final_message:
            last = conversation[-1]["content"]
            idx = text.rfind(last) if last else -1
            if idx != -1:
                text = text[:idx + len(last)]
        return _Prompt(text, self.tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens``: prompt tokens served from
    the prefix cache (absent when prefix caching is off)."""
    usage: dict = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                   "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return usage


def _cached(outputs: Iterable[RequestOutput]) -> int | None:
    counts = [o.num_cached_tokens for o in outputs]
    return None if any(c is None for c in counts) else sum(counts)


class _AbortingStreamingResponse(StreamingResponse):
    """A streaming response that calls ``on_close`` however it ends (finished, client gone,
    server shutting down): unfinished requests are aborted and their KV blocks freed."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:  # noqa: BLE001
                    pass


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _results(request: Request, group: RequestGroup) -> list[RequestOutput] | None:
    """The group's final outputs, or None (requests aborted) if the client went away first."""
    work = asyncio.ensure_future(group.results())
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        watch.cancel()
        group.abort()
        raise
    if work in done:
        watch.cancel()
        return work.result()
    work.cancel()
    group.abort()
    return None


def _engine_failure(e: BaseException) -> APIError:
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e))
    return APIError(500, f"The engine failed this request: {e!r}")


async def _add_all(serving: OpenAIServing, group: RequestGroup, base_id: str, prompts: list[_Prompt],
                   params: SamplingParams, arrival: float) -> None:
    try:
        for i, p in enumerate(prompts):
            await group.add(f"{base_id}-{i}", p.text, p.token_ids, params, arrival)
    except ValueError as e:
        group.abort()
        raise _bad_request(e) from None
    except EngineDeadError as e:
        group.abort()
        raise APIError(503, str(e)) from None
    except BaseException:
        group.abort()
        raise


# ---- completions --------------------------------------------------------------------------------
async def create_completion(serving: OpenAIServing, body: CompletionRequest, request: Request) -> Response:
    arrival = time.time()
    model = serving.model_name(body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported.", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, f"best_of must equal n (best_of > n is not supported), got best_of={body.best_of}, "
                            f"n={body.n}.", param="best_of")
    prompts = serving.completion_prompts(body)
    echo = bool(body.echo)
    params = serving.sampling_params(body, max_tokens=body.max_tokens, logprobs=body.logprobs,
                                     prompt_logprobs=body.logprobs if echo and body.logprobs is not None else None)
    for p in prompts:
        truncated = serving.check_prompt(p.token_ids, params)
        if len(truncated) != len(p.token_ids):
            p.text, p.token_ids = None, truncated  # echo shows what ran
    for p in prompts:
        if echo and p.text is None:
            p.text = serving.tokenizer.decode(p.token_ids, skip_special_tokens=False)
    base_id = _new_id("cmpl")
    group = RequestGroup(serving.engine)
    await _add_all(serving, group, base_id, prompts, params, arrival)
    created = int(arrival)
    if body.stream:
        return _AbortingStreamingResponse(
            _stream_completion(serving, body, group, prompts, params, base_id, model, created), group.abort)
    try:
        results = await _results(request, group)
    except Exception as e:  # noqa: BLE001
        raise _engine_failure(e) from None
    if results is None:
        return Response(status_code=499)
    choices = []
    num_prompt = num_generated = 0
    cached = _cached(results) if serving.prefix_caching else None
    for i, (p, out) in enumerate(zip(prompts, results)):
        num_prompt += len(out.prompt_token_ids)
        for o in out.outputs:
            num_generated += len(o.token_ids)
            text = (p.text or "") + o.text if echo else o.text
            lp = None
            if body.logprobs is not None:
                ids, entries = list(o.token_ids), list(o.logprobs or [])
                if echo:
                    ids = list(out.prompt_token_ids) + ids
                    entries = list(out.prompt_logprobs or [None] * len(out.prompt_token_ids)) + entries
                lp, _ = completion_logprobs(ids, entries, serving.texts, 0)
            choices.append({"index": i * params.n + o.index, "text": text, "logprobs": lp,
                            "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
    return JSONResponse({"id": base_id, "object": "text_completion", "created": created, "model": model,
                         "choices": choices, "usage": _usage(num_prompt, num_generated, cached),
                         "system_fingerprint": None})


async def _stream_completion(serving: OpenAIServing, body: CompletionRequest, group: RequestGroup,
                             prompts: list[_Prompt], params: SamplingParams, base_id: str, model: str,
                             created: int) -> AsyncIterator[str]:
    n = params.n
    hold = params.output_text_buffer_length
    echo = bool(body.echo)
    opts = body.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = include_usage and bool(opts.continuous_usage_stats)
    index_of = {rid: i for i, rid in enumerate(group.request_ids)}
    num_choices = len(prompts) * n
    sent_text = [0] * num_choices
    sent_tokens = [0] * num_choices
    offsets = [0] * num_choices
    done = [False] * num_choices
    prompt_tokens = {i: len(p.token_ids) for i, p in enumerate(prompts)}
    cached: dict[int, int | None] = {}
    generated = [0] * num_choices

    def chunk(choice: dict, usage: dict | None = None) -> str:
        data = {"id": base_id, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
        if include_usage:
            data["usage"] = usage
        return _sse(data)

    def usage_now() -> dict:
        known = serving.prefix_caching and len(cached) == len(prompts) and None not in cached.values()
        return _usage(sum(prompt_tokens.values()), sum(generated), sum(cached.values()) if known else None)

    try:
        if echo:  # the prompt first; its logprobs (computed by the engine) come with the first output
            for i, p in enumerate(prompts):
                for j in range(n):
                    yield chunk({"index": i * n + j, "text": p.text or "", "logprobs": None, "finish_reason": None,
                                 "stop_reason": None}, usage_now() if continuous else None)
                    offsets[i * n + j] = len(p.text or "")
        echo_lp_pending = set(range(num_choices)) if echo and body.logprobs is not None else set()
        async for updates in group:
            for rid, out in updates.items():
                i = index_of[rid]
                cached[i] = out.num_cached_tokens
                for o in out.outputs:
                    ci = i * n + o.index
                    if done[ci]:
                        continue
                    finished = o.finish_reason is not None
                    delta, end = _visible_delta(o.text, sent_text[ci], hold, finished)
                    if not delta and not finished:
                        continue
                    lp = None
                    if body.logprobs is not None:
                        ids = list(o.token_ids[sent_tokens[ci]:])
                        entries = list((o.logprobs or [])[sent_tokens[ci]:len(o.token_ids)])
                        if ci in echo_lp_pending:
                            echo_lp_pending.discard(ci)
                            ids = list(out.prompt_token_ids) + ids
                            entries = list(out.prompt_logprobs or [None] * len(out.prompt_token_ids)) + entries
                            offsets[ci] = 0  # offsets count from the start of the echoed prompt
                        lp, offsets[ci] = completion_logprobs(ids, entries, serving.texts, offsets[ci])
                    sent_text[ci] = end
                    sent_tokens[ci] = len(o.token_ids)
                    generated[ci] = len(o.token_ids)
                    done[ci] = finished
                    choice = {"index": ci, "text": delta, "logprobs": lp,
                              "finish_reason": o.finish_reason if finished else None,
                              "stop_reason": o.stop_reason if finished else None}
                    yield chunk(choice, usage_now() if continuous else None)
        if include_usage:
            yield _sse({"id": base_id, "object": "text_completion", "created": created, "model": model,
                        "choices": [], "usage": usage_now()})
    except Exception as e:  # noqa: BLE001 - the engine failed: tell the client in-band
        err = _engine_failure(e)
        yield _sse(error_body(err.status, err.message))
    yield "data: [DONE]\n\n"


def _structured_outputs(body: CompletionRequest | ChatCompletionRequest) -> StructuredOutputsParams | None:
    """The request's constraint: OpenAI's ``response_format`` (json_object, json_schema) or
    vLLM's ``structured_outputs`` (extra_body), not both; a 400 naming the problem otherwise."""
    fmt = body.response_format
    fmt_type = None if fmt is None or fmt.type == "text" else fmt.type
    if fmt_type is not None and body.structured_outputs is not None:
        raise APIError(400, "Give either response_format or structured_outputs, not both.", param="response_format")
    try:
        if body.structured_outputs is not None:
            return StructuredOutputsParams.from_dict(body.structured_outputs)
        if fmt_type is None:
            return None
        if fmt_type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if fmt_type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.json_schema is None:
                raise APIError(400, "response_format of type 'json_schema' needs json_schema.schema.",
                               param="response_format")
            return StructuredOutputsParams(json=fmt.json_schema.json_schema)
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e), param="structured_outputs" if body.structured_outputs is not None
                       else "response_format") from None
    raise APIError(400, f"response_format type must be 'text', 'json_object' or 'json_schema', got {fmt.type!r}.",
                   param="response_format")


# ---- chat completions ---------------------------------------------------------------------------
async def create_chat_completion(serving: OpenAIServing, body: ChatCompletionRequest, request: Request) -> Response:
    arrival = time.time()
    model = serving.model_name(body.model)
    if body.chat_template is not None:
        raise APIError(400, "A chat template in the request is not accepted; the server uses the model's own.",
                       param="chat_template")
    if body.tools and body.tool_choice != "none":
        raise APIError(400, "Tool calling is not supported.", param="tools")
    if body.top_logprobs is not None:
        if not body.logprobs:
            raise APIError(400, "when using `top_logprobs`, `logprobs` must be set to true.", param="top_logprobs")
    top_n = (body.top_logprobs or 0) if body.logprobs else None
    prompt = serving.render_chat(body.messages, add_generation_prompt=body.add_generation_prompt,
                                 continue_final_message=body.continue_final_message,
                                 chat_template_kwargs=body.chat_template_kwargs,
                                 add_special_tokens=body.add_special_tokens)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = serving.sampling_params(body, max_tokens=max_tokens, logprobs=top_n)
    prompt.token_ids = serving.check_prompt(prompt.token_ids, params, param="messages")
    base_id = _new_id("chatcmpl")
    group = RequestGroup(serving.engine)
    await _add_all(serving, group, base_id, [prompt], params, arrival)
    created = int(arrival)
    if body.stream:
        return _AbortingStreamingResponse(
            _stream_chat(serving, body, group, prompt, params, base_id, model, created, top_n), group.abort)
    try:
        results = await _results(request, group)
    except Exception as e:  # noqa: BLE001
        raise _engine_failure(e) from None
    if results is None:
        return Response(status_code=499)
    out = results[0]
    choices = []
    for o in out.outputs:
        lp = None
        if top_n is not None:
            lp = {"content": chat_logprobs(o.token_ids, o.logprobs or [], serving.texts, top_n)}
        choices.append({"index": o.index, "message": {"role": "assistant", "content": o.text, "tool_calls": []},
                        "logprobs": lp, "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
    usage = _usage(len(out.prompt_token_ids), sum(len(o.token_ids) for o in out.outputs),
                   out.num_cached_tokens if serving.prefix_caching else None)
    return JSONResponse({"id": base_id, "object": "chat.completion", "created": created, "model": model,
                         "choices": choices, "usage": usage, "system_fingerprint": None})


async def _stream_chat(serving: OpenAIServing, body: ChatCompletionRequest, group: RequestGroup, prompt: _Prompt,
                       params: SamplingParams, base_id: str, model: str, created: int,
                       top_n: int | None) -> AsyncIterator[str]:
    n = params.n
    hold = params.output_text_buffer_length
    opts = body.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = include_usage and bool(opts.continuous_usage_stats)
    sent_text = [0] * n
    sent_tokens = [0] * n
    generated = [0] * n
    done = [False] * n
    num_prompt = len(prompt.token_ids)
    cached: int | None = None

    def chunk(choice: dict, usage: dict | None = None) -> str:
        data = {"id": base_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
        if include_usage:
            data["usage"] = usage
        return _sse(data)

    try:
        for j in range(n):
            yield chunk({"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}, _usage(num_prompt, 0) if continuous else None)
        async for updates in group:
            for out in updates.values():
                if serving.prefix_caching:
                    cached = out.num_cached_tokens
                for o in out.outputs:
                    j = o.index
                    if done[j]:
                        continue
                    finished = o.finish_reason is not None
                    delta, end = _visible_delta(o.text, sent_text[j], hold, finished)
                    if not delta and not finished:
                        continue
                    lp = None
                    if top_n is not None:
                        lp = {"content": chat_logprobs(o.token_ids[sent_tokens[j]:],
                                                       (o.logprobs or [])[sent_tokens[j]:len(o.token_ids)],
                                                       serving.texts, top_n)}
                    sent_text[j] = end
                    sent_tokens[j] = len(o.token_ids)
                    generated[j] = len(o.token_ids)
                    done[j] = finished
                    choice = {"index": j, "delta": {"content": delta} if delta or not finished else {},
                              "logprobs": lp, "finish_reason": o.finish_reason if finished else None}
                    if finished:
                        choice["stop_reason"] = o.stop_reason
                    yield chunk(choice, _usage(num_prompt, sum(generated), cached) if continuous else None)
        if include_usage:
            yield _sse({"id": base_id, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": _usage(num_prompt, sum(generated), cached)})
    except Exception as e:  # noqa: BLE001
        err = _engine_failure(e)
        yield _sse(error_body(err.status, err.message))
    yield "data: [DONE]\n\n"


# ---- the app -----------------------------------------------------------------------------------
class _APIKeyMiddleware:
    """Every path but /health needs ``Authorization: Bearer <key>`` (pure ASGI: streams pass through)."""

    open_paths = frozenset({"/health"})

    def __init__(self, app: Callable[..., Awaitable[None]], api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http" or scope.get("path") in self.open_paths:
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("authorization", "").encode()
        if not secrets.compare_digest(given, self.expected):
            response = error_response(401, "Invalid or missing API key: send `Authorization: Bearer <key>`.")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line from pydantic's errors, and the first field they name."""
    parts: list[str] = []
    param = None
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return f"Invalid JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        # Union members add their type names to the location; keep the field path only.
        loc = [x for x in loc if x.lower() not in _UNION_TAGS and not any(c in x for c in "[]-")]
        where = ".".join(loc) or "request body"
        if param is None and loc:
            param = loc[0]
        part = f"{where}: {err.get('msg', 'invalid value')}"
        if part not in parts:
            parts.append(part)
    return "Invalid request: " + "; ".join(parts[:5]), param


def build_app(engine: AsyncLLM, served_model_names: Sequence[str], *, api_key: str | None = None,
              max_logprobs: int = 20, metrics: ServeMetrics | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (started and shut down with the app's lifespan)."""
    serving = OpenAIServing(engine, served_model_names, max_logprobs=max_logprobs)
    if metrics is None:
        metrics = ServeMetrics(serving.served_model_names[0], engine.get_metrics)
    engine.on_finished = metrics.observe_finished

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="quickdraft", version=quickdraft.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = serving
    app.state.metrics = metrics
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.err_type)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("Unhandled error", exc_info=exc)
        return error_response(500, f"Internal server error: {type(exc).__name__}")

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            return error_response(503, "The engine is not running.")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": quickdraft.__version__}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> dict:
        created = int(time.time())
        data = [{"id": name, "object": "model", "created": created, "owned_by": "quickdraft",
                 "root": serving.model_root, "parent": None, "max_model_len": serving.max_model_len}
                for name in serving.served_model_names]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict:
        serving.model_name(model)
        return {"id": model, "object": "model", "created": int(time.time()), "owned_by": "quickdraft",
                "root": serving.model_root, "parent": None, "max_model_len": serving.max_model_len}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(serving, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(serving, body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeChatRequest | TokenizeCompletionRequest) -> dict:
        serving.model_name(body.model)
        if isinstance(body, TokenizeChatRequest):
            ids = serving.render_chat(body.messages, add_generation_prompt=body.add_generation_prompt,
                                      continue_final_message=body.continue_final_message,
                                      chat_template_kwargs=body.chat_template_kwargs,
                                      add_special_tokens=body.add_special_tokens).token_ids
        else:
            ids = serving.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        strs = serving.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": serving.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        serving.model_name(body.model)
        limit = min(serving.vocab_size, serving.tokenizer.vocab_size)
        bad = [t for t in body.tokens if not 0 <= t < limit]
        if bad:
            raise APIError(400, f"Token id {bad[0]} is out of vocabulary (vocab size {limit}).", param="tokens")
        return {"prompt": serving.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    if api_key:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)
    return app


# ---- running it ---------------------------------------------------------------------------------
def resolve_api_key(api_key: str | None) -> str | None:
    return api_key or os.environ.get("QUICKDRAFT_API_KEY") or None


def run_server(llm_kwargs: dict[str, Any], *, served_model_names: Sequence[str], host: str = "127.0.0.1",
               port: int = 8000, api_key: str | None = None, max_logprobs: int = 20,
               uvicorn_log_level: str = "info", access_log: bool = True) -> None:
    """Load the model, then serve until interrupted."""
    import uvicorn

    from quickdraft.llm import LLM

    api_key = resolve_api_key(api_key)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logger.warning("Serving on %s without an API key: anyone who can reach it can use it.", host)
    llm = LLM(**llm_kwargs)
    engine = AsyncLLM(llm)
    app = build_app(engine, served_model_names, api_key=api_key, max_logprobs=max_logprobs)
    logger.info("Serving %s on http://%s:%d", served_model_names[0], host, port)
    uvicorn.run(app, host=host, port=port, log_level=uvicorn_log_level, access_log=access_log)
