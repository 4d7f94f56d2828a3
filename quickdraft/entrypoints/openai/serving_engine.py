"""What both endpoints share: model names, prompts, sampling parameters, admission, and
reading a request group's results while watching the client.

The slow part of preparing a request (tokenizing, rendering the chat template, compiling a
structured-output grammar) runs on a small thread pool (`OpenAIServing.run_blocking`), after
the cheap limit checks, so one huge request never stalls the event loop that feeds every
stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from quickdraft.entrypoints.async_engine import AsyncLLM, EngineDeadError, RequestGroup
from quickdraft.entrypoints.chat_utils import conversation_for_template, render_conversation
from quickdraft.entrypoints.openai.errors import APIError, bad_request, engine_failure, error_body, log_failure
from quickdraft.entrypoints.openai.limits import ServerLimits
from quickdraft.entrypoints.openai.logprobs import TokenTexts
from quickdraft.entrypoints.openai.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from quickdraft.outputs import RequestOutput
from quickdraft.sampling_params import SamplingParams, StructuredOutputsParams

logger = logging.getLogger("quickdraft.server")
RETRY_AFTER_S = 1
SEED_RANGE = (-(2**63), 2**64 - 1)  # OpenAI's int64 seeds and SamplingParams' uint64 ones
_T = TypeVar("_T")


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def error_event(e: BaseException) -> str:
    """The last event of a stream the engine failed (or the timeout ended): OpenAI's error JSON."""
    err = engine_failure(e)
    log_failure(err, e)
    return sse(error_body(err.status, err.message))


def visible_delta(text: str, sent: int, hold: int, finished: bool) -> tuple[str, int]:
    """Text to stream after ``sent`` characters, holding back the last ``hold`` characters
    (a possible stop string) until the sequence finishes; returns (delta, new sent)."""
    end = len(text) if finished else max(sent, len(text) - hold)
    return text[sent:end], end


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens``: prompt tokens served from
    the prefix cache (absent when prefix caching is off)."""
    out: dict = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def cached(outputs: Iterable[RequestOutput]) -> int | None:
    counts = [o.num_cached_tokens for o in outputs]
    return None if any(c is None for c in counts) else sum(counts)


@dataclass
class Prompt:
    text: str | None
    token_ids: list[int]


def structured_outputs(body: CompletionRequest | ChatCompletionRequest) -> StructuredOutputsParams | None:
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


class Admission:
    """Counts the requests admitted and not yet finished; refuses new ones past ``capacity``
    (the engine's running slots plus the waiting room) with a 503 and ``Retry-After``.
    Used from the event loop only."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.in_flight = 0

    def acquire(self, count: int) -> None:
        if self.capacity is None:
            self.in_flight += count
            return
        if count > self.capacity:
            raise APIError(400, f"This request has {count} prompts; the server admits at most {self.capacity} "
                                "requests at once.", param="prompt")
        if self.in_flight + count > self.capacity:
            raise APIError(503, f"The server is at capacity ({self.in_flight} requests running or waiting, at most "
                                f"{self.capacity}); retry in a moment.",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        self.in_flight += count

    def release(self, count: int) -> None:
        self.in_flight = max(0, self.in_flight - count)


class OpenAIServing:
    """Request handling shared by the endpoints: model names, prompts, sampling params, limits."""

    def __init__(self, engine: AsyncLLM, served_model_names: Sequence[str], *, limits: ServerLimits | None = None,
                 model_root: str | None = None, prep_workers: int = 4) -> None:
        if not served_model_names:
            raise ValueError("served_model_names must name at least one model.")
        self.engine = engine
        self.served_model_names = list(served_model_names)
        self.limits = limits or ServerLimits()
        config = engine.llm.config
        self.max_n = self.limits.max_n or config.max_num_seqs
        self.max_logprobs = self.limits.max_logprobs
        waiting = self.limits.max_waiting_requests
        self.admission = Admission(None if waiting is None else config.max_num_seqs + waiting)
        self.model_root = model_root or str(engine.llm.model_path)
        self.tokenizer = engine.tokenizer
        self.texts = TokenTexts(self.tokenizer)
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.llm.model_config.vocab_size
        self.defaults = engine.get_default_sampling_params()
        self.prefix_caching = config.enable_prefix_caching
        # No token is longer than this many characters (byte-level pieces have one character per
        # byte, so this bounds decoded text too); x4 covers normalisers that merge characters.
        longest = max((len(piece) for piece in self.tokenizer.backend.get_vocab()), default=1)
        self.max_prompt_chars = 4 * max(1, longest) * self.max_model_len
        self._pool = ThreadPoolExecutor(prep_workers, thread_name_prefix="quickdraft-prep")
        self.log_requests = False  # log each request's prompt and parameters (off: content stays private)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run_blocking(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run a slow preparation step (tokenizing, templating, grammar compiling) off the loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- checks ---------------------------------------------------------------------------------
    def model_name(self, requested: str | None) -> str:
        if requested is None or requested == "":
            return self.served_model_names[0]
        if requested not in self.served_model_names:
            raise APIError(404, f"The model `{requested}` does not exist.", param="model")
        return requested

    def _too_long(self, chars: int, param: str) -> APIError:
        return APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                             f"request has {chars} characters, which is more than that many tokens can hold. "
                             f"Please reduce the length of the input.", param=param)

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
            raise bad_request(e, default_param=param) from None
        return token_ids

    def check_counts(self, body: CompletionRequest | ChatCompletionRequest, *, max_tokens: int | None) -> None:
        """The cheap limits, checked before any tokenizing."""
        if body.n > self.max_n:
            raise APIError(400, f"n must be at most {self.max_n}, got {body.n}.", param="n")
        limit = self.limits.max_tokens
        if limit is not None and max_tokens is not None and max_tokens > limit:
            raise APIError(400, f"max_tokens must be at most {limit} on this server, got {max_tokens}.",
                           param="max_tokens")
        most = self.limits.max_stop_sequences
        for name, values in (("stop", body.stop if isinstance(body.stop, list) else None),
                             ("bad_words", body.bad_words)):
            if values is not None and len(values) > most:
                raise APIError(400, f"{name} may hold at most {most} strings, got {len(values)}.", param=name)

    def sampling_params(self, body: CompletionRequest | ChatCompletionRequest, *, max_tokens: int | None,
                        logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "Stream options can only be defined when `stream=True`.", param="stream_options")
        self.check_counts(body, max_tokens=max_tokens)
        if max_tokens is None:
            max_tokens = self.limits.max_tokens
        for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if value is not None and not 0 <= value <= self.max_logprobs:
                raise APIError(400, f"{name} must be between 0 and {self.max_logprobs}, got {value}.", param=name)
        if body.seed is not None and not SEED_RANGE[0] <= body.seed <= SEED_RANGE[1]:
            raise APIError(400, f"seed must be a 64-bit integer, got {body.seed}.", param="seed")
        d = self.defaults
        top_k = body.top_k
        if top_k is not None and top_k >= self.vocab_size:
            top_k = 0  # keeping every token is no top-k (and keeps huge values out of int64 tensors)

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        structured = structured_outputs(body)
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
            raise bad_request(e) from None

    # -- prompts ----------------------------------------------------------------------------------
    def completion_items(self, body: CompletionRequest) -> list[str | list[int]]:
        """The prompts of a completion request, checked for count and length before tokenizing."""
        p = body.prompt
        if isinstance(p, str):
            items: list[str | list[int]] = [p]
        elif p and all(isinstance(x, int) for x in p):
            items = [list(p)]
        else:
            items = list(p)
        if not items:
            raise APIError(400, "prompt must not be empty.", param="prompt")
        if len(items) > self.limits.max_prompts_per_request:
            raise APIError(400, f"prompt may hold at most {self.limits.max_prompts_per_request} prompts, got "
                                f"{len(items)}.", param="prompt")
        if body.truncate_prompt_tokens is None:
            for item in items:
                if isinstance(item, str) and len(item) > self.max_prompt_chars:
                    raise self._too_long(len(item), "prompt")
        return items

    def tokenize_items(self, items: list[str | list[int]], add_special_tokens: bool) -> list[Prompt]:
        return [Prompt(item, self.tokenizer.encode(item, add_special_tokens=add_special_tokens))
                if isinstance(item, str) else Prompt(None, list(item)) for item in items]

    def check_messages(self, messages: list[ChatMessage], *, add_generation_prompt: bool,
                       continue_final_message: bool) -> None:
        if not messages:
            raise APIError(400, "messages must not be empty.", param="messages")
        if continue_final_message and add_generation_prompt:
            raise APIError(400, "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                           param="continue_final_message")
        chars = 0
        for m in messages:
            if isinstance(m.content, str):
                chars += len(m.content)
            elif m.content is not None:
                chars += sum(len(part.text or "") for part in m.content)
        if chars > self.max_prompt_chars:
            raise self._too_long(chars, "messages")

    def render_chat(self, messages: list[ChatMessage], *, add_generation_prompt: bool, continue_final_message: bool,
                    chat_template_kwargs: dict[str, Any] | None, add_special_tokens: bool) -> Prompt:
        self.check_messages(messages, add_generation_prompt=add_generation_prompt,
                            continue_final_message=continue_final_message)
        try:
            conversation = conversation_for_template([_message_dict(m) for m in messages])
            text = render_conversation(self.tokenizer, conversation, add_generation_prompt=add_generation_prompt,
                                       **dict(chat_template_kwargs or {}))
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        if continue_final_message:
            last = conversation[-1]["content"]
            idx = text.rfind(last) if last else -1
            if idx != -1:
                text = text[:idx + len(last)]
        return Prompt(text, self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    # -- running requests -------------------------------------------------------------------------
    def new_group(self, num_requests: int, *, stream: bool) -> RequestGroup:
        """A request group holding ``num_requests`` admission slots (503 if the server is full);
        ``stream``: the response is streamed (else only final outputs are delivered)."""
        self.admission.acquire(num_requests)
        return RequestGroup(self.engine, timeout=self.limits.request_timeout, reserved=num_requests,
                            on_release=self.admission.release, stream=stream)

    async def add_all(self, group: RequestGroup, base_id: str, prompts: list[Prompt], params: SamplingParams,
                      arrival: float) -> None:
        if self.log_requests:
            for i, p in enumerate(prompts):
                logger.info("Request %s-%d: prompt %r, prompt_token_ids %s, params %s", base_id, i, p.text,
                            p.token_ids, params)
        try:
            errors = await group.add_many([(f"{base_id}-{i}", p.text, p.token_ids, params)
                                           for i, p in enumerate(prompts)], arrival)
            for e in errors:
                if e is not None:
                    raise e
        except ValueError as e:
            group.abort()
            raise bad_request(e) from None
        except EngineDeadError as e:
            group.abort()
            raise engine_failure(e) from None
        except BaseException:  # cancellation: nothing of this call may stay queued
            group.abort()
            raise


def _message_dict(m: ChatMessage) -> dict[str, Any]:
    """A request's message as the dict the chat template sees (extra fields kept)."""
    msg = dict(m.model_extra or {})
    content = m.content
    if isinstance(content, list):
        content = [{**(part.model_extra or {}), "type": part.type, "text": part.text} for part in content]
    msg.update(role=m.role, content=content)
    if m.name is not None:
        msg["name"] = m.name
    return msg


class AbortingStreamingResponse(StreamingResponse):
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


async def results(request: Request, group: RequestGroup) -> list[RequestOutput] | None:
    """The group's final outputs, or None (requests aborted) if the client went away first; an
    engine failure or the timeout is raised as the `APIError` the client gets."""
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
        try:
            return work.result()
        except Exception as e:  # noqa: BLE001
            err = engine_failure(e)
            log_failure(err, e)
            raise err from None
    work.cancel()
    group.abort()
    return None
