"""quickdraft on Ray: offline batches on Ray Data and replicated serving on Ray Serve, each
against the single-process engine (the oracle: the same weights through `LLM.generate` /
`LLM.chat`, whose own exactness the other tests establish)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
import httpx  # noqa: E402
import openai  # noqa: E402
import ray.data  # noqa: E402

from quickdraft import LLM, SamplingParams  # noqa: E402
from quickdraft.ray import ProcessorConfig, build_processor, summarize  # noqa: E402
from quickdraft.ray.rows import OUTPUT_COLUMNS, prepare_row, sampling_params_for  # noqa: E402
from quickdraft.ray.serve import REPLICA_HEADER  # noqa: E402
from test_server import free_port, wait_healthy  # noqa: E402
from tiny_models import self_copy_prompts  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = dict(dtype="float32", device="cpu", max_model_len=256)
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
GREEDY = {"temperature": 0, "max_tokens": 24, "ignore_eos": True}
TOPICS = ["the moon", "bread", "rivers", "chess", "volcanoes", "bees", "trains", "music", "glaciers", "paper"]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with this machine's 2 CPUs (one per replica)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def tiny_rows(llm: LLM) -> list[dict]:
    """40 rows: texts, chats, and self-copying token prompts (n-gram drafts accepted by construction)."""
    rows: list[dict] = []
    copying = self_copy_prompts(llm, [70, 75, 80, 85, 90, 95, 100, 105], seed=11)
    for i in range(40):
        if i % 5 == 0:
            rows.append({"id": i, "prompt_token_ids": copying[i // 5]})
        elif i % 5 == 1:
            rows.append({"id": i, "messages": [{"role": "user", "content": f"Tell me about {TOPICS[i % 10]}."}]})
        else:
            rows.append({"id": i, "prompt": f"{TOPICS[i % 10]} {i}: the quick brown fox"})
    rows[3]["sampling_params"] = {"max_tokens": 7}  # a row's own parameters override the processor's
    rows[4]["sampling_params"] = {"temperature": 0.8, "seed": 99}
    return [{"prompt": None, "messages": None, "prompt_token_ids": None, "sampling_params": None, **r} for r in rows]


def offline(llm: LLM, rows: list[dict], defaults: dict) -> list:
    """Each row through the single-process engine, one call per row."""
    outs = []
    for r in rows:
        sp = sampling_params_for(defaults, r.get("sampling_params"))
        if r.get("messages") is not None:
            outs.append(llm.chat(r["messages"], sp, use_tqdm=False)[0])
        elif r.get("prompt") is not None:
            outs.append(llm.generate(r["prompt"], sp, use_tqdm=False)[0])
        else:
            outs.append(llm.generate({"prompt_token_ids": r["prompt_token_ids"]}, sp, use_tqdm=False)[0])
    return outs


def check_rows(got: list[dict], rows: list[dict], want: list) -> None:
    assert [g["id"] for g in got] == [r["id"] for r in rows]  # input order, input columns kept
    for g, r, w in zip(got, rows, want):
        assert g["error"] is None, g["error"]
        assert g["generated_token_ids"] == w.outputs[0].token_ids, r
        assert g["generated_text"] == w.outputs[0].text
        assert g["finish_reason"] == w.outputs[0].finish_reason
        assert g["num_input_tokens"] == len(w.prompt_token_ids)
        assert g["num_generated_tokens"] == len(w.outputs[0].token_ids)
        assert set(OUTPUT_COLUMNS) <= set(g)


# ---- rows, without Ray ------------------------------------------------------------------------------
def test_row_preparation_and_its_errors(tiny_llm):
    tok = tiny_llm.get_tokenizer()
    p = prepare_row({"prompt": "hi", "sampling_params": {"max_tokens": 3, "top_p": None}}, {"max_tokens": 9}, tok)
    assert p.prompt_token_ids == tok.encode("hi") and p.params.max_tokens == 3 and p.params.top_p == 1.0
    chat = [{"role": "user", "content": "hi"}]
    p = prepare_row({"messages": chat}, {}, tok)
    assert p.prompt == tok.apply_chat_template(chat, add_generation_prompt=True)
    bad = [({}, "exactly one of prompt"), ({"prompt": "a", "messages": chat}, "it has prompt, messages"),
           ({"prompt": 5}, "prompt must be a string"), ({"messages": []}, "messages must be"),
           ({"prompt_token_ids": ["a"]}, "prompt_token_ids must be"),
           ({"prompt": "a", "sampling_params": {"temprature": 1}}, "'temprature'"),
           ({"prompt": "a", "sampling_params": {"n": 2}}, "n=2"),
           ({"prompt": "a", "sampling_params": [1]}, "sampling_params must be a dict")]
    for row, needle in bad:
        with pytest.raises((ValueError, TypeError), match=needle):
            prepare_row(row, {}, tok)
    with pytest.raises(ValueError, match="positive integer"):
        ProcessorConfig(model="m", concurrency=0)
    with pytest.raises(ValueError, match="temperature"):
        ProcessorConfig(model="m", sampling_params={"temperature": -1})


# ---- Ray Data ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [None, NGRAM], ids=["plain", "ngram"])
def test_tiny_batch_on_two_replicas_equals_llm_generate(local_ray, tiny_checkpoint, spec):
    path = str(tiny_checkpoint("mistral"))
    llm = LLM(path, **TINY)
    rows = tiny_rows(llm)
    want = offline(llm, rows, GREEDY)
    config = ProcessorConfig(model=path, engine_kwargs={**TINY, "speculative_config": spec}, sampling_params=GREEDY,
                             concurrency=2, batch_size=8)
    got = build_processor(config)(ray.data.from_items(rows)).take_all()
    check_rows(got, rows, want)
    assert got[3]["num_generated_tokens"] == 7
    summary = summarize(got)
    assert summary.num_rows == 40 and summary.num_errors == 0
    assert summary.num_generated_tokens == sum(len(w.outputs[0].token_ids) for w in want)
    if spec is None:
        assert summary.num_drafts == summary.num_draft_tokens == summary.num_accepted_tokens == 0
    else:
        copying = [g for g in got if g["prompt_token_ids"] is not None]
        assert all(g["num_accepted_tokens"] > 0 for g in copying)  # every self-copying row had accepted drafts
        assert summary.num_draft_tokens >= summary.num_accepted_tokens > 0 and summary.num_drafts > 0
        assert summary.num_accepted_tokens == sum(g["num_accepted_tokens"] for g in got)
        assert summary.mean_acceptance_length == 1 + summary.num_accepted_tokens / summary.num_drafts
        assert "acceptance" in str(summary)


def test_bad_rows_get_their_error_and_the_others_run(local_ray, tiny_checkpoint, tiny_llm):
    path = str(tiny_checkpoint("llama"))
    good = [{"prompt": f"{t}: the quick brown fox"} for t in TOPICS[:6]]
    rows = [good[0], {"prompt": "x", "sampling_params": {"temperature": -1.0}}, good[1],
            {"prompt": "word " * 400}, good[2], {"messages": None, "prompt": None}, good[3],
            {"prompt_token_ids": [5, 10**6]}, good[4],
            {"prompt": "a", "sampling_params": {"max_tokens": 0}}, good[5],
            # valid, but its constraints leave no token: the engine aborts it alone while its batch runs
            {"prompt": "a", "sampling_params": {"bad_words": ["a"], "structured_outputs": {"regex": "a"}}}]
    rows = [{"id": i, "prompt": None, "messages": None, "prompt_token_ids": None, "sampling_params": None, **r}
            for i, r in enumerate(rows)]
    config = ProcessorConfig(model=path, engine_kwargs=TINY, sampling_params=GREEDY, concurrency=2, batch_size=4)
    ds = build_processor(config)(ray.data.from_items(rows)).materialize()
    got = ds.take_all()
    errors = {g["id"]: g["error"] for g in got if g["error"] is not None}
    assert sorted(errors) == [1, 3, 5, 7, 9, 11]
    assert "temperature" in errors[1] and "-1.0" in errors[1]
    assert "256" in errors[3]  # longer than max_model_len
    assert "exactly one of" in errors[5]
    assert "1000000" in errors[7]
    assert "max_tokens" in errors[9]
    assert errors[11].startswith("UnsatisfiableRequestError") and "bad_words" in errors[11]
    for i in errors:
        assert got[i]["generated_text"] is None and got[i]["generated_token_ids"] is None
    want = tiny_llm.generate([r["prompt"] for r in good], SamplingParams(**GREEDY), use_tqdm=False)
    assert [g["generated_token_ids"] for g in got if g["error"] is None] == [w.outputs[0].token_ids for w in want]
    summary = summarize(ds)  # from the dataset itself, as a job would
    assert (summary.num_rows, summary.num_errors) == (12, 6)


@pytest.mark.parametrize("spec", [None, {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 1,
                                         "prompt_lookup_max": 4}], ids=["plain", "ngram"])
def test_smollm2_batch_on_two_replicas_equals_llm_chat(local_ray, smollm2_gguf, smollm2_quantized, spec):
    """The default path (GGUF blocks as stored) on 2 replicas, 40 chats that copy text from their
    prompt (so that n-gram drafts get accepted)."""
    rows = [{"id": i, "messages": [{"role": "user", "content":
                                    f"Repeat this sentence twice: {TOPICS[i % 10]} number {i} is on the list."}]}
            for i in range(40)]
    params = {"temperature": 0, "max_tokens": 20}
    want = smollm2_quantized.chat([r["messages"] for r in rows], SamplingParams(**params), use_tqdm=False)
    config = ProcessorConfig(model=str(smollm2_gguf), engine_kwargs={"max_model_len": 1024, "speculative_config": spec},
                             sampling_params=params, concurrency=2, batch_size=10)
    got = build_processor(config)(ray.data.from_items(rows)).take_all()
    check_rows(got, rows, want)
    summary = summarize(got)
    if spec is not None:
        assert summary.num_draft_tokens >= summary.num_accepted_tokens > 0


# ---- Ray Serve, through the CLI ---------------------------------------------------------------------
def test_serve_two_replicas_through_the_cli(tiny_checkpoint):
    """`quickdraft serve --ray --num-replicas 2` (its own local Ray instance): the openai client
    gets the offline greedy answers, streamed too; both replicas served; errors and /metrics are
    the single server's; SIGINT deletes the replicas and exits 0."""
    path = str(tiny_checkpoint("mistral"))
    llm = LLM(path, **TINY)
    port = free_port()
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "quickdraft", "serve", path, "--ray", "--num-replicas", "2", "--port", str(port),
         "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "256",
         "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}'],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, 240, alive=lambda: proc.poll() is None, poll=1)
        except RuntimeError as e:
            pytest.fail(f"{e}: {proc.stderr.read().decode()[-3000:] if proc.poll() is not None else ''}")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        prompts = [*[{"prompt_token_ids": p} for p in self_copy_prompts(llm, [70, 90], seed=3)],
                   *[{"prompt": f"{t}: the quick brown fox"} for t in TOPICS]]
        want = llm.generate([{"prompt_token_ids": p["prompt_token_ids"]} if "prompt_token_ids" in p else p["prompt"]
                             for p in prompts], SamplingParams(**GREEDY), use_tqdm=False)

        def ask(p: dict) -> tuple[str, str]:
            r = client.completions.with_raw_response.create(
                model="tiny", prompt=p.get("prompt_token_ids", p.get("prompt")), max_tokens=24, temperature=0,
                extra_body={"ignore_eos": True})
            return r.parse().choices[0].text, r.headers[REPLICA_HEADER]

        # All 12 at once, at least twice over, until both replicas have answered. Serve's router
        # picks by queue length, and the proxy learns of replicas asynchronously: a fresh-clone run
        # once got all 24 answers of two rounds from one replica, so "both" is waited for, bounded
        # in time (a loaded machine starts the second replica late, not never).
        replicas: set[str] = set()
        rounds, deadline = 0, time.monotonic() + 120
        while rounds < 2 or (len(replicas) < 2 and time.monotonic() < deadline):
            with ThreadPoolExecutor(len(prompts)) as pool:
                answers = list(pool.map(ask, prompts))
            assert [a[0] for a in answers] == [w.outputs[0].text for w in want]
            replicas |= {a[1] for a in answers}
            rounds += 1
        assert len(replicas) == 2, f"one replica answered all {rounds * len(prompts)} requests"

        stream = client.completions.create(model="tiny", prompt=prompts[0]["prompt_token_ids"], max_tokens=24,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in stream) == want[0].outputs[0].text
        chat = [{"role": "user", "content": "Tell me about bees."}]
        chat_want = llm.chat(chat, SamplingParams(**GREEDY), use_tqdm=False)[0].outputs[0].text
        stream = client.chat.completions.create(model="tiny", messages=chat, max_tokens=24, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat_want

        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "temperature": -1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
        r = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"})
        assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
        # /metrics is each replica's own: read it until both answered; speculation counted there
        # (Serve routes an idle deployment's sequential requests to one replica: ask 8 at a time)
        seen: dict[str, float] = {}
        with ThreadPoolExecutor(8) as pool:
            for _ in range(20):
                for m in pool.map(lambda _: httpx.get(f"{url}/metrics"), range(8)):
                    seen[m.headers[REPLICA_HEADER]] = _counter(m.text, "quickdraft:spec_decode_num_accepted_tokens_total")
                if len(seen) == 2:
                    break
        assert len(seen) == 2 and sum(seen.values()) > 0
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0


def test_serve_interrupted_while_deploying_exits_cleanly(tiny_checkpoint):
    """SIGINT after Ray has started and before the replicas are all up (a fresh-clone run once
    signalled while the second replica still deployed and got exit status 130 from an unhandled
    KeyboardInterrupt): the deployment is deleted, Ray is left, and the exit status is 0. The
    signal is sent when the CLI logs that Ray is up, which comes before any replica loads."""
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "quickdraft", "serve", str(tiny_checkpoint("mistral")), "--ray", "--num-replicas", "2",
         "--port", str(free_port()), "--dtype", "float32", "--max-model-len", "256"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    try:
        for line in proc.stderr:
            log.append(line)
            if "Deploying" in line and "quickdraft" in line:
                break
        else:
            pytest.fail("the CLI exited before deploying:\n" + "".join(log[-40:]))
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    log.append(rest)
    text = "".join(log)
    assert proc.returncode == 0, text[-3000:]
    assert "Interrupted while deploying" in text


def _counter(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")
