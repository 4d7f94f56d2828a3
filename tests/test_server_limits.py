"""The server's limits and failure modes: body size, request counts, the waiting room, request
timeouts, bounded per-request output, engine failures and crashes, graceful shutdown.

Nothing here depends on timing: where a request must still be running, the engine is held
between steps (`Server.gated`), and disconnects are made by closing the connection ourselves."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
from test_server import NAME, PROMPTS, REPO, Server, free_port, greedy, wait_healthy, wait_until  # noqa: E402

from quickdraft import LLM  # noqa: E402
from quickdraft.entrypoints.async_engine import CRASHED, AsyncLLM, RequestGroup  # noqa: E402
from quickdraft.entrypoints.openai.errors import ENGINE_FAILED  # noqa: E402
from quickdraft.entrypoints.openai.limits import ServerLimits  # noqa: E402

TINY = dict(dtype="float32", device="cpu", max_model_len=256, kv_cache_memory="8MiB")
LIMITS = ServerLimits(max_request_body_bytes=4000, max_n=2, max_tokens=40, max_logprobs=3,
                      max_prompts_per_request=3, max_stop_sequences=2, max_waiting_requests=0,
                      request_timeout=None)
ERROR_KEYS = {"message", "type", "param", "code"}


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS and err["code"] == status, r.text
    return err


@pytest.fixture(scope="module")
def limited(tiny_checkpoint):
    # max_num_seqs=1 and max_waiting_requests=0: one request at a time, the next one gets 503.
    s = Server(LLM(str(tiny_checkpoint("llama")), max_num_seqs=1, **TINY), [NAME], limits=LIMITS)
    yield s
    s.close()


def post(server: Server, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kw)


def test_body_size_limit_413(limited):
    big = {"model": NAME, "prompt": "x" * 5000, "max_tokens": 1}
    err = error_of(post(limited, "/v1/completions", big), 413)
    assert "4000 bytes" in err["message"]
    # Without a Content-Length (chunked), counted as it streams in.
    data = json.dumps(big).encode()

    def chunks():
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]

    r = httpx.post(f"{limited.url}/v1/completions", content=chunks(), timeout=60,
                   headers={"content-type": "application/json"})
    assert "4000 bytes" in error_of(r, 413)["message"]
    assert post(limited, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("path,body,needle", [
    ("/v1/completions", {"prompt": "x", "n": 3, "temperature": 1}, "n must be at most 2, got 3"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 41}, "max_tokens must be at most 40 on this server, got 41"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 99},
     "max_tokens must be at most 40"),
    ("/v1/completions", {"prompt": "x", "logprobs": 4}, "logprobs must be between 0 and 3, got 4"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 5}, "logprobs must be between 0 and 3, got 5"),
    ("/v1/completions", {"prompt": ["a", "b", "c", "d"]}, "prompt may hold at most 3 prompts, got 4"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c"]}, "stop may hold at most 2 strings, got 3"),
    ("/v1/completions", {"prompt": "x", "bad_words": ["a", "b", "c"]}, "bad_words may hold at most 2"),
])
def test_request_limits_400(limited, path, body, needle):
    err = error_of(post(limited, path, {"model": NAME, **body}), 400)
    assert needle in err["message"], err


def test_max_tokens_limit_is_the_default(limited, tiny_llm):
    r = post(limited, "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                                               "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 40 and r.json()["choices"][0]["finish_reason"] == "length"


def test_waiting_room_full_503_with_retry_after(limited, tiny_llm):
    exp = tiny_llm.generate(PROMPTS[0], greedy(30), use_tqdm=False)[0].outputs[0].text
    body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    with limited.gated(0):
        with httpx.stream("POST", f"{limited.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            assert wait_until(lambda: limited.engine.engine.requests)  # admitted, held before its first step
            second = post(limited, "/v1/completions", body)
            err = error_of(second, 503)
            assert second.headers["retry-after"] == "1" and "at capacity" in err["message"]
            limited.open_gate()
            text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                           if line.startswith("data: {"))
    assert text == exp
    # The slot is free again: the same request now succeeds.
    assert post(limited, "/v1/completions", body).json()["choices"][0]["text"] == exp
    assert wait_until(limited.kv_free)


def test_request_timeout_504_and_blocks_freed(limited):
    body = {"model": NAME, "prompt": PROMPTS[1], "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    server = limited.sibling(ServerLimits(request_timeout=1.5))
    try:
        with server.gated(0):  # the engine never runs it: only the timeout can end it
            err = error_of(post(server, "/v1/completions", body), 504)
            assert "request timeout of 1.5 s" in err["message"]
        assert wait_until(server.kv_free)
        with server.gated(1):
            with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True},
                              timeout=60) as r:
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["code"] == 504 and "request timeout" in err["message"]
        assert wait_until(server.kv_free)
    finally:
        server.close()


def test_huge_prompt_is_tokenized_off_the_event_loop(limited):
    """A 3.9 MB prompt (truncated, so it passes the length check) is tokenized on the preparation
    pool: /health keeps answering while it is tokenized."""
    body = {"model": NAME, "prompt": "lorem ipsum dolor " * 210_000, "max_tokens": 1, "truncate_prompt_tokens": 8}
    server = limited.sibling(ServerLimits(max_request_body_bytes=8 * 2**20))  # 4000 bytes would refuse it
    try:
        # Without truncation a text longer than any max_model_len tokens can hold is refused
        # before tokenizing.
        chars = server.app.state.serving.max_prompt_chars + 1
        err = error_of(post(server, "/v1/completions", {"model": NAME, "prompt": "a" * chars}), 400)
        assert f"your request has {chars} characters" in err["message"]
        result: dict = {}
        t = threading.Thread(target=lambda: result.setdefault("r", post(server, "/v1/completions", body)))
        t.start()
        health_answers = 0
        while t.is_alive():
            health_answers += httpx.get(f"{server.url}/health", timeout=60).status_code == 200
        t.join()
        assert result["r"].status_code == 200, result["r"].text
        assert health_answers >= 2
    finally:
        server.close()


def test_slow_reader_holds_one_output_per_request(tiny_checkpoint, tiny_llm):
    """A reader that does not read while its request runs to the end costs one output, not one
    per step; the output it then reads is the full answer."""
    exp = tiny_llm.generate(PROMPTS[3], greedy(60), use_tqdm=False)[0].outputs[0].text
    engine = AsyncLLM(LLM(str(tiny_checkpoint("llama")), **TINY))
    engine.start()

    async def run() -> tuple[int, list]:
        group = RequestGroup(engine)
        ids = engine.tokenizer.encode(PROMPTS[3])
        await group.add("r0", PROMPTS[3], ids, greedy(60))
        while "r0" not in group._latest or not group._latest["r0"].finished:
            assert len(group._latest) <= 1
            await asyncio.sleep(0.01)
        updates = [u async for u in group]
        return len(updates), updates

    try:
        count, updates = asyncio.run(run())
    finally:
        engine.shutdown()
    assert count == 1 and updates[0]["r0"].outputs[0].text == exp


def test_a_request_that_finishes_before_its_add_returns_is_not_lost(tiny_checkpoint, tiny_llm):
    """Regression (found on Ray Serve, where one request in a few hung until the client gave up):
    the engine can add, run and finish a short request, and queue its last output on the event
    loop, before the coroutine awaiting the add resumes. The group must already be listening.
    Here the loop is held while the engine finishes a 1-token request."""
    exp = tiny_llm.generate(PROMPTS[0], greedy(1), use_tqdm=False)[0].outputs[0].token_ids
    engine = AsyncLLM(LLM(str(tiny_checkpoint("llama")), **TINY))
    engine.start()

    async def run() -> list:
        group = RequestGroup(engine)
        adding = asyncio.ensure_future(group.add("r0", PROMPTS[0], engine.tokenizer.encode(PROMPTS[0]), greedy(1)))
        await asyncio.sleep(0)  # the add command is queued
        # Hold the loop (blocking waits) until the engine has run the request to its end and queued
        # its outputs here: the add's result and the last output are then both waiting.
        assert wait_until(lambda: engine.engine.num_generation_tokens_total > 0
                          and not engine.engine.has_unfinished_requests())
        time.sleep(0.3)
        await adding
        return await asyncio.wait_for(group.results(), 30)

    try:
        outs = asyncio.run(run())
    finally:
        engine.shutdown()
    assert outs[0].outputs[0].token_ids == exp and outs[0].finished


def test_engine_step_failure_is_a_500_without_details_and_serving_goes_on(limited):
    inner = limited.engine.engine
    real = inner.step
    calls = {"n": 0}

    def failing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("SECRET-PROMPT-TEXT internals")
        return real(*args, **kwargs)

    inner.step = failing_step
    try:
        r = post(limited, "/v1/completions", {"model": NAME, "prompt": "SECRET-PROMPT-TEXT", "max_tokens": 20,
                                              "ignore_eos": True})
    finally:
        del inner.step
    err = error_of(r, 500)
    assert err["message"] == ENGINE_FAILED and "SECRET" not in r.text
    assert wait_until(limited.kv_free)
    assert httpx.get(f"{limited.url}/health", timeout=30).status_code == 200
    assert post(limited, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 2}).status_code == 200


class _Crash(BaseException):
    """Not an Exception: escapes the step's error handling and ends the engine thread."""


def test_engine_thread_crash_gives_500s_and_failing_health(tiny_checkpoint):
    s = Server(LLM(str(tiny_checkpoint("llama")), **TINY), [NAME])
    try:
        def crash(*args, **kwargs):
            raise _Crash("SECRET internals")

        s.engine.engine.step = crash
        with httpx.stream("POST", f"{s.url}/v1/completions", timeout=60,
                          json={"model": NAME, "prompt": "x", "max_tokens": 20, "stream": True}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        err = json.loads(events[-2])["error"]
        assert err["code"] == 500 and err["message"] == CRASHED
        assert wait_until(lambda: not s.engine.is_running)
        h = httpx.get(f"{s.url}/health", timeout=30)
        assert "crashed" in error_of(h, 503)["message"]
        r = post(s, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 2})
        assert error_of(r, 500)["message"] == CRASHED and "SECRET" not in r.text
        bm = s.engine.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks and not s.engine.engine.requests
    finally:
        s.close()


def test_shutdown_aborts_what_does_not_finish_in_the_grace_period(tiny_checkpoint):
    """uvicorn's graceful shutdown: stop accepting, wait up to the timeout, then cancel; the held
    request is aborted, every block is freed and the engine thread ends."""
    s = Server(LLM(str(tiny_checkpoint("llama")), **TINY), [NAME], graceful_timeout=1)
    with s.gated(0):
        with httpx.stream("POST", f"{s.url}/v1/completions", timeout=60,
                          json={"model": NAME, "prompt": "x", "max_tokens": 20, "stream": True}) as r:
            assert wait_until(lambda: s.engine.engine.requests)
            s.server.should_exit = True  # what uvicorn's SIGTERM handler does
            # After the grace period uvicorn cancels the response, which queues the abort; then
            # let the held engine thread go on, so that it applies the abort and stops.
            assert wait_until(lambda: not s.engine._commands.empty(), 30)
            s.open_gate()
            with pytest.raises(httpx.HTTPError):  # the stream was cut off, not finished
                for _ in r.iter_lines():
                    pass
        s.thread.join(30)
        assert not s.thread.is_alive() and not s.engine.is_running
    bm = s.engine.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not s.engine.engine.requests
    s.sock.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_server_exits_cleanly_on_signal(tiny_checkpoint, sig):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "quickdraft", "serve", str(tiny_checkpoint("llama")), "--port",
                             str(port), "--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory", "8MiB",
                             "--shutdown-timeout", "5", "--disable-log-stats"], cwd=REPO, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 120, alive=lambda: proc.poll() is None)
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={"model": None, "prompt": "x", "max_tokens": 200, "ignore_eos": True,
                                "stream": True}) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            proc.send_signal(sig)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest and rest[-1] == "data: [DONE]"  # finished (or aborted with an error event), never cut off
        rc = proc.wait(60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc in (0, -sig), (rc, err[-2000:])
    assert "KV blocks in use: 0 of" in err, err[-2000:]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=5)


def test_unexpected_error_is_a_plain_500_and_the_connection_stays_usable(limited):
    """An exception the server did not plan for: a 500 in OpenAI's shape with no details, and a
    client reusing its connection right away is answered (Starlette's catch-all handler would
    re-raise and drop the connection)."""
    serving = limited.app.state.serving

    def broken(body):  # noqa: ANN001
        raise RuntimeError("SECRET internals")

    serving.completion_items = broken
    try:
        with httpx.Client(limits=httpx.Limits(max_connections=1), timeout=60) as client:
            r = client.post(f"{limited.url}/v1/completions", json={"model": NAME, "prompt": "x"})
            err = error_of(r, 500)
            assert "SECRET" not in r.text and "server log" in err["message"]
            del serving.completion_items
            for _ in range(3):
                ok = client.post(f"{limited.url}/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2})
                assert ok.status_code == 200, ok.text
    finally:
        serving.__dict__.pop("completion_items", None)


def test_engine_loaded_on_its_own_thread(tiny_checkpoint, tiny_llm):
    """AsyncLLM.load builds the LLM on the thread that then runs its engine (one OpenMP pool);
    several requests added together give the offline answers with only final outputs
    delivered; load errors are raised; an engine never started shuts down cleanly."""
    builders: list[threading.Thread] = []

    def build() -> LLM:
        builders.append(threading.current_thread())
        return LLM(str(tiny_checkpoint("llama")), **TINY)

    engine = AsyncLLM.load(build)
    assert builders[0] is not threading.main_thread() and not engine.is_running
    engine.start()
    assert engine.is_running and engine._thread is builders[0]
    want = tiny_llm.generate(PROMPTS[:3], greedy(12), use_tqdm=False)

    async def run() -> tuple[list, list]:
        group = RequestGroup(engine, stream=False)
        seen: list[int] = []
        group_deliver = group._deliver
        group._deliver = lambda item: (seen.append(1), group_deliver(item))[1]
        errors = await group.add_many([(f"r{i}", p, engine.tokenizer.encode(p), greedy(12))
                                       for i, p in enumerate(PROMPTS[:3])] + [("bad", "x", [10**6], greedy(12))])
        return errors, await group.results(), seen

    try:
        errors, outs, seen = asyncio.run(run())
    finally:
        engine.shutdown()
    assert errors[:3] == [None] * 3 and isinstance(errors[3], ValueError) and "1000000" in str(errors[3])
    assert [o.outputs[0].token_ids for o in outs] == [w.outputs[0].token_ids for w in want]
    assert len(seen) == 3  # one (final) output per request, none per step
    assert not builders[0].is_alive()
    with pytest.raises(Exception, match="no-such-model"):
        AsyncLLM.load(lambda: LLM("/no-such-model"))
    idle = AsyncLLM.load(build)
    idle.shutdown(timeout=10)
    assert not builders[-1].is_alive()
