"""/v1/completions, streamed (server-sent events ending in ``data: [DONE]``) and not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from quickdraft.entrypoints.async_engine import RequestGroup
from quickdraft.entrypoints.openai.errors import APIError
from quickdraft.entrypoints.openai.logprobs import completion_logprobs
from quickdraft.entrypoints.openai.protocol import CompletionRequest
from quickdraft.entrypoints.openai.serving_engine import (AbortingStreamingResponse, OpenAIServing, Prompt,
                                                          cached, error_event, new_id, results, sse, usage,
                                                          visible_delta)
from quickdraft.sampling_params import SamplingParams


def _prepare(serving: OpenAIServing, items: list[str | list[int]], body: CompletionRequest,
             params: SamplingParams) -> list[Prompt]:
    """Tokenize and check the prompts (on the preparation pool: this is the slow part)."""
    prompts = serving.tokenize_items(items, body.add_special_tokens)
    for p in prompts:
        truncated = serving.check_prompt(p.token_ids, params)
        if len(truncated) != len(p.token_ids):
            p.text, p.token_ids = None, truncated  # echo shows what ran
    if body.echo:
        for p in prompts:
            if p.text is None:
                p.text = serving.tokenizer.decode(p.token_ids, skip_special_tokens=False)
    return prompts


async def create_completion(serving: OpenAIServing, body: CompletionRequest, request: Request) -> Response:
    arrival = time.time()
    model = serving.model_name(body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported.", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, f"best_of must equal n (best_of > n is not supported), got best_of={body.best_of}, "
                            f"n={body.n}.", param="best_of")
    items = serving.completion_items(body)
    echo = bool(body.echo)
    params = serving.sampling_params(body, max_tokens=body.max_tokens, logprobs=body.logprobs,
                                     prompt_logprobs=body.logprobs if echo and body.logprobs is not None else None)
    prompts = await serving.run_blocking(_prepare, serving, items, body, params)
    base_id = new_id("cmpl")
    group = serving.new_group(len(prompts), stream=bool(body.stream))
    await serving.add_all(group, base_id, prompts, params, arrival)
    created = int(arrival)
    if body.stream:
        return AbortingStreamingResponse(
            _stream_completion(serving, body, group, prompts, params, base_id, model, created), group.abort)
    outs = await results(request, group)
    if outs is None:
        return Response(status_code=499)
    choices = []
    num_prompt = num_generated = 0
    num_cached = cached(outs) if serving.prefix_caching else None
    for i, (p, out) in enumerate(zip(prompts, outs)):
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
                         "choices": choices, "usage": usage(num_prompt, num_generated, num_cached),
                         "system_fingerprint": None})


async def _stream_completion(serving: OpenAIServing, body: CompletionRequest, group: RequestGroup,
                             prompts: list[Prompt], params: SamplingParams, base_id: str, model: str,
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
    num_cached: dict[int, int | None] = {}
    generated = [0] * num_choices

    def chunk(choice: dict, usage: dict | None = None) -> str:
        data = {"id": base_id, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
        if include_usage:
            data["usage"] = usage
        return sse(data)

    def usage_now() -> dict:
        known = serving.prefix_caching and len(num_cached) == len(prompts) and None not in num_cached.values()
        return usage(sum(prompt_tokens.values()), sum(generated), sum(num_cached.values()) if known else None)

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
                num_cached[i] = out.num_cached_tokens
                for o in out.outputs:
                    ci = i * n + o.index
                    if done[ci]:
                        continue
                    finished = o.finish_reason is not None
                    delta, end = visible_delta(o.text, sent_text[ci], hold, finished)
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
            yield sse({"id": base_id, "object": "text_completion", "created": created, "model": model,
                        "choices": [], "usage": usage_now()})
    except Exception as e:  # noqa: BLE001 - the engine failed: tell the client in-band
        yield error_event(e)
    yield "data: [DONE]\n\n"
