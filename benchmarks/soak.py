"""Soak test with faults: one `quickdraft serve` on 127.0.0.1 under a long, seeded mix of good and
bad clients, checked for exact answers, clean errors and a KV cache that empties at the end.

The load is --num-requests requests from --concurrency concurrent asyncio clients, a seeded mix of:

* well-behaved greedy requests (~65%): temperature 0, `ignore_eos`, max_tokens 8-32, alternating
  streaming / not and /v1/completions / /v1/chat/completions, prompts from a fixed list. Each
  answer is compared with the answer to the same (endpoint, prompt, max_tokens) sent ALONE to the
  same server before the storm starts (sequentially, one request at a time: the answer with
  nothing else in the batch). Any difference is a mismatch;
* disconnecters (~20%): streaming requests with max_tokens up to the end of the context whose
  client closes the connection after reading 1-3 SSE events (the server must abort them);
* garbage (~10%): invalid JSON, wrong types, an unknown model, an empty prompt, prompts far
  longer than the context, random bytes sent as JSON, the wrong HTTP method, a body over the
  server's size limit, text with a lone UTF-16 surrogate (each kind in turn). Each
  must get a 4xx whose body is OpenAI's error JSON `{"error": {"message", "type", "param", "code"}}`;
* huge outputs (~5%): max_tokens as large as the context allows, read to the end (streamed or not).

Reported per run: requests sent, served OK, disconnects done (and aborts the server counted),
errors by HTTP status, transport errors (must be 0 outside the disconnecters), p50/p99 latency of
the well-behaved requests, the server's peak RSS (psutil, every 0.2 s), KV usage and running
requests from /metrics once every client is done (both must be back to 0 within --idle-timeout s)
and the mismatches. Exits non-zero if a well-behaved or huge request failed, on any 5xx, transport
error, garbage answer that is not a 4xx OpenAI error, mismatch, or a KV cache not back to 0.

    python benchmarks/soak.py [MODEL] [--num-requests 2000] [--concurrency 32] [--modes plain,ngram]
        [--seed 0] [--max-model-len N] [--kv-cache-memory 2GiB] [--dtype float32]
        [--speculative-config '{"method": "ngram", ...}'] [any other `quickdraft serve` flag]

MODEL defaults to the embedded SmolLM2-135M-Instruct GGUF. `--modes plain,ngram` runs the whole
soak once without and once with ngram speculation (each on a fresh server); mode `spec` uses
--speculative-config (the default mode when that flag is given).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
REPO = Path(__file__).resolve().parent.parent
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
ERROR_KEYS = {"message", "type", "param", "code"}

# Short prompts, so that they fit small test contexts too; some repeat themselves (ngram drafts).
PROMPTS = [
    "def fibonacci(n):",
    "The quick brown fox",
    "import torch\nx = ",
    "| name | value |\n| alpha | 1 |\n| beta |",
    "Speculative decoding drafts",
    "Numbers: 0 1 2 3 4 5",
    "the dog the dog the dog",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "List three colours:",
]
MAX_TOKENS_CHOICES = (8, 16, 32)
MIX = {"good": 0.65, "disconnect": 0.20, "garbage": 0.10, "huge": 0.05}
# lone_surrogate: "\ud800" is valid JSON but not Unicode text (it once got a 500 from the tokenizer).
GARBAGE_KINDS = ["invalid_json", "wrong_type", "unknown_model", "empty_prompt", "too_long", "random_bytes",
                 "wrong_method", "oversized_body", "lone_surrogate"]
EXTRA_GARBAGE_KINDS: list[str] = []
_FILLER = "x" * (6 << 20)  # the prompt of an oversized body (one string, shared)


# ---- report -----------------------------------------------------------------------------------------
@dataclass
class SoakReport:
    label: str
    model: str
    speculative_config: dict | None
    requests_sent: int = 0
    served_ok: int = 0  # well-behaved and huge requests answered in full
    well_behaved: int = 0
    well_behaved_failed: int = 0
    huge: int = 0
    huge_failed: int = 0
    disconnecters: int = 0
    disconnects: int = 0  # disconnecters that closed the connection mid-stream
    server_aborts: int = 0  # requests the server finished with reason "abort" (/metrics)
    garbage: int = 0
    garbage_violations: int = 0  # garbage not answered with a 4xx OpenAI error JSON
    errors_by_status: dict[int, int] = field(default_factory=dict)  # every non-200 answer
    server_errors: int = 0  # 5xx answers, and error events inside a 200 stream
    transport_errors: int = 0  # for requests that were not disconnecters
    disconnecter_transport_errors: int = 0
    latency_p50: float = float("nan")  # seconds, well-behaved requests
    latency_p99: float = float("nan")
    peak_rss_mib: float = 0.0
    kv_usage_end: float = float("nan")  # quickdraft:kv_cache_usage_perc once all clients are done
    running_end: float = float("nan")  # quickdraft:num_requests_running
    waiting_end: float = float("nan")
    kv_idle: bool = False  # usage and running (and waiting) reached 0 within the idle timeout
    idle_after_s: float = float("nan")
    mismatches: int = 0
    baseline_requests: int = 0
    preemptions: float = 0.0  # quickdraft:num_preemptions_total, this run
    spec_draft_tokens: float = 0.0  # quickdraft:spec_decode_num_draft_tokens_total, this run
    spec_accepted_tokens: float = 0.0
    server_alive: bool = True
    wall_s: float = 0.0
    failures: list[str] = field(default_factory=list)  # a sample of what went wrong
    expected: dict[tuple[str, str, int], str] = field(default_factory=dict)  # baseline answers
    recorded: list[tuple[str, str, int, str]] = field(default_factory=list)  # (endpoint, prompt, max_tokens, text)

    @property
    def ok(self) -> bool:
        return (self.well_behaved_failed == 0 and self.huge_failed == 0 and self.server_errors == 0
                and self.transport_errors == 0 and self.garbage_violations == 0 and self.mismatches == 0
                and self.kv_idle and self.server_alive)

    def fail(self, message: str) -> None:
        if len(self.failures) < 30:
            self.failures.append(message)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def format_table(reports: list[SoakReport]) -> str:
    """A markdown table, one column per run."""
    rows: list[tuple[str, list[str]]] = [
        ("requests sent", [str(r.requests_sent) for r in reports]),
        ("served OK (good + huge)", [f"{r.served_ok} / {r.well_behaved + r.huge}" for r in reports]),
        ("well-behaved failed", [str(r.well_behaved_failed) for r in reports]),
        ("huge outputs failed", [f"{r.huge_failed} of {r.huge}" for r in reports]),
        ("disconnects done / server aborts", [f"{r.disconnects} / {r.server_aborts:.0f}" for r in reports]),
        ("garbage (not a 4xx OpenAI error)", [f"{r.garbage} ({r.garbage_violations})" for r in reports]),
        ("errors by status", [", ".join(f"{k}: {v}" for k, v in sorted(r.errors_by_status.items())) or "-"
                              for r in reports]),
        ("5xx / error events", [str(r.server_errors) for r in reports]),
        ("transport errors (disconnecters)",
         [f"{r.transport_errors} ({r.disconnecter_transport_errors})" for r in reports]),
        ("latency p50 / p99 (well-behaved)", [f"{r.latency_p50:.2f} s / {r.latency_p99:.2f} s" for r in reports]),
        ("peak server RSS", [f"{r.peak_rss_mib:.0f} MiB" for r in reports]),
        ("KV usage / running at the end", [f"{r.kv_usage_end:.3f} / {r.running_end:.0f}" for r in reports]),
        ("KV back to 0", [f"yes ({r.idle_after_s:.1f} s)" if r.kv_idle else "NO" for r in reports]),
        ("preemptions", [f"{r.preemptions:.0f}" for r in reports]),
        ("mismatches vs alone", [f"{r.mismatches} of {r.well_behaved}" for r in reports]),
        ("drafted / accepted tokens", [f"{r.spec_draft_tokens:.0f} / {r.spec_accepted_tokens:.0f}" for r in reports]),
        ("wall time", [f"{r.wall_s:.0f} s" for r in reports]),
        ("verdict", ["PASS" if r.ok else "FAIL" for r in reports]),
    ]
    head = "| | " + " | ".join(r.label for r in reports) + " |"
    sep = "|---|" + "---|" * len(reports)
    return "\n".join([head, sep, *(f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows)])


# ---- server -----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_model() -> str:
    from quickdraft.models.default_model import default_model_path

    return str(default_model_path())


class ServerProcess:
    """`python -m quickdraft serve MODEL` on a free port of 127.0.0.1; its log goes to a temporary
    file (shown when it fails); its RSS (with children) is sampled every 0.2 s."""

    def __init__(self, model: str, server_args: list[str], spec: dict | None, startup_timeout: float) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "quickdraft", "serve", model, "--host", "127.0.0.1", "--port", str(self.port),
               "--uvicorn-log-level", "warning", "--disable-uvicorn-access-log", "--disable-log-stats",
               *server_args]
        if spec is not None:
            cmd += ["--speculative-config", json.dumps(spec)]
        env = {**os.environ}
        env.pop("QUICKDRAFT_API_KEY", None)
        env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
        self.log = tempfile.NamedTemporaryFile("w+", prefix="quickdraft-soak-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.peak_rss = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample_rss, daemon=True)
        self._sampler.start()
        deadline = time.time() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.close()
                raise RuntimeError(f"the server exited with code {self.proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                tail = self.log_tail()
                self.close()
                raise RuntimeError(f"the server did not become healthy in {startup_timeout:.0f} s:\n{tail}")
            time.sleep(0.25)

    def _sample_rss(self) -> None:
        import psutil

        try:
            proc = psutil.Process(self.proc.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            try:
                rss = proc.memory_info().rss
                for child in proc.children(recursive=True):
                    try:
                        rss += child.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_rss = max(self.peak_rss, rss)
            except psutil.Error:
                return
            self._stop.wait(0.2)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return Path(self.log.name).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def close(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._sampler.join(5)
        self.log.close()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


def read_metrics(url: str) -> dict[str, float]:
    """/metrics as {sample name[{labels}]: value}, without the model_name label and histograms."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith(("_bucket", "_sum", "_count", "_created")):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


# ---- the plan ---------------------------------------------------------------------------------------
@dataclass
class Planned:
    kind: str  # good | disconnect | garbage | huge
    method: str = "POST"
    path: str = COMPLETIONS
    body: dict | None = None
    content: bytes | None = None  # raw body (garbage), sent with a JSON content type
    stream: bool = False
    prompt: str = ""
    max_tokens: int = 0
    events: int = 0  # disconnecters: SSE events to read before closing
    garbage_kind: str = ""


def _request_body(path: str, prompt: str, model: str, max_tokens: int | None, stream: bool) -> dict:
    body: dict = {"model": model, "temperature": 0, "ignore_eos": True, "stream": stream}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if path == CHAT:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _garbage(rng: random.Random, kind: str, model: str, max_model_len: int) -> Planned:
    path = rng.choice([COMPLETIONS, CHAT])
    good = _request_body(path, "hello", model, 8, rng.random() < 0.5)
    p = Planned("garbage", path=path, garbage_kind=kind)
    if kind == "invalid_json":
        p.content = json.dumps(good).encode()[:-rng.randint(1, 12)]
    elif kind == "wrong_type":
        field_, value = rng.choice([("temperature", "hot"), ("max_tokens", "many"), ("stream", {"a": 1}),
                                    ("top_p", [1]), ("n", "two"), ("stop", 5)])
        p.body = {**good, field_: value}
    elif kind == "unknown_model":
        p.body = {**good, "model": "no-such-model"}
    elif kind == "empty_prompt":
        if path == CHAT:
            p.body = {**good, "messages": rng.choice([[], [{"content": "no role"}], [{}]])}
        else:
            p.body = {**good, "prompt": rng.choice(["", [], [[]]])}
    elif kind == "too_long":
        long = " ".join(rng.choice(["fox", "dog", "river", "stone"]) for _ in range(max_model_len * 3))
        p.body = _request_body(path, long, model, 8, rng.random() < 0.5)
    elif kind == "random_bytes":
        p.content = rng.randbytes(rng.randint(1, 512))
    elif kind == "wrong_method":
        p.method = rng.choice(["GET", "PUT", "DELETE", "PATCH"])
        p.body = good if p.method in ("PUT", "PATCH") else None
    elif kind == "oversized_body":  # over the server's body limit (4 MiB by default), else far too long
        key = "messages" if path == CHAT else "prompt"
        p.body = {**good, key: [{"role": "user", "content": _FILLER}] if path == CHAT else _FILLER}
    elif kind == "lone_surrogate":
        text = rng.choice(["\\ud800", "abc \\udfff", "\\udc00\\ud800x"])
        if path == CHAT:
            p.content = ('{"messages": [{"role": "user", "content": "%s"}], "max_tokens": 4}' % text).encode()
        else:
            p.content = ('{"prompt": "%s", "max_tokens": 4}' % text).encode()
    else:
        raise ValueError(kind)
    return p


def plan(rng: random.Random, n: int, model: str, prompts: list[str], max_tokens_choices: tuple[int, ...],
         room: dict[tuple[str, str], int], max_model_len: int,
         garbage_kinds: list[str] | None = None) -> list[Planned]:
    """``room[(endpoint, prompt)]``: the most tokens that fit after the prompt."""
    garbage_kinds = list(garbage_kinds or GARBAGE_KINDS)
    kinds, weights = list(MIX), list(MIX.values())
    out: list[Planned] = []
    n_good = n_garbage = 0
    for _ in range(n):
        kind = rng.choices(kinds, weights)[0]
        if kind == "good":
            path = COMPLETIONS if (n_good // 2) % 2 == 0 else CHAT
            stream = n_good % 2 == 1
            n_good += 1
            prompt, max_tokens = rng.choice(prompts), rng.choice(max_tokens_choices)
            out.append(Planned("good", path=path, body=_request_body(path, prompt, model, max_tokens, stream),
                               stream=stream, prompt=prompt, max_tokens=max_tokens))
        elif kind in ("disconnect", "huge"):
            path, prompt = rng.choice([COMPLETIONS, CHAT]), rng.choice(prompts)
            stream = True if kind == "disconnect" else rng.random() < 0.5
            max_tokens = room[(path, prompt)]
            out.append(Planned(kind, path=path, body=_request_body(path, prompt, model, max_tokens, stream),
                               stream=stream, prompt=prompt, max_tokens=max_tokens,
                               events=rng.randint(1, 3) if kind == "disconnect" else 0))
        else:  # every kind in turn, so that a short run still meets each one
            out.append(_garbage(rng, garbage_kinds[n_garbage % len(garbage_kinds)], model, max_model_len))
            n_garbage += 1
    return out


# ---- clients ----------------------------------------------------------------------------------------
@dataclass
class Outcome:
    planned: Planned
    status: int | None = None
    ok: bool = False
    text: str = ""
    latency: float = 0.0
    error: str = ""
    transport_error: bool = False
    server_error: bool = False  # a 5xx, or an error event inside a 200 stream
    disconnected: bool = False


def _piece(path: str, choice: dict) -> str:
    if path == CHAT:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


async def _read_stream(r: httpx.Response, p: Planned, out: Outcome) -> None:
    """Read SSE events; a disconnecter returns (closing the connection) after ``p.events`` events."""
    text: list[str] = []
    finish, usage, done, events = None, None, False, 0
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            out.server_error = True
            out.error = f"error event in the stream: {chunk['error']}"
            return
        events += 1
        for choice in chunk.get("choices") or []:
            text.append(_piece(p.path, choice))
            finish = choice.get("finish_reason") or finish
        usage = chunk.get("usage") or usage
        if p.kind == "disconnect" and events >= p.events:
            out.disconnected = True
            return  # the caller leaves `async with client.stream(...)`: the connection closes
    out.text = "".join(text)
    if not done:
        out.error = "the stream ended without [DONE]"
    elif finish != "length":
        out.error = f"finish_reason {finish!r}, expected 'length'"
    elif not usage or usage.get("completion_tokens") != p.max_tokens:
        out.error = f"usage {usage}, expected {p.max_tokens} completion tokens"
    else:
        out.ok = True


def _check_full(body: dict, p: Planned, out: Outcome) -> None:
    choices = body.get("choices") or []
    if len(choices) != 1:
        out.error = f"{len(choices)} choices"
        return
    c = choices[0]
    out.text = (c.get("message") or {}).get("content") or "" if p.path == CHAT else c.get("text") or ""
    usage = body.get("usage") or {}
    if c.get("finish_reason") != "length":
        out.error = f"finish_reason {c.get('finish_reason')!r}, expected 'length'"
    elif usage.get("completion_tokens") != p.max_tokens:
        out.error = f"usage {usage}, expected {p.max_tokens} completion tokens"
    else:
        out.ok = True


def _check_error_body(raw: bytes) -> str:
    """'' when ``raw`` is OpenAI's error JSON, else what is wrong with it."""
    try:
        body = json.loads(raw)
    except ValueError:
        return f"not JSON: {raw[:120]!r}"
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return f"no error object: {raw[:160]!r}"
    if set(err) != ERROR_KEYS:
        return f"error keys {sorted(err)}, expected {sorted(ERROR_KEYS)}"
    if not isinstance(err["message"], str) or not err["message"]:
        return "empty error message"
    return ""


async def send(client: httpx.AsyncClient, url: str, p: Planned) -> Outcome:
    out = Outcome(p)
    kw: dict = {}
    if p.content is not None:
        kw = {"content": p.content, "headers": {"content-type": "application/json"}}
    elif p.body is not None:
        kw = {"json": p.body}
    t0 = time.perf_counter()
    try:
        async with client.stream(p.method, f"{url}{p.path}", **kw) as r:
            out.status = r.status_code
            if r.status_code >= 500:
                out.server_error = True
            if p.kind == "garbage":
                raw = await r.aread()
                if not 400 <= r.status_code < 500:
                    out.error = f"status {r.status_code}: {raw[:160]!r}"
                else:
                    out.error = _check_error_body(raw)
                    out.ok = not out.error
            elif r.status_code != 200:
                out.error = f"status {r.status_code}: {(await r.aread())[:200]!r}"
            elif p.stream:
                if not r.headers.get("content-type", "").startswith("text/event-stream"):
                    out.error = f"content-type {r.headers.get('content-type')!r} for a stream"
                else:
                    await _read_stream(r, p, out)
            else:
                _check_full(json.loads(await r.aread()), p, out)
    except (httpx.HTTPError, OSError) as e:
        out.transport_error = True
        out.error = f"{type(e).__name__}: {e}"
    except ValueError as e:  # JSON of a 200 answer
        out.error = f"{type(e).__name__}: {e}"
    out.latency = time.perf_counter() - t0
    return out


async def _baseline(url: str, keys: list[tuple[str, str, int]], model: str,
                    timeout: float) -> dict[tuple[str, str, int], str | Exception]:
    answers: dict[tuple[str, str, int], str | Exception] = {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout)) as client:
        for key in keys:
            path, prompt, max_tokens = key
            out = await send(client, url, Planned("good", path=path, prompt=prompt, max_tokens=max_tokens,
                                                  body=_request_body(path, prompt, model, max_tokens, False)))
            answers[key] = out.text if out.ok else RuntimeError(f"{key}: {out.error}")
    return answers


async def _storm(url: str, planned: list[Planned], concurrency: int, timeout: float) -> list[Outcome]:
    queue: asyncio.Queue[Planned] = asyncio.Queue()
    for p in planned:
        queue.put_nowait(p)
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        async def worker() -> None:
            while True:
                try:
                    p = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                outcomes.append(await send(client, url, p))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def _wait_idle(url: str, timeout: float) -> tuple[dict[str, float], bool, float]:
    t0 = time.time()
    while True:
        m = read_metrics(url)
        idle = (m.get("quickdraft:kv_cache_usage_perc", 1.0) == 0 and m.get("quickdraft:num_requests_running", 1.0) == 0
                and m.get("quickdraft:num_requests_waiting", 0.0) == 0)
        if idle or time.time() - t0 > timeout:
            return m, idle, time.time() - t0
        time.sleep(0.2)


def _room(url: str, model: str, prompts: list[str], max_model_len: int) -> dict[tuple[str, str], int]:
    """Tokens left after each prompt, per endpoint (from /tokenize)."""
    room = {}
    for prompt in prompts:
        for path in (COMPLETIONS, CHAT):
            req = ({"model": model, "messages": [{"role": "user", "content": prompt}]} if path == CHAT
                   else {"model": model, "prompt": prompt})
            r = httpx.post(f"{url}/tokenize", json=req, timeout=30)
            r.raise_for_status()
            room[(path, prompt)] = max_model_len - r.json()["count"]
    return room


def run_soak(model: str, *, num_requests: int = 2000, concurrency: int = 32, speculative_config: dict | None = None,
             server_args: list[str] | None = None, seed: int = 0, label: str | None = None,
             prompts: list[str] | None = None, max_tokens_choices: tuple[int, ...] = MAX_TOKENS_CHOICES,
             garbage_kinds: list[str] | None = None, idle_timeout: float = 10.0, startup_timeout: float = 600.0,
             request_timeout: float = 600.0, log=None) -> SoakReport:
    """Start a server for ``model`` (with ``server_args`` and ``speculative_config``), compute the
    alone-answers, run the storm, wait for idle and return the report."""
    prompts = list(prompts or PROMPTS)
    label = label or ("plain" if speculative_config is None else f"spec {speculative_config.get('method')}")
    report = SoakReport(label, model, speculative_config)
    say = log or (lambda msg: print(f"[{label}] {msg}", file=sys.stderr, flush=True))
    say("starting the server ...")
    server = ServerProcess(model, list(server_args or []), speculative_config, startup_timeout)
    try:
        models = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]
        name, max_model_len = models[0]["id"], int(models[0]["max_model_len"])
        room = _room(server.url, name, prompts, max_model_len)
        rng = random.Random(seed)
        planned = plan(rng, num_requests, name, prompts, tuple(max_tokens_choices), room, max_model_len,
                       garbage_kinds)
        keys = sorted({(p.path, p.prompt, p.max_tokens) for p in planned if p.kind == "good"})
        say(f"{len(keys)} baseline requests, one at a time ...")
        answers = asyncio.run(_baseline(server.url, keys, name, request_timeout))
        report.baseline_requests = len(keys)
        for key, ans in answers.items():
            if isinstance(ans, Exception):
                report.fail(f"baseline failed: {ans}")
            else:
                report.expected[key] = ans
        before = read_metrics(server.url)
        say(f"{num_requests} requests, {concurrency} concurrent ...")
        t0 = time.perf_counter()
        outcomes = asyncio.run(_storm(server.url, planned, concurrency, request_timeout))
        report.wall_s = time.perf_counter() - t0
        report.server_alive = server.alive()
        if report.server_alive:
            after, report.kv_idle, report.idle_after_s = _wait_idle(server.url, idle_timeout)
            report.kv_usage_end = after.get("quickdraft:kv_cache_usage_perc", float("nan"))
            report.running_end = after.get("quickdraft:num_requests_running", float("nan"))
            report.waiting_end = after.get("quickdraft:num_requests_waiting", float("nan"))

            def delta(key: str) -> float:
                return after.get(key, 0.0) - before.get(key, 0.0)

            report.spec_draft_tokens = delta("quickdraft:spec_decode_num_draft_tokens_total")
            report.spec_accepted_tokens = delta("quickdraft:spec_decode_num_accepted_tokens_total")
            report.server_aborts = delta("quickdraft:request_success_total{finished_reason=abort}")
            report.preemptions = delta("quickdraft:num_preemptions_total")
        else:
            report.fail(f"the server died during the storm:\n{server.log_tail()}")
        report.peak_rss_mib = server.peak_rss / 2**20
    finally:
        server.close()
    _tally(report, outcomes)
    return report


def _tally(report: SoakReport, outcomes: list[Outcome]) -> None:
    statuses: Counter[int] = Counter()
    latencies = []
    for o in outcomes:
        p = o.planned
        report.requests_sent += 1
        if o.status is not None and o.status != 200:
            statuses[o.status] += 1
        if o.server_error:
            report.server_errors += 1
            report.fail(f"{p.kind} {p.method} {p.path} {p.garbage_kind}: {o.error}")
        if o.transport_error:
            if p.kind == "disconnect":
                report.disconnecter_transport_errors += 1
            else:
                report.transport_errors += 1
                report.fail(f"transport error, {p.kind} {p.method} {p.path}: {o.error}")
        if p.kind == "good":
            report.well_behaved += 1
            if o.ok:
                report.served_ok += 1
                latencies.append(o.latency)
                report.recorded.append((p.path, p.prompt, p.max_tokens, o.text))
                exp = report.expected.get((p.path, p.prompt, p.max_tokens))
                if exp is None or o.text != exp:
                    report.mismatches += 1
                    report.fail(f"mismatch {p.path} stream={p.stream} {p.prompt!r} max_tokens={p.max_tokens}: "
                                f"{o.text!r} != alone {exp!r}")
            else:
                report.well_behaved_failed += 1
                if not o.server_error and not o.transport_error:
                    report.fail(f"well-behaved {p.path} stream={p.stream}: {o.error}")
        elif p.kind == "huge":
            report.huge += 1
            if o.ok:
                report.served_ok += 1
            else:
                report.huge_failed += 1
                if not o.server_error and not o.transport_error:
                    report.fail(f"huge {p.path} stream={p.stream} max_tokens={p.max_tokens}: {o.error}")
        elif p.kind == "disconnect":
            report.disconnecters += 1
            report.disconnects += o.disconnected
            if not o.disconnected and not o.transport_error and not o.server_error:
                report.fail(f"disconnecter {p.path} did not get {p.events} events: {o.error or 'ended early'}")
        else:
            report.garbage += 1
            if not o.ok:
                report.garbage_violations += 1
                if not o.server_error:
                    what = repr(p.body if p.body is not None else p.content)[:200]
                    report.fail(f"garbage {p.garbage_kind} {p.method} {p.path} {what}: {o.error}")
    report.errors_by_status = dict(sorted(statuses.items()))
    report.latency_p50, report.latency_p99 = _pct(latencies, 0.5), _pct(latencies, 0.99)


# ---- command line -----------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="model to serve (default: the embedded SmolLM2 GGUF)")
    ap.add_argument("--num-requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    ap.add_argument("--modes", default=None,
                    help="comma-separated runs, each on a fresh server: plain, ngram (%s), spec "
                         "(--speculative-config); default: spec with --speculative-config, else plain"
                         % json.dumps(NGRAM).replace("%", "%%"))
    ap.add_argument("--speculative-config", type=json.loads, default=None, help="speculation of mode `spec` (JSON)")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--kv-cache-memory", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--garbage-kinds", default=None,
                    help="comma-separated garbage kinds, or `all` (default: %s; also: %s)"
                         % (",".join(GARBAGE_KINDS), ",".join(EXTRA_GARBAGE_KINDS)))
    ap.add_argument("--idle-timeout", type=float, default=10.0, help="seconds for KV usage to reach 0 at the end")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--request-timeout", type=float, default=600)
    args, extra = ap.parse_known_args()
    modes = (args.modes or ("spec" if args.speculative_config else "plain")).split(",")
    configs: dict[str, dict | None] = {"plain": None, "ngram": NGRAM, "spec": args.speculative_config}
    for mode in modes:
        if mode not in configs:
            ap.error(f"unknown mode {mode!r} (plain, ngram, spec)")
        if mode == "spec" and not args.speculative_config:
            ap.error("mode spec needs --speculative-config")
    server_args = list(extra)
    for flag, value in [("--max-model-len", args.max_model_len), ("--kv-cache-memory", args.kv_cache_memory),
                        ("--dtype", args.dtype), ("--device", args.device), ("--max-num-seqs", args.max_num_seqs)]:
        if value is not None:
            server_args += [flag, str(value)]
    garbage_kinds = None
    if args.garbage_kinds:
        known = GARBAGE_KINDS + EXTRA_GARBAGE_KINDS
        garbage_kinds = known if args.garbage_kinds == "all" else args.garbage_kinds.split(",")
        if not set(garbage_kinds) <= set(known):
            ap.error(f"unknown garbage kinds {sorted(set(garbage_kinds) - set(known))} ({', '.join(known)})")
    model = args.model or default_model()
    reports = []
    for mode in modes:
        spec = configs[mode]
        label = mode if mode != "spec" else f"spec {spec.get('method')}"
        reports.append(run_soak(model, num_requests=args.num_requests, concurrency=args.concurrency,
                                speculative_config=spec, server_args=server_args, seed=args.seed, label=label,
                                garbage_kinds=garbage_kinds, idle_timeout=args.idle_timeout,
                                startup_timeout=args.startup_timeout, request_timeout=args.request_timeout))
    print(f"soak of {model}: {args.num_requests} requests, {args.concurrency} concurrent, seed {args.seed}"
          + (f", server flags {' '.join(server_args)}" if server_args else ""))
    print(format_table(reports))
    for r in reports:
        for f in r.failures:
            print(f"[{r.label}] {f}")
    sys.exit(0 if all(r.ok for r in reports) else 1)


if __name__ == "__main__":
    main()
