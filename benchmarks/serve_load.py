"""Load check of `quickdraft serve`: many concurrent streaming chat requests against one server.

Starts a server on 127.0.0.1 (or uses --url), sends --num-requests requests with at most
--concurrency in flight (streaming, so time to first token is measured at the client), and
prints throughput, p50/p99 latency and time to first token, and the number of failed requests.
With a speculative config it also prints the server's draft acceptance from /metrics.
`--compare` runs the same load without and with speculation and checks that greedy answers agree.

    python benchmarks/serve_load.py [MODEL] [--num-requests 200] [--concurrency 16] [--max-tokens 64]
        [--speculative-config '{"method": "ngram", "num_speculative_tokens": 3}'] [--compare]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from prompts import CATEGORIES  # noqa: E402

DEFAULT_SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
TOPICS = ["the moon", "bread", "rivers", "chess", "volcanoes", "bees", "trains", "music", "glaciers", "paper",
          "bicycles", "tea", "owls", "bridges", "clouds", "maps"]


def build_prompts(n: int) -> list[str]:
    """Cycle through the benchmark categories; open-ended ones vary by topic."""
    base = list(CATEGORIES.values())
    out = []
    for i in range(n):
        kind = i % (len(base) + 1)
        if kind < len(base):
            out.append(base[kind])
        else:
            out.append(f"Write a short paragraph about {TOPICS[(i // (len(base) + 1)) % len(TOPICS)]}.")
    return out


@dataclass
class Result:
    ok: bool
    latency: float = 0.0
    ttft: float | None = None
    completion_tokens: int = 0
    text: str = ""
    error: str = ""


@dataclass
class RunSummary:
    label: str
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0
    spec: dict[str, float] = field(default_factory=dict)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, url: str, model: str | None, prompt: str, args) -> Result:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
            "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    if args.ignore_eos:
        body["ignore_eos"] = True
    t0 = time.perf_counter()
    ttft = None
    text = []
    tokens = 0
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return Result(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return Result(False, error=str(chunk["error"]))
                for choice in chunk.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                        text.append(piece)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
            if not done:
                return Result(False, error="stream ended without [DONE]")
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return Result(False, error=f"{type(e).__name__}: {e}")
    latency = time.perf_counter() - t0
    return Result(True, latency, ttft if ttft is not None else latency, tokens, "".join(text))


async def drive(url: str, model: str | None, prompts: list[str], args,
                api_key: str | None) -> tuple[list[Result], float]:
    sem = asyncio.Semaphore(args.concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout), limits=limits,
                                 headers=headers) as client:
        async def bounded(p: str) -> Result:
            async with sem:
                return await one_request(client, url, model, p, args)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        return list(results), time.perf_counter() - t0


def read_spec_metrics(url: str, api_key: str | None) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("quickdraft:spec_decode") and "position" not in s.labels:
                out[s.name.removeprefix("quickdraft:spec_decode_").removesuffix("_total")] = s.value
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args, spec: dict | None) -> None:
        self.port = args.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "quickdraft", "serve", *([args.model] if args.model else []),
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", args.dtype,
               "--max-num-seqs", str(args.max_num_seqs), "--uvicorn-log-level", "warning",
               "--disable-uvicorn-access-log", "--disable-log-stats"]
        if args.max_model_len:
            cmd += ["--max-model-len", str(args.max_model_len)]
        if spec is not None:
            cmd += ["--speculative-config", json.dumps(spec)]
        env = {**os.environ}
        env.pop("QUICKDRAFT_API_KEY", None)
        repo = Path(__file__).resolve().parent.parent
        env["PYTHONPATH"] = f"{repo}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(repo)
        self.proc = subprocess.Popen(cmd, env=env)
        deadline = time.time() + args.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.close()
                raise RuntimeError("the server did not become healthy in time")
            time.sleep(0.25)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_once(args, spec: dict | None, label: str) -> RunSummary:
    prompts = build_prompts(args.num_requests)
    server = None
    url, api_key = args.url, args.api_key
    if url is None:
        print(f"[{label}] starting the server ...", file=sys.stderr, flush=True)
        server = ServerProcess(args, spec)
        url, api_key = server.url, None
    try:
        if args.warmup:
            asyncio.run(drive(url, args.served_model_name, prompts[:args.concurrency], args, api_key))
        before = read_spec_metrics(url, api_key)
        print(f"[{label}] {len(prompts)} requests, {args.concurrency} concurrent ...", file=sys.stderr, flush=True)
        results, wall = asyncio.run(drive(url, args.served_model_name, prompts, args, api_key))
        after = read_spec_metrics(url, api_key)
    finally:
        if server is not None:
            server.close()
    spec_delta = {k: after[k] - before.get(k, 0.0) for k in after}
    return RunSummary(label, results, wall, spec_delta)


def report(s: RunSummary) -> None:
    ok = [r for r in s.results if r.ok]
    failed = [r for r in s.results if not r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    lat = [r.latency for r in ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    print(f"== {s.label} ==")
    print(f"  requests: {len(ok)} ok, {len(failed)} failed, in {s.wall:.1f} s ({len(ok) / s.wall:.2f} req/s)")
    print(f"  output throughput: {tokens / s.wall:.1f} tok/s ({tokens} tokens, "
          f"{tokens / max(len(ok), 1):.1f} per request)")
    mean = statistics.fmean(lat) if lat else float("nan")
    print(f"  latency: p50 {_pct(lat, 0.5):.2f} s, p99 {_pct(lat, 0.99):.2f} s, mean {mean:.2f} s")
    print(f"  time to first token: p50 {_pct(ttft, 0.5):.3f} s, p99 {_pct(ttft, 0.99):.3f} s")
    if s.spec.get("num_draft_tokens"):
        drafts, drafted, accepted = (s.spec[k] for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"))
        print(f"  speculation: {int(drafts)} drafts, {int(drafted)} drafted, {int(accepted)} accepted "
              f"(acceptance {accepted / drafted:.1%}, mean acceptance length {1 + accepted / max(drafts, 1):.2f})")
    for r in failed[:5]:
        print(f"  failure: {r.error}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="model for the started server (default: SmolLM2)")
    ap.add_argument("--url", default=None, help="use a running server instead of starting one")
    ap.add_argument("--api-key", default=os.environ.get("QUICKDRAFT_API_KEY"), help="for --url")
    ap.add_argument("--served-model-name", default=None, help="model name sent in requests (default: none)")
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    ap.add_argument("--speculative-config", type=json.loads, default=None,
                    help="speculation for the started server (JSON)")
    ap.add_argument("--compare", action="store_true",
                    help="run without and with speculation (--speculative-config, default ngram k=3)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--port", type=int, default=0, help="port for the started server (default: a free one)")
    ap.add_argument("--warmup", action="store_true", help="one untimed round of --concurrency requests first")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--request-timeout", type=float, default=600)
    args = ap.parse_args()
    if args.compare and args.url:
        ap.error("--compare starts its own servers; drop --url")
    if args.compare:
        spec = args.speculative_config or DEFAULT_SPEC
        runs = [run_once(args, None, "no speculation"), run_once(args, spec, f"speculation {json.dumps(spec)}")]
    else:
        label = f"speculation {json.dumps(args.speculative_config)}" if args.speculative_config else "no speculation"
        runs = [run_once(args, args.speculative_config, label)]
    for s in runs:
        report(s)
    if len(runs) == 2:
        base, spec_run = runs
        t0 = sum(r.completion_tokens for r in base.results if r.ok) / base.wall
        t1 = sum(r.completion_tokens for r in spec_run.results if r.ok) / spec_run.wall
        p50_base = _pct([r.latency for r in base.results if r.ok], 0.5)
        p50_spec = _pct([r.latency for r in spec_run.results if r.ok], 0.5)
        print(f"speculation / none: throughput x{t1 / t0:.2f}, p50 latency x{p50_spec / p50_base:.2f}")
        if args.temperature == 0:
            same = sum(a.ok and b.ok and a.text == b.text for a, b in zip(base.results, spec_run.results))
            print(f"greedy answers identical with and without speculation: {same}/{len(base.results)}")
    failed = sum(not r.ok for s in runs for r in s.results)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
