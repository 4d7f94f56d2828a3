"""The OpenAI-compatible server: real uvicorn servers on 127.0.0.1 driven by the `openai` client
(and raw httpx where the wire format matters), checked against the offline `LLM`."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from quickdraft import LLM, SamplingParams  # noqa: E402
from quickdraft.entrypoints.async_engine import AsyncLLM  # noqa: E402
from quickdraft.entrypoints.openai.api_server import UVICORN_HTTP, UVICORN_LOOP, build_app  # noqa: E402
from quickdraft.entrypoints.openai.limits import ServerLimits  # noqa: E402
from tiny_models import self_copy_prompts  # noqa: E402

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
TINY_KW = dict(dtype="float32", device="cpu", max_model_len=256, kv_cache_memory="8MiB")
NAME = "tiny"
PROMPTS = ["def fibonacci(n):", "The quick brown fox", "import torch\nx = ", "| name | value |\n| alpha |",
           "Speculative decoding drafts", "Numbers: 0 1 2 3", "the dog the dog the dog", "print(x.shape)"]
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float, alive: Callable[[], bool] = lambda: True, poll: float = 0.05) -> None:
    """Poll ``url``/health until it answers 200; ``alive()`` false (a server process that
    exited) or the timeout raises."""
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if not alive():
            raise RuntimeError("the server exited before becoming healthy")
        if time.time() > deadline:
            raise RuntimeError("the server did not become healthy")
        time.sleep(poll)


class Server:
    """A uvicorn server for one LLM in a background thread, on a free port of 127.0.0.1."""

    def __init__(self, llm: LLM, names: list[str], api_key: str | None = None, *,
                 limits: ServerLimits | None = None, graceful_timeout: float = 2) -> None:
        self.llm = llm
        self.names = names
        self.engine = AsyncLLM(llm)
        self.app = build_app(self.engine, names, api_key=api_key, limits=limits)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, loop=UVICORN_LOOP, http=UVICORN_HTTP,
                                timeout_graceful_shutdown=graceful_timeout)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_healthy(self.url, 60)

    def client(self, api_key: str = "unused", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120, **kw)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def sibling(self, limits: ServerLimits | None = None) -> "Server":
        """Another server on the same LLM (the engine of this one must be idle meanwhile)."""
        return Server(self.llm, self.names, limits=limits)

    # test hooks
    @contextlib.contextmanager
    def gated(self, steps: int):
        """Inside the block the engine takes at most ``steps`` more steps (its thread waits
        before the next one), so "the request is still running" holds without timing."""
        allowed = threading.Semaphore(steps)
        open_ = threading.Event()
        self.open_gate = open_.set
        inner = self.engine.engine
        real_step = inner.step

        def step(*args, **kwargs):
            while not open_.is_set() and not allowed.acquire(timeout=0.02):
                pass
            return real_step(*args, **kwargs)

        inner.step = step
        try:
            yield
        finally:
            open_.set()
            del inner.step

    def kv_free(self) -> bool:
        bm = self.engine.engine.block_manager
        return bm.num_free_blocks == bm.num_blocks and not self.engine.engine.requests

    def metrics(self, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
        text = httpx.get(f"{self.url}/metrics", headers=headers, timeout=10).text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")))] = s.value
        return out


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    s = Server(LLM(str(tiny_checkpoint("llama")), **TINY_KW), [NAME, "alias"])
    yield s
    s.close()


@pytest.fixture(scope="module")
def spec_server(tiny_checkpoint):
    """n-gram speculation on the tiny Mistral, whose self-copying prompts (`self_copy_prompts`)
    make accepted drafts certain on any CPU; a random model's repetitions are only luck. The
    draft length is fixed, so that whole 3-token drafts are certain too (the adaptive policy's
    lengths follow step costs timed at start, which a busy machine skews)."""
    spec = {**NGRAM, "draft_length_policy": "fixed"}
    s = Server(LLM(str(tiny_checkpoint("mistral")), speculative_config=spec, **TINY_KW), [NAME])
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def greedy(max_tokens: int = 24, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def wait_until(cond, timeout: float = 20.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def send_raw_request(port: int, path: str, body: dict) -> socket.socket:
    """POST ``body`` on a raw connection and return the open socket without reading the answer."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def sse_lines(response) -> list[str]:
    return [line for line in response.iter_lines() if line.startswith("data: ")]


# ---- basics -----------------------------------------------------------------------------------------
def test_health_models_and_version(server, client):
    assert httpx.get(f"{server.url}/health").status_code == 200
    ids = [m.id for m in client.models.list().data]
    assert ids == [NAME, "alias"]
    assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["max_model_len"] == 256
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_greedy_completions_equal_offline(client, tiny_llm):
    expected = tiny_llm.generate(PROMPTS[:4], greedy(), use_tqdm=False)
    for prompt, exp in zip(PROMPTS[:4], expected):
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.object == "text_completion" and r.model == NAME
        assert r.choices[0].text == exp.outputs[0].text
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == len(exp.prompt_token_ids)
        assert r.usage.completion_tokens == len(exp.outputs[0].token_ids) == 24
        assert r.usage.total_tokens == r.usage.prompt_tokens + 24
    # A batch of prompts (and token-id prompts) in one request: one choice per prompt, in order.
    ids = tiny_llm.get_tokenizer().encode(PROMPTS[0])
    r = client.completions.create(model="alias", prompt=[PROMPTS[1], PROMPTS[2]], max_tokens=24, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [expected[1].outputs[0].text, expected[2].outputs[0].text]
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].text == expected[0].outputs[0].text


def test_default_max_tokens_and_eos(client, tiny_llm):
    # Completions default to 16 tokens; chat defaults to the rest of the context.
    exp = tiny_llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                            use_tqdm=False)[0]
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].text == exp.outputs[0].text
    msgs = [{"role": "user", "content": "hi"}]
    exp = tiny_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True), use_tqdm=False)[0]
    r = client.chat.completions.create(model=NAME, messages=msgs, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens + r.usage.completion_tokens == 256
    assert r.choices[0].message.content == exp.outputs[0].text and r.choices[0].finish_reason == "length"


def test_greedy_chat_equals_offline(client, tiny_llm):
    conversations = [[{"role": "user", "content": "Tell me about the quick brown fox."}],
                     [{"role": "system", "content": "You write code."},
                      {"role": "user", "content": [{"type": "text", "text": "def fibonacci(n):"}]}]]
    for msgs in conversations:
        flat = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
                 else m["content"][0]["text"]} for m in msgs]
        exp = tiny_llm.chat(flat, greedy(20), use_tqdm=False)[0]
        r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=20, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert r.object == "chat.completion"
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == exp.outputs[0].text
        assert r.usage.prompt_tokens == len(exp.prompt_token_ids) and r.usage.completion_tokens == 20
    # max_completion_tokens wins over max_tokens.
    r = client.chat.completions.create(model=NAME, messages=conversations[0], max_tokens=20, max_completion_tokens=5,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5


# ---- streaming ----------------------------------------------------------------------------------------
def test_streaming_equals_non_streaming(server, client):
    for prompt in PROMPTS[:3]:
        kw = dict(model=NAME, prompt=prompt, max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
        full = client.completions.create(**kw)
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == full.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
        assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    msgs = [{"role": "user", "content": "Write a poem about the lazy dog."}]
    kw = dict(model=NAME, messages=msgs, max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    drop_cache = lambda u: {k: v for k, v in u.model_dump().items() if k != "prompt_tokens_details"}  # noqa: E731
    assert drop_cache(chunks[-1].usage) == drop_cache(full.usage)  # the repeat hits the prefix cache
    # The wire format: server-sent events ending in [DONE]; no usage chunk unless asked for.
    body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = sse_lines(r)
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["choices"] for line in lines[:-1])


def test_stream_never_shows_a_stop_string(client, tiny_llm):
    base = tiny_llm.generate(PROMPTS[0], greedy(40), use_tqdm=False)[0].outputs[0].text
    stop = base[10:14]
    assert stop
    kw = dict(model=NAME, prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    assert full.choices[0].finish_reason == "stop" and full.choices[0].text == base[:base.find(stop)]
    assert full.choices[0].model_extra.get("stop_reason") == stop
    pieces = [c.choices[0].text for c in client.completions.create(stream=True, **kw)]
    assert "".join(pieces) == full.choices[0].text
    # include_stop_str_in_output keeps it.
    r = client.completions.create(**{**kw, "extra_body": {"ignore_eos": True, "include_stop_str_in_output": True}})
    assert r.choices[0].text == base[:base.find(stop) + len(stop)]


def test_n_choices_and_seeded_sampling(client, tiny_llm):
    params = SamplingParams(n=2, temperature=0.9, top_p=0.95, seed=7, max_tokens=12, ignore_eos=True)
    exp = tiny_llm.generate(PROMPTS[1], params, use_tqdm=False)[0]
    kw = dict(model=NAME, prompt=PROMPTS[1], n=2, temperature=0.9, top_p=0.95, seed=7, max_tokens=12,
              extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    assert len(r.choices) == 2 and [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [o.text for o in exp.outputs]
    assert r.usage.completion_tokens == 24
    streamed = {0: "", 1: ""}
    for c in client.completions.create(stream=True, **kw):
        for ch in c.choices:
            streamed[ch.index] += ch.text
    assert [streamed[0], streamed[1]] == [o.text for o in exp.outputs]
    msgs = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, n=2, temperature=1.0, seed=3, max_tokens=6)
    assert len(r.choices) == 2 and {c.index for c in r.choices} == {0, 1}


# ---- logprobs -----------------------------------------------------------------------------------------
def test_completion_logprobs_equal_offline(client, tiny_llm):
    exp = tiny_llm.generate(PROMPTS[0], greedy(10, logprobs=3), use_tqdm=False)[0].outputs[0]
    kw = dict(model=NAME, prompt=PROMPTS[0], max_tokens=10, temperature=0, logprobs=3, extra_body={"ignore_eos": True})
    lp = client.completions.create(**kw).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    for tok_id, entry, token, value, top in zip(exp.token_ids, exp.logprobs, lp.tokens, lp.token_logprobs,
                                                lp.top_logprobs):
        assert token == entry[tok_id].decoded_token
        assert value == pytest.approx(entry[tok_id].logprob, abs=1e-5)
        assert len(entry) in (3, 4)  # the top 3 plus the chosen token
        # Keyed by token text, as OpenAI's format is (tokens with the same text share a key).
        assert top == pytest.approx({v.decoded_token: v.logprob for v in entry.values()}, abs=1e-5)
    offsets = [0]
    for t in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp.text_offset == offsets
    # Streamed logprobs, concatenated, are the same.
    toks, vals = [], []
    for c in client.completions.create(stream=True, **kw):
        if c.choices[0].logprobs:
            toks += c.choices[0].logprobs.tokens
            vals += c.choices[0].logprobs.token_logprobs
    assert toks == lp.tokens and vals == pytest.approx(lp.token_logprobs, abs=1e-6)


def test_chat_logprobs_equal_offline(client, tiny_llm):
    msgs = [{"role": "user", "content": "Name a fox."}]
    exp = tiny_llm.chat(msgs, greedy(8, logprobs=2), use_tqdm=False)[0].outputs[0]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 8
    for tok_id, entry, item in zip(exp.token_ids, exp.logprobs, content):
        assert item.token == entry[tok_id].decoded_token
        assert item.logprob == pytest.approx(entry[tok_id].logprob, abs=1e-5)
        assert isinstance(item.bytes, list) and all(0 <= b < 256 for b in item.bytes)
        assert len(item.top_logprobs) == 2
        ranked = sorted((v for v in entry.values() if v.rank <= 2), key=lambda v: v.rank)
        assert [t.token for t in item.top_logprobs] == [v.decoded_token for v in ranked]
        assert [t.logprob for t in item.top_logprobs] == pytest.approx([v.logprob for v in ranked], abs=1e-5)
    # logprobs without top_logprobs: the chosen token only; none when not asked.
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=3, temperature=0, logprobs=True)
    assert len(r.choices[0].logprobs.content) == 3 and r.choices[0].logprobs.content[0].top_logprobs == []
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=3, temperature=0)
    assert r.choices[0].logprobs is None


# ---- concurrency and disconnects -----------------------------------------------------------------------
def test_concurrent_requests_equal_sequential(server, client):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(16)]

    def ask(i: int) -> str:
        if i % 2:
            r = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=20, temperature=0,
                                          extra_body={"ignore_eos": True})
            return r.choices[0].text
        chunks = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=20, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in chunks)

    sequential = [ask(i) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(ask, range(16)))
    assert concurrent == sequential
    assert wait_until(server.kv_free)


def test_disconnect_aborts_and_frees_kv_blocks(server):
    before = server.metrics().get(("quickdraft:request_success_total", (("finished_reason", "abort"),)), 0.0)
    body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 230, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with server.gated(40):  # 40 steps cannot finish 230 tokens: the request is running when we leave
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            # Hold the line iterator: a generator dropped at `break` is finalized at once, and
            # httpcore closes the connection on its GeneratorExit, so the abort below would race
            # the assertion (a busy machine lost that race). The connection closes with the block.
            lines = r.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: "):
                    got += 1
                if got == 3:
                    break
            assert not server.kv_free()  # the request holds blocks while it streams
    assert wait_until(server.kv_free)
    m = server.metrics()
    assert m[("quickdraft:kv_cache_usage_perc", ())] == 0.0
    assert m[("quickdraft:num_requests_running", ())] == 0.0
    assert wait_until(lambda: server.metrics().get(
        ("quickdraft:request_success_total", (("finished_reason", "abort"),)), 0.0) == before + 1)
    # A non-streaming client that gives up aborts too: send the request on a raw socket, wait
    # until the engine runs it, then close the connection (no timing race: we close it ourselves).
    body = {**body, "stream": False, "prompt": PROMPTS[1]}
    with server.gated(5):
        sock = send_raw_request(server.port, "/v1/completions", body)
        try:
            assert wait_until(lambda: not server.kv_free())
        finally:
            sock.close()
    assert wait_until(lambda: server.metrics().get(
        ("quickdraft:request_success_total", (("finished_reason", "abort"),)), 0.0) == before + 2)
    assert wait_until(server.kv_free)


# ---- errors --------------------------------------------------------------------------------------------
BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature must be non-negative"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p must be in (0, 1]"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens must be at least 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -5}, 400, "max_tokens must be at least 1"),
    ("/v1/completions", {"prompt": "x", "top_k": -3}, 400, "top_k must be 0 (disable), or at least 1"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 9, "max_tokens": 4}, 400, "min_tokens must be less"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop cannot contain an empty string"),
    ("/v1/completions", {"prompt": "x", "n": 2, "temperature": 0}, 400, "n must be 1 when using greedy"),
    ("/v1/completions", {"prompt": "x", "logprobs": 1000}, 400, "logprobs must be between"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stream": {"a": 1}}, 400, "stream"),
    ("/v1/completions", {"prompt": {"text": "x"}}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 99999]}, 400, "out of vocabulary"),
    ("/v1/completions", {"prompt": [5] * 300}, 400, "maximum context length is 256"),
    ("/v1/completions", {"prompt": "fox " * 400}, 400, "maximum context length is 256"),
    ("/v1/completions", {"prompt": "x", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "Stream options"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "The model `gpt-4` does not exist"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "nope"}, 404, "nope"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": -0.5}, 400,
     "temperature must be non-negative"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 400}]}, 400,
     "maximum context length"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "only 'text'"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias values must be numbers in [-100, 100]"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"five": 1}}, 400, "logit_bias keys must be token ids"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, 400, "logit_bias contains out-of-vocabulary"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": [5, 384]}, 400, "allowed_token_ids contains out-of-voc"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": []}, 400, "allowed_token_ids must not be empty"),
    ("/v1/completions", {"prompt": "x", "temperature": 3.5e38}, 400, "temperature must be at most 10000"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "bad_words": [""]}, 400,
     "bad_words must be non-empty strings"),
    ("/v1/completions", {"prompt": "x", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens must be >= 1"),
    ("/detokenize", {"tokens": [-1]}, 400, "out of vocabulary"),
    ("/v1/completions", {"prompt": "\ud800abc"}, 400, "prompt holds a lone UTF-16 surrogate"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udfff"}]}, 400, "lone UTF-16 surrogate"),
    ("/v1/completions", {"prompt": "x", "stop": ["\ud800"]}, 400, "stop holds a lone UTF-16 surrogate"),
    ("/tokenize", {"prompt": "\ud800"}, 400, "lone UTF-16 surrogate"),
    ("/tokenize", {"nothing": 1}, 400, "Invalid request"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_working(server, client, tiny_llm):
    exp = tiny_llm.generate(PROMPTS[2], greedy(60), use_tqdm=False)[0].outputs[0].text
    kw = dict(model=NAME, prompt=PROMPTS[2], max_tokens=60, temperature=0, extra_body={"ignore_eos": True})
    with ThreadPoolExecutor(1) as pool:
        # A good request streams while the bad ones arrive; its answer must not change.
        good = pool.submit(lambda: "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw)))
        for path, body, status, needle in BAD_REQUESTS:
            # json.dumps escapes non-ASCII (httpx's json= cannot send a lone surrogate).
            r = httpx.post(f"{server.url}{path}", content=json.dumps(body), timeout=30,
                           headers={"content-type": "application/json"})
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, r.text
            assert err["code"] == status and needle in err["message"], (body, err)
        # Not JSON at all, and an unknown route: still OpenAI error JSON, never a FastAPI 422 dump.
        r = httpx.post(f"{server.url}/v1/completions", content=b"{not json", timeout=30,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json()
        r = httpx.get(f"{server.url}/v1/nothing-here", timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == 404
        assert good.result() == exp
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="x", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert client.completions.create(**kw).choices[0].text == exp
    assert wait_until(server.kv_free)


def test_logit_bias_and_vllm_token_options_equal_offline(client, tiny_llm):
    """OpenAI's logit_bias (string token ids) and vLLM's allowed_token_ids, bad_words and
    truncate_prompt_tokens give what the offline API gives with the same SamplingParams."""
    tok = tiny_llm.get_tokenizer()
    ids = tok.encode(PROMPTS[0])
    allowed = list(range(3, 384, 2))
    cases = [({"logit_bias": {"100": 100}}, dict(logit_bias={100: 100.0})),
             ({"logit_bias": {str(t): -100 for t in range(0, 200)}}, dict(logit_bias={t: -100.0 for t in range(200)})),
             ({"allowed_token_ids": allowed}, dict(allowed_token_ids=allowed)),
             ({"bad_words": ["fox", "def"]}, dict(bad_words=["fox", "def"]))]
    for extra, kw in cases:
        r = client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True, **extra})
        want = tiny_llm.generate({"prompt_token_ids": ids}, greedy(12, **kw), use_tqdm=False)[0].outputs[0]
        assert r.choices[0].text == want.text, extra
    assert tiny_llm.generate({"prompt_token_ids": ids}, greedy(12, logit_bias={100: 100.0}),
                             use_tqdm=False)[0].outputs[0].token_ids == [100] * 12
    long_prompt = list(range(3, 303))  # longer than the context, fine once truncated
    r = client.completions.create(model=NAME, prompt=long_prompt, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True, "truncate_prompt_tokens": 50})
    want = tiny_llm.generate({"prompt_token_ids": long_prompt[-50:]}, greedy(8), use_tqdm=False)[0].outputs[0]
    assert r.choices[0].text == want.text and r.usage.prompt_tokens == 50


# ---- speculation and metrics -------------------------------------------------------------------------
def test_speculative_server_equals_offline_and_counts(spec_server, tiny_checkpoint):
    offline = LLM(str(tiny_checkpoint("mistral")), **TINY_KW)
    client = spec_server.client()
    before = spec_server.metrics()
    assert before[("quickdraft:spec_decode_num_drafts_total", ())] == 0
    prompts: list[str | list[int]] = ["the dog the dog the dog the dog", PROMPTS[0],
                                      *self_copy_prompts(offline, [70, 90], seed=5)]
    expected = [o.outputs[0].text for o in offline.generate(
        [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompts], greedy(40), use_tqdm=False)]

    def ask(i: int) -> str:
        r = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=40, temperature=0,
                                      extra_body={"ignore_eos": True})
        return r.choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(ask, range(len(prompts))))
    assert got == expected
    chunks = client.completions.create(model=NAME, prompt=prompts[2], max_tokens=40, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks) == got[2]
    after = spec_server.metrics()
    drafts = after[("quickdraft:spec_decode_num_drafts_total", ())]
    drafted = after[("quickdraft:spec_decode_num_draft_tokens_total", ())]
    accepted = after[("quickdraft:spec_decode_num_accepted_tokens_total", ())]
    assert drafts > 0 and drafted >= drafts and 0 < accepted <= drafted
    per_pos = [after[("quickdraft:spec_decode_num_accepted_tokens_per_pos_total", (("position", str(i)),))]
               for i in range(3)]
    # the copied 20 tokens are drafted 3 at a time: whole drafts of k = 3 were accepted
    assert sum(per_pos) == accepted and per_pos[0] >= per_pos[1] >= per_pos[2] > 0
    assert after[("quickdraft:generation_tokens_total", ())] >= 200
    assert after[("quickdraft:e2e_request_latency_seconds_count", ())] == 5
    assert after[("quickdraft:time_to_first_token_seconds_count", ())] == 5
    assert wait_until(spec_server.kv_free)


def test_metrics_exposition(server, client):
    client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ["quickdraft:prompt_tokens_total", "quickdraft:generation_tokens_total",
                 "quickdraft:num_requests_running", "quickdraft:num_requests_waiting",
                 "quickdraft:kv_cache_usage_perc", "quickdraft:time_to_first_token_seconds_bucket",
                 "quickdraft:e2e_request_latency_seconds_bucket"]:
        assert name in text
    assert "spec_decode" not in text  # no speculation configured on this server


# ---- API key, tokenizer endpoints -----------------------------------------------------------------------
def test_api_key(tiny_checkpoint, tiny_llm):
    s = Server(LLM(str(tiny_checkpoint("llama")), **TINY_KW), [NAME], api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").completions.create(model=NAME, prompt="x", max_tokens=2)
        for path in ["/v1/models", "/metrics"]:
            r = httpx.get(f"{s.url}{path}")
            assert r.status_code == 401 and r.json()["error"]["code"] == 401
        r = httpx.post(f"{s.url}/tokenize", json={"prompt": "x"})
        assert r.status_code == 401
        assert httpx.get(f"{s.url}/health").status_code == 200
        assert httpx.get(f"{s.url}/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = s.client(api_key="s3cret").completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                                          extra_body={"ignore_eos": True})
        exp = tiny_llm.generate(PROMPTS[0], greedy(5), use_tqdm=False)[0].outputs[0].text
        assert r.choices[0].text == exp
    finally:
        s.close()


def test_tokenize_detokenize_round_trip(server, tiny_llm):
    tok = tiny_llm.get_tokenizer()
    for text in PROMPTS + ["ünïcödé café 日本語 🙂"]:
        r = httpx.post(f"{server.url}/tokenize", json={"model": NAME, "prompt": text}).json()
        assert r["tokens"] == tok.encode(text) and r["count"] == len(r["tokens"]) and r["max_model_len"] == 256
        back = httpx.post(f"{server.url}/detokenize", json={"model": NAME, "tokens": r["tokens"]}).json()
        assert back["prompt"] == text
    msgs = [{"role": "user", "content": "hi"}]
    r = httpx.post(f"{server.url}/tokenize", json={"messages": msgs, "return_token_strs": True}).json()
    text = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert r["tokens"] == tok.encode(text, add_special_tokens=False)
    assert r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])


# ---- the real model -----------------------------------------------------------------------------------
def test_smollm2_chat(smollm2_gguf, smollm2_quantized):
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    exp = smollm2_quantized.chat(msgs, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    s = Server(LLM(str(smollm2_gguf), dtype="float32", device="cpu", max_model_len=2048, kv_cache_memory="128MiB",
                   speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}),
               ["smollm2"])
    try:
        client = s.client()
        r = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=24, temperature=0)
        assert r.choices[0].message.content == exp.outputs[0].text
        assert "Paris" in r.choices[0].message.content
        assert r.choices[0].finish_reason == exp.outputs[0].finish_reason
        assert r.usage.prompt_tokens == len(exp.prompt_token_ids)
        chunks = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=24, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == exp.outputs[0].text
    finally:
        s.close()


# ---- CLI ----------------------------------------------------------------------------------------------
def test_cli_help(capsys):
    from quickdraft.entrypoints.cli import main

    for argv, needle in [([], "serve"), (["serve"], "--speculative-config"), (["generate"], "--temperature"),
                         (["bench"], "throughput")]:
        with pytest.raises(SystemExit) as e:
            main([*argv, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert needle in out
    serve_help = subprocess.run([sys.executable, "-m", "quickdraft", "serve", "--help"], capture_output=True,
                                text=True, cwd=REPO, timeout=120)
    assert serve_help.returncode == 0
    for flag in ["--host", "--port", "--dtype", "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens",
                 "--kv-cache-memory", "--seed", "--device", "--served-model-name", "--disable-log-stats", "--api-key"]:
        assert flag in serve_help.stdout


def test_cli_generate(tiny_checkpoint, tiny_llm, capsys):
    from quickdraft.entrypoints.cli import main

    model = str(tiny_checkpoint("llama"))
    exp = tiny_llm.generate(PROMPTS[0], greedy(12), use_tqdm=False)[0].outputs[0].text
    args = ["generate", PROMPTS[0], "--model", model, "--dtype", "float32", "--device", "cpu", "--max-model-len",
            "256", "--kv-cache-memory", "8MiB", "--temperature", "0", "--max-tokens", "12", "--ignore-eos"]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-m", "quickdraft", *args], capture_output=True, cwd=REPO, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stdout.decode("utf-8") == exp + "\n"
    # --stream (in process) prints the same text; speculation does not change greedy output.
    assert main([*args, "--stream", "--speculative-config", json.dumps(NGRAM)]) == 0
    assert capsys.readouterr().out == exp + "\n"


def test_prefix_cache_usage_and_metrics(server, client):
    """A repeated prompt is served from the prefix cache: usage.prompt_tokens_details.cached_tokens
    says how much (non-streaming and in the streamed usage chunk), the Prometheus counters move,
    and the text equals the cold answer."""
    prompt = " ".join(PROMPTS) * 3
    before = server.metrics()
    body = dict(model=NAME, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    cold = client.completions.create(**body)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    warm = client.completions.create(**body)
    assert warm.choices[0].text == cold.choices[0].text
    cached = warm.usage.prompt_tokens_details.cached_tokens
    assert cached == (warm.usage.prompt_tokens - 1) // 16 * 16 > 0
    stream = client.completions.create(**body, stream=True, stream_options={"include_usage": True})
    last = list(stream)[-1]
    assert last.usage.prompt_tokens_details.cached_tokens == cached
    msgs = [{"role": "user", "content": prompt}]
    client.chat.completions.create(model=NAME, messages=msgs, max_tokens=4, temperature=0)
    chat = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=4, temperature=0)
    assert chat.usage.prompt_tokens_details.cached_tokens > 0
    after = server.metrics()
    hits = ("quickdraft:prefix_cache_hits_total", ())
    queries = ("quickdraft:prefix_cache_queries_total", ())
    assert after[hits] - before.get(hits, 0) >= 2 * cached + chat.usage.prompt_tokens_details.cached_tokens
    assert after[queries] - before.get(queries, 0) >= 3 * warm.usage.prompt_tokens  # three completions asked
    assert wait_until(server.kv_free)
