"""/v1/chat/completions, streamed (server-sent events ending in ``data: [DONE]``) and not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from quickdraft.entrypoints.async_engine import RequestGroup
from quickdraft.entrypoints.openai.errors import APIError
from quickdraft.entrypoints.openai.logprobs import chat_logprobs
from quickdraft.entrypoints.openai.protocol import ChatCompletionRequest
from quickdraft.entrypoints.openai.serving_engine import (AbortingStreamingResponse, OpenAIServing, Prompt,
                                                          error_event, new_id, results, sse, usage, visible_delta)
from quickdraft.sampling_params import SamplingParams


def _prepare(serving: OpenAIServing, body: ChatCompletionRequest, params: SamplingParams) -> Prompt:
    """Render, tokenize and check the conversation (on the preparation pool: the slow part)."""
    prompt = serving.render_chat(body.messages, add_generation_prompt=body.add_generation_prompt,
                                 continue_final_message=body.continue_final_message,
                                 chat_template_kwargs=body.chat_template_kwargs,
                                 add_special_tokens=body.add_special_tokens)
    prompt.token_ids = serving.check_prompt(prompt.token_ids, params, param="messages")
    return prompt


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
    serving.check_messages(body.messages, add_generation_prompt=body.add_generation_prompt,
                           continue_final_message=body.continue_final_message)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = serving.sampling_params(body, max_tokens=max_tokens, logprobs=top_n)
    prompt = await serving.run_blocking(_prepare, serving, body, params)
    base_id = new_id("chatcmpl")
    group = serving.new_group(1, stream=bool(body.stream))
    await serving.add_all(group, base_id, [prompt], params, arrival)
    created = int(arrival)
    if body.stream:
        return AbortingStreamingResponse(
            _stream_chat(serving, body, group, prompt, params, base_id, model, created, top_n), group.abort)
    outs = await results(request, group)
    if outs is None:
        return Response(status_code=499)
    out = outs[0]
    choices = []
    for o in out.outputs:
        lp = None
        if top_n is not None:
            lp = {"content": chat_logprobs(o.token_ids, o.logprobs or [], serving.texts, top_n)}
        choices.append({"index": o.index, "message": {"role": "assistant", "content": o.text, "tool_calls": []},
                        "logprobs": lp, "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
    use = usage(len(out.prompt_token_ids), sum(len(o.token_ids) for o in out.outputs),
                out.num_cached_tokens if serving.prefix_caching else None)
    return JSONResponse({"id": base_id, "object": "chat.completion", "created": created, "model": model,
                         "choices": choices, "usage": use, "system_fingerprint": None})


async def _stream_chat(serving: OpenAIServing, body: ChatCompletionRequest, group: RequestGroup, prompt: Prompt,
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
        return sse(data)

    try:
        for j in range(n):
            yield chunk({"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}, usage(num_prompt, 0) if continuous else None)
        async for updates in group:
            for out in updates.values():
                if serving.prefix_caching:
                    cached = out.num_cached_tokens
                for o in out.outputs:
                    j = o.index
                    if done[j]:
                        continue
                    finished = o.finish_reason is not None
                    delta, end = visible_delta(o.text, sent_text[j], hold, finished)
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
                    yield chunk(choice, usage(num_prompt, sum(generated), cached) if continuous else None)
        if include_usage:
            yield sse({"id": base_id, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": usage(num_prompt, sum(generated), cached)})
    except Exception as e:  # noqa: BLE001 - the engine failed: tell the client in-band
        yield error_event(e)
    yield "data: [DONE]\n\n"

