"""A short soak of `quickdraft serve` with faults (benchmarks/soak.py): a real server process on the
tiny random checkpoint under a seeded mix of greedy requests, clients that hang up mid-stream,
garbage requests and outputs up to the end of the context; without and with ngram speculation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("httpx")
pytest.importorskip("psutil")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import soak  # noqa: E402

from quickdraft import SamplingParams  # noqa: E402

# The engine settings of tests/test_server.py's servers.
TINY_ARGS = ["--dtype", "float32", "--device", "cpu", "--max-model-len", "256", "--kv-cache-memory", "8MiB"]


@pytest.mark.parametrize("mode", ["plain", "ngram"])
def test_soak(mode, tiny_checkpoint, tiny_llm):
    spec = soak.NGRAM if mode == "ngram" else None
    r = soak.run_soak(str(tiny_checkpoint("llama")), num_requests=150, concurrency=12, speculative_config=spec,
                      server_args=TINY_ARGS, seed=0, label=mode, startup_timeout=180, request_timeout=180)
    print("\n" + soak.format_table([r]))
    detail = "\n".join(r.failures)
    assert r.server_alive, detail
    assert r.requests_sent == 150
    # No 5xx, no error event inside a stream, no dropped connection that the client did not drop.
    assert r.server_errors == 0 and not any(s >= 500 for s in r.errors_by_status), detail
    assert r.transport_errors == 0 and r.disconnecter_transport_errors == 0, detail
    # Every well-behaved and huge request answered in full; every kind of garbage met, each with
    # a 4xx and OpenAI's error JSON.
    assert r.well_behaved > 50 and r.well_behaved_failed == 0, detail
    assert r.huge > 0 and r.huge_failed == 0, detail
    assert r.served_ok == r.well_behaved + r.huge
    assert r.garbage >= len(soak.GARBAGE_KINDS) and r.garbage_violations == 0, detail
    assert set(r.errors_by_status) <= set(range(400, 500)) and {400, 404, 405} <= set(r.errors_by_status)
    # Hang-ups happened and the server aborted what they left behind; the KV cache emptied.
    assert r.disconnects > 0 and r.server_aborts >= r.disconnects / 2, (r.disconnects, r.server_aborts)
    assert r.kv_idle and r.kv_usage_end == 0 and r.running_end == 0 and r.waiting_end == 0
    # Greedy answers under load are the answers alone.
    assert r.mismatches == 0, detail
    assert len(r.recorded) == r.well_behaved
    if spec is not None:
        assert r.spec_draft_tokens > 0
    else:
        assert r.spec_draft_tokens == 0

    # The alone-answers are the offline LLM's (the same SamplingParams; chat through the template).
    keys = sorted(r.expected)
    comp = [k for k in keys if k[0] == soak.COMPLETIONS]
    chat = [k for k in keys if k[0] == soak.CHAT]
    picks = [comp[0], chat[0], max(comp + chat, key=lambda k: (k[2], k))]
    assert len(set(picks)) == 3
    for path, prompt, max_tokens in picks:
        params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens)
        if path == soak.CHAT:
            out = tiny_llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)[0]
        else:
            out = tiny_llm.generate(prompt, params, use_tqdm=False)[0]
        assert out.outputs[0].text == r.expected[(path, prompt, max_tokens)], (path, prompt, max_tokens)


def test_format_table():
    a = soak.SoakReport("plain", "m", None, requests_sent=3, errors_by_status={400: 2, 404: 1}, kv_idle=True,
                        kv_usage_end=0.0, running_end=0, idle_after_s=0.1)
    b = soak.SoakReport("ngram", "m", soak.NGRAM, requests_sent=3, mismatches=1)
    table = soak.format_table([a, b])
    lines = table.splitlines()
    assert lines[0] == "| | plain | ngram |" and lines[1] == "|---|---|---|"
    assert all(line.count("|") == 4 for line in lines)
    assert "400: 2, 404: 1" in table and "| verdict | PASS | FAIL |" in table
    assert a.ok and not b.ok
