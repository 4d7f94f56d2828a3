"""One request's trouble never fails another (engine/errors.py).

A request that passes validation but cannot go on at run time (its constraints leave no token
to draw, its rows come out of the model non-finite, its grammar or its drafter fails on it)
is aborted alone: finish_reason "abort", its error in ``RequestOutput.error``, its KV blocks
freed. Every other request in the batch gets exactly the output it gets when run alone (the
oracle: the same engine, the request by itself). Checked offline, through `AsyncLLM` and
through the server, plain and under speculation, and by a fuzz of random batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random

import pytest
import torch

from quickdraft import LLM, SamplingParams
from quickdraft.engine.errors import RequestError, UnsatisfiableRequestError
from quickdraft.entrypoints.async_engine import AsyncLLM, RequestGroup
from quickdraft.sampling_params import StructuredOutputsParams
from tiny_models import self_copy_prompts

TINY_KW = dict(dtype="float32", device="cpu", max_model_len=256)
GOOD_PROMPTS = ["def fibonacci(n):", "The quick brown fox", "import torch\nx = ", "| name | value |\n| alpha |"]


def good_params() -> list[SamplingParams]:
    """Valid requests of several kinds: greedy, seeded sampling with logprobs, a stop string, n=2."""
    return [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
            SamplingParams(temperature=0.9, seed=11, max_tokens=20, logprobs=3, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=24, stop=["the"], ignore_eos=True),
            SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=16, ignore_eos=True)]


def contradictions(tokenizer) -> dict[str, SamplingParams]:
    """Requests that validate but leave no token to draw at some position (and why)."""
    letters = tokenizer.encode("zq", add_special_tokens=False)
    return {
        # "yes" / "no" are shorter than 10 tokens: then only EOS may follow, which min_tokens bans.
        "choice+min_tokens": SamplingParams(temperature=0, max_tokens=16, min_tokens=10,
                                            structured_outputs=StructuredOutputsParams(choice=["yes", "no"])),
        # The only token that spells "a" is banned.
        "regex+bad_words": SamplingParams(temperature=0, max_tokens=8, bad_words=["a"],
                                          structured_outputs=StructuredOutputsParams(regex="a")),
        # A JSON object starts with "{" (or whitespace): neither is allowed.
        "json+allowed_ids": SamplingParams(temperature=0.8, seed=3, max_tokens=8, allowed_token_ids=letters,
                                           structured_outputs=StructuredOutputsParams(json_object=True)),
    }


def solo(llm: LLM, prompt, params: SamplingParams):
    return llm.generate([prompt], params, use_tqdm=False)[0]


def same_output(a, b) -> bool:
    """Tokens, text, finish reasons and logprobs of every choice."""
    return ([(o.token_ids, o.text, o.finish_reason, o.logprobs) for o in a.outputs]
            == [(o.token_ids, o.text, o.finish_reason, o.logprobs) for o in b.outputs])


def assert_engine_clean(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert not llm.engine.requests and not llm.engine.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_blocks


# ---- offline -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["choice+min_tokens", "regex+bad_words", "json+allowed_ids"])
def test_a_contradictory_request_is_aborted_alone_offline(tiny_llm, case):
    bad = contradictions(tiny_llm.get_tokenizer())[case]
    params = good_params()
    want = [solo(tiny_llm, p, sp) for p, sp in zip(GOOD_PROMPTS, params)]
    prompts = GOOD_PROMPTS[:2] + ["Is the sky blue? Answer:"] + GOOD_PROMPTS[2:]
    outs = tiny_llm.generate(prompts, params[:2] + [bad] + params[2:], use_tqdm=False)
    failed = outs.pop(2)
    assert all(same_output(o, w) for o, w in zip(outs, want))
    assert all(o.error is None for o in outs)
    assert isinstance(failed.error, UnsatisfiableRequestError) and failed.finished
    assert failed.outputs[0].finish_reason == "abort"
    assert f"Request {failed.request_id!r}" in str(failed.error) and "no token can be generated" in str(failed.error)
    assert_engine_clean(tiny_llm)


def test_min_tokens_is_honoured_or_refused_never_ignored(tiny_llm):
    """EOS banned by min_tokens where the grammar allows only EOS: the request is refused with
    that reason (it used to emit token 0, or EOS when token 0 was EOS, ignoring min_tokens);
    where the grammar leaves room, min_tokens holds."""
    bad = contradictions(tiny_llm.get_tokenizer())["choice+min_tokens"]
    out = solo(tiny_llm, "Is it?", bad)
    assert "min_tokens=10" in str(out.error) and "structured_outputs (choice)" in str(out.error)
    assert 0 not in out.outputs[0].token_ids
    roomy = SamplingParams(temperature=0, max_tokens=40, min_tokens=6,
                           structured_outputs=StructuredOutputsParams(regex="[a-z ]{1,30}"))
    out = solo(tiny_llm, "Is it?", roomy)
    assert out.error is None and len(out.outputs[0].token_ids) >= 6


def test_non_finite_logits_of_one_request_abort_it_alone(tiny_llm, monkeypatch):
    """Fault injection: the model's rows of one request turn NaN at its 4th output position.
    That request is aborted with a RequestError (not a client error); the rest are unchanged."""
    engine = tiny_llm.engine
    params = good_params()
    want = [solo(tiny_llm, p, sp) for p, sp in zip(GOOD_PROMPTS, params)]
    victim = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with nan_rows(monkeypatch, tiny_llm, lambda seq: seq.params is victim and seq.num_output_tokens == 3):
        outs = tiny_llm.generate(GOOD_PROMPTS + ["Speculative decoding drafts"], params + [victim], use_tqdm=False)
    failed = outs.pop()
    assert all(same_output(o, w) for o, w in zip(outs, want))
    assert type(failed.error) is RequestError and "not finite" in str(failed.error)
    assert len(failed.outputs[0].token_ids) == 3 and failed.outputs[0].finish_reason == "abort"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@contextlib.contextmanager
def nan_rows(monkeypatch, llm: LLM, hit):
    """Inside the block, the logits rows of every scheduled sequence for which ``hit(seq)`` holds
    come out of the model as NaN."""
    engine = llm.engine
    real = engine.runner.execute

    def execute(inputs):
        logits = real(inputs)
        seqs = [s for r in engine.requests.values() for s in r.seqs if not s.is_finished]
        row = 0
        for inp in inputs:
            n = len(inp.token_ids) - inp.logits_from
            for s in seqs:
                if inp.block_table is engine.block_manager.block_table(s.seq_id) and hit(s):
                    with torch.inference_mode():  # the runner's logits are inference tensors
                        logits[row:row + n] = float("nan")
            row += n
        return logits

    monkeypatch.setattr(engine.runner, "execute", execute)
    yield
    monkeypatch.setattr(engine.runner, "execute", real)


def test_a_grammar_that_fails_while_masking_aborts_its_request_alone(tiny_llm, monkeypatch):
    """Fault injection in one sequence's grammar (its mask fill raises): that request only."""
    from quickdraft.structured_output.xgrammar_backend import XgrammarGrammar

    real = XgrammarGrammar.fill_bitmask

    def fill(self, bitmask, row):
        if getattr(self, "broken", False):
            raise RuntimeError("injected grammar failure")
        return real(self, bitmask, row)

    monkeypatch.setattr(XgrammarGrammar, "fill_bitmask", fill)
    params = good_params()
    want = [solo(tiny_llm, p, sp) for p, sp in zip(GOOD_PROMPTS, params)]
    regex = SamplingParams(temperature=0, max_tokens=12, structured_outputs=StructuredOutputsParams(regex="[a-z]{5,9}"))
    engine = tiny_llm.engine
    for i, (p, sp) in enumerate(zip(GOOD_PROMPTS + ["Numbers:", "Numbers:"], params + [regex, regex])):
        engine.add_request(f"g{i}", p, tiny_llm.get_tokenizer().encode(p), sp)
    engine.requests["g5"].seqs[0].grammar.broken = True
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step()})
    assert all(same_output(outs[f"g{i}"], w) for i, w in enumerate(want))
    assert outs["g4"].error is None and outs["g4"].outputs[0].finish_reason == "stop"
    assert isinstance(outs["g5"].error, RequestError) and "masking its rows" in str(outs["g5"].error)
    assert_engine_clean(tiny_llm)


# ---- under speculation ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def draft_llm(tiny_checkpoint):
    """The tiny Llama drafting for itself: greedy drafts are accepted, so speculation certainly happens."""
    path = str(tiny_checkpoint("llama"))
    return LLM(path, speculative_config={"model": path, "num_speculative_tokens": 4,
                                         "draft_length_policy": "fixed"}, **TINY_KW)


@pytest.fixture(scope="module")
def ngram_llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint("mistral")), speculative_config={
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
        "draft_length_policy": "fixed"}, **TINY_KW)


@pytest.mark.parametrize("engine_name", ["draft_llm", "ngram_llm"])
def test_contradictions_under_speculation_abort_alone(request, engine_name):
    """The bad requests fail (drafts for them end before a row with no token; verification
    fails them where it reaches one); the good requests, drafting all along, are unchanged."""
    llm = request.getfixturevalue(engine_name)
    tok = llm.get_tokenizer()
    if engine_name == "ngram_llm":
        prompts = [{"prompt_token_ids": p} for p in self_copy_prompts(llm, [70, 80, 90], seed=3)]
    else:
        prompts = GOOD_PROMPTS[:3]
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=2, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=20, logprobs=2, ignore_eos=True)]
    want = [solo(llm, p, sp) for p, sp in zip(prompts, params)]
    before = (llm.engine.spec_stats.num_draft_tokens, llm.engine.spec_stats.num_accepted_tokens)
    bad = list(contradictions(tok).values())
    outs = llm.generate(prompts + ["Is it?"] * len(bad), params + bad, use_tqdm=False)
    assert all(same_output(o, w) for o, w in zip(outs, want))
    assert all(isinstance(o.error, UnsatisfiableRequestError) for o in outs[len(prompts):])
    s = llm.engine.spec_stats
    assert s.num_draft_tokens > before[0] and s.num_accepted_tokens > before[1]
    assert_engine_clean(llm)


def test_a_failing_request_with_several_samples_aborts_them_all(tiny_llm):
    """n=2: the request fails as a whole, both samples end with "abort"; the rest are unchanged."""
    bad = contradictions(tiny_llm.get_tokenizer())["json+allowed_ids"]
    bad = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=8, allowed_token_ids=bad.allowed_token_ids,
                         structured_outputs=bad.structured_outputs)
    params = good_params()
    want = [solo(tiny_llm, p, sp) for p, sp in zip(GOOD_PROMPTS, params)]
    outs = tiny_llm.generate(GOOD_PROMPTS + ["x"], params + [bad], use_tqdm=False)
    assert all(same_output(o, w) for o, w in zip(outs, want))
    failed = outs[-1]
    assert isinstance(failed.error, UnsatisfiableRequestError)
    assert [o.finish_reason for o in failed.outputs] == ["abort", "abort"]
    assert_engine_clean(tiny_llm)


def test_a_drafter_that_fails_midway_leaves_the_others_and_their_grammars_intact(draft_llm, monkeypatch):
    """Fault injection inside the draft model's loop, after the grammars advanced through their
    forced tokens and first drafts: the draft runner raises whenever one request is in its batch.
    That request is aborted; the constrained and free good requests beside it get their solo
    outputs (their grammars were rolled back before each sequence was drafted for again)."""
    runner = draft_llm.engine.proposer.runner
    real = runner.execute
    victim = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    engine = draft_llm.engine

    def execute(inputs):
        victims = [s for r in engine.requests.values() for s in r.seqs if s.params is victim]
        if any(inp.block_table is engine.block_manager.block_table(s.seq_id) for inp in inputs for s in victims):
            raise RuntimeError("injected draft-model failure")
        return real(inputs)

    regex = SamplingParams(temperature=0, max_tokens=20, structured_outputs=StructuredOutputsParams(regex="[a-z ]{4,40}"))
    params = [regex, SamplingParams(temperature=0.9, seed=2, max_tokens=20, ignore_eos=True)]
    want = [solo(draft_llm, p, sp) for p, sp in zip(GOOD_PROMPTS, params)]
    monkeypatch.setattr(runner, "execute", execute)
    outs = draft_llm.generate(GOOD_PROMPTS[:2] + ["Speculative"], params + [victim], use_tqdm=False)
    assert all(same_output(o, w) for o, w in zip(outs, want))
    assert outs[0].error is None and outs[0].outputs[0].finish_reason == "stop"
    assert isinstance(outs[2].error, RequestError) and "drafting for it" in str(outs[2].error)
    assert_engine_clean(draft_llm)


def test_a_drafter_that_fails_on_one_sequence_aborts_only_it(draft_llm, monkeypatch):
    """Fault injection: the draft model's proposal raises whenever one request is among those
    it drafts for. The batch is drafted again one sequence at a time; that request is aborted,
    the others keep drafting and are unchanged."""
    proposer = draft_llm.engine.proposer
    real = proposer.propose
    victim = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    def propose(seqs, *args, **kwargs):
        if any(s.params is victim for s in seqs):
            raise RuntimeError("injected drafter failure")
        return real(seqs, *args, **kwargs)

    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=2, max_tokens=20, ignore_eos=True)]
    want = [solo(draft_llm, p, sp) for p, sp in zip(GOOD_PROMPTS, params)]
    monkeypatch.setattr(proposer, "propose", propose)
    accepted = draft_llm.engine.spec_stats.num_accepted_tokens
    outs = draft_llm.generate(GOOD_PROMPTS[:2] + ["Speculative"], params + [victim], use_tqdm=False)
    assert all(same_output(o, w) for o, w in zip(outs, want))
    assert isinstance(outs[2].error, RequestError) and "drafting for it" in str(outs[2].error)
    assert draft_llm.engine.spec_stats.num_accepted_tokens > accepted
    assert_engine_clean(draft_llm)


# ---- AsyncLLM ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["choice+min_tokens", "regex+bad_words", "json+allowed_ids"])
def test_async_engine_fails_the_bad_group_only(tiny_llm, case):
    """Two API calls share the engine's batch: the good one's outputs equal their solo runs;
    the bad one's reading raises its own UnsatisfiableRequestError; with raise_errors=False
    (Ray's rows) the error comes back on the output instead; a request over max_logprobs is
    refused when added, and nothing else notices."""
    tok = tiny_llm.get_tokenizer()
    params = good_params()
    want = [solo(tiny_llm, p, sp) for p, sp in zip(GOOD_PROMPTS, params)]
    bad = contradictions(tok)[case]
    engine = AsyncLLM(tiny_llm)
    engine.start()

    async def main():
        good = RequestGroup(engine)
        await good.add_many([(f"ok-{i}", p, tok.encode(p), sp) for i, (p, sp) in enumerate(zip(GOOD_PROMPTS, params))])
        failing = RequestGroup(engine)
        await failing.add("bad-0", "x", tok.encode("x"), bad)
        quiet = RequestGroup(engine, raise_errors=False)
        await quiet.add("bad-1", "x", tok.encode("x"), bad)
        with pytest.raises(ValueError, match="logprobs must be at most 20"):
            await RequestGroup(engine).add("bad-2", "x", tok.encode("x"), SamplingParams(logprobs=50000))
        return await asyncio.gather(good.results(), failing.results(), quiet.results(), return_exceptions=True)

    try:
        got, raised, quiet = asyncio.run(main())
    finally:
        engine.shutdown()
    assert all(same_output(o, w) for o, w in zip(got, want))
    assert isinstance(raised, UnsatisfiableRequestError) and "bad-0" in str(raised)
    assert isinstance(quiet[0].error, UnsatisfiableRequestError) and quiet[0].outputs[0].finish_reason == "abort"
    assert_engine_clean(tiny_llm)


# ---- validation that matches what the step can run ----------------------------------------------
def test_logprobs_and_counts_are_validated_before_anything_runs(tiny_llm, tiny_checkpoint):
    import numpy as np

    with pytest.raises(ValueError, match=r"logprobs must be at most 20 .*got 50000"):
        tiny_llm.generate("x", SamplingParams(logprobs=50000))
    with pytest.raises(ValueError, match=r"prompt_logprobs must be at most 20 .*got 21"):
        tiny_llm.generate("x", SamplingParams(prompt_logprobs=21))
    for field, value in (("logprobs", 2.5), ("max_tokens", 8.5), ("min_tokens", 1.0), ("n", True),
                         ("prompt_logprobs", "3")):
        with pytest.raises(ValueError, match=f"{field} must be an integer, got {value!r}"):
            SamplingParams(**{field: value})
    with pytest.raises(ValueError, match="stop_token_ids must be a list of integer token ids, got 2.5"):
        SamplingParams(stop_token_ids=[2.5])
    with pytest.raises(ValueError, match="max_logprobs must be"):
        LLM(str(tiny_checkpoint("llama")), max_logprobs=1.5, **TINY_KW)
    # numpy integers are token ids and counts like any other
    p = SamplingParams(max_tokens=np.int64(3), allowed_token_ids=[np.int32(40), 41], logit_bias={np.int64(40): 2},
                       stop_token_ids=np.array([7]), temperature=0)
    assert p.max_tokens == 3 and type(p.max_tokens) is int and p.allowed_token_ids == [40, 41]
    assert p.logit_bias == {40: 2.0} and p.stop_token_ids == [7]
    ids = np.array(tiny_llm.get_tokenizer().encode("The quick brown fox"), dtype=np.int64)
    a = tiny_llm.generate({"prompt_token_ids": ids}, p, use_tqdm=False)[0]
    b = tiny_llm.generate({"prompt_token_ids": ids.tolist()}, p, use_tqdm=False)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids and len(a.outputs[0].token_ids) == 3
    # max_logprobs=-1: the whole vocabulary
    full = LLM(str(tiny_checkpoint("llama")), max_logprobs=-1, **TINY_KW)
    vocab = full.model_config.vocab_size
    out = full.generate("x", SamplingParams(temperature=0, max_tokens=1, logprobs=vocab), use_tqdm=False)[0]
    lp = out.outputs[0].logprobs[0]
    assert len(lp) == vocab and math.isclose(sum(math.exp(v.logprob) for v in lp.values()), 1.0, rel_tol=1e-4)
    with pytest.raises(ValueError, match=f"logprobs must be at most {vocab}"):
        full.generate("x", SamplingParams(logprobs=vocab + 1))


def test_chat_takes_content_parts_and_missing_content_as_the_server_does(tiny_llm):
    """OpenAI content parts are joined text; a message without content is empty text; other
    part types are a ValueError naming them."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]},
             {"role": "assistant"}, {"role": "user", "content": None}]
    plain = [{"role": "user", "content": "hello\nthere"}, {"role": "assistant", "content": ""},
             {"role": "user", "content": ""}]
    sp = SamplingParams(temperature=0, max_tokens=4)
    a, b = tiny_llm.chat(parts, sp, use_tqdm=False)[0], tiny_llm.chat(plain, sp, use_tqdm=False)[0]
    assert a.prompt == b.prompt and a.outputs[0].token_ids == b.outputs[0].token_ids
    with pytest.raises(ValueError, match="Unsupported content part of type 'image_url' in message 0"):
        tiny_llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ValueError, match="string 'role'"):
        tiny_llm.chat([{"content": "no role"}])


# ---- the fuzz ------------------------------------------------------------------------------------
FAULTS = ("choice+min_tokens", "regex+bad_words", "json+allowed_ids", "nan")


def random_good(rng: random.Random) -> SamplingParams:
    kind = rng.choice(["greedy", "seeded", "logprobs", "stop", "n2", "penalty"])
    n = rng.randint(4, 20)
    if kind == "greedy":
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=rng.random() < 0.5)
    if kind == "seeded":
        return SamplingParams(temperature=rng.uniform(0.5, 1.5), seed=rng.randrange(2**64), max_tokens=n, top_k=rng.choice([0, 5]))
    if kind == "logprobs":
        return SamplingParams(temperature=0, max_tokens=n, logprobs=rng.randint(0, 5), ignore_eos=True)
    if kind == "stop":
        return SamplingParams(temperature=0, max_tokens=n, stop=[rng.choice(["e", "the", " ", "("])])
    if kind == "n2":
        return SamplingParams(temperature=1.0, seed=rng.randrange(1000), n=2, max_tokens=n, ignore_eos=True)
    return SamplingParams(temperature=0, max_tokens=n, repetition_penalty=1.3, presence_penalty=0.5, ignore_eos=True)


def run_fuzz(llm: LLM, monkeypatch, rounds: int, seed: int) -> int:
    """Random batches of valid requests with invalid-at-run-time ones mixed in: every valid
    output equals its solo run, every bad one fails alone. Returns how many bad requests ran."""
    rng = random.Random(seed)
    tok = llm.get_tokenizer()
    bad_kinds = contradictions(tok)
    failures = 0
    for _ in range(rounds):
        goods = [(rng.choice(GOOD_PROMPTS), random_good(rng)) for _ in range(rng.randint(1, 5))]
        want = [solo(llm, p, sp) for p, sp in goods]
        bads = [rng.choice(FAULTS) for _ in range(rng.randint(1, 3))]
        victims = set()
        batch = list(goods)
        for fault in bads:
            if fault == "nan":
                sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
                victims.add(id(sp))
            else:
                sp = bad_kinds[fault]
            batch.insert(rng.randint(0, len(batch)), (rng.choice(GOOD_PROMPTS), sp))
        at = rng.randint(0, 4)
        with nan_rows(monkeypatch, llm, lambda s: id(s.params) in victims and s.num_output_tokens >= at):
            outs = llm.generate([p for p, _ in batch], [sp for _, sp in batch], use_tqdm=False)
        good_outs = [o for o, (_, sp) in zip(outs, batch) if any(sp is g for _, g in goods)]
        bad_outs = [o for o, (_, sp) in zip(outs, batch) if not any(sp is g for _, g in goods)]
        assert all(same_output(o, w) for o, w in zip(good_outs, want))
        assert len(bad_outs) == len(bads) and all(o.error is not None for o in bad_outs)
        assert all(o.outputs[0].finish_reason == "abort" for o in bad_outs)
        assert_engine_clean(llm)
        failures += len(bad_outs)
    return failures


@pytest.fixture(scope="module")
def small_kv_llm(tiny_checkpoint):
    """A KV cache of one 64-token context: batches preempt sequences all the time."""
    return LLM(str(tiny_checkpoint("llama")), dtype="float32", device="cpu", max_model_len=64, kv_cache_memory="32KiB")


def test_fuzz_random_batches_with_failing_requests(tiny_llm, draft_llm, small_kv_llm, monkeypatch):
    """30 random batches on the plain engine, 20 under draft-model speculation and 20 with
    preemptions (a KV cache too small for the batch)."""
    assert run_fuzz(tiny_llm, monkeypatch, rounds=30, seed=1) >= 30
    assert run_fuzz(draft_llm, monkeypatch, rounds=20, seed=2) >= 20
    before = small_kv_llm.engine.scheduler.num_preemptions
    assert run_fuzz(small_kv_llm, monkeypatch, rounds=20, seed=3) >= 20
    assert small_kv_llm.engine.scheduler.num_preemptions > before


@pytest.mark.fuzz
def test_fuzz_random_batches_with_failing_requests_long(tiny_llm, draft_llm, small_kv_llm, monkeypatch):
    rounds = int(os.environ.get("QUICKDRAFT_ISOLATION_ROUNDS", "600"))
    assert run_fuzz(tiny_llm, monkeypatch, rounds=rounds, seed=101) >= rounds
    assert run_fuzz(draft_llm, monkeypatch, rounds=rounds // 2, seed=102) >= rounds // 2
    assert run_fuzz(small_kv_llm, monkeypatch, rounds=rounds // 2, seed=103) >= rounds // 2


# ---- the server ----------------------------------------------------------------------------------
def test_server_fails_the_bad_request_alone(tiny_checkpoint, tiny_llm, monkeypatch):
    """Concurrent requests on one server: a contradictory request gets a 400 naming the reason
    (non-streamed) or an error event with code 400 (streamed), one whose rows turn NaN a 500
    with no internals; a good streamed and a good plain completion running meanwhile get
    exactly their offline text; no KV block stays in use."""
    import httpx
    import openai

    from test_server import Server, wait_until

    llm = LLM(str(tiny_checkpoint("llama")), **TINY_KW)
    server = Server(llm, ["tiny"])
    client = server.client()
    tok = llm.get_tokenizer()
    letters = tok.encode("zq", add_special_tokens=False)
    marker = tok.encode("Speculative decoding drafts", add_special_tokens=False)
    want = [solo(tiny_llm, p, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)).outputs[0].text
            for p in GOOD_PROMPTS[:2]]

    def good_stream() -> str:
        chunks = client.completions.create(model="tiny", prompt=GOOD_PROMPTS[0], max_tokens=60, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in chunks)

    def good_plain() -> str:
        return client.completions.create(model="tiny", prompt=GOOD_PROMPTS[1], max_tokens=60, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    def bad_plain() -> Exception:
        try:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                           response_format={"type": "json_object"},
                                           extra_body={"allowed_token_ids": letters})
        except openai.APIStatusError as e:
            return e
        raise AssertionError("the contradictory request succeeded")

    def bad_stream() -> list[str]:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 8, "stream": True, "bad_words": ["a"],
                "structured_outputs": {"regex": "a"}}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            return [line for line in r.iter_lines() if line.startswith("data: ")]

    def bad_choice() -> Exception:
        try:
            client.completions.create(model="tiny", prompt="Is it?", max_tokens=16, temperature=0,
                                      extra_body={"min_tokens": 10, "structured_outputs": {"choice": ["yes", "no"]}})
        except openai.APIStatusError as e:
            return e
        raise AssertionError("the contradictory request succeeded")

    def nan_request() -> Exception:
        try:
            client.completions.create(model="tiny", prompt=marker, max_tokens=10, temperature=0)
        except openai.APIStatusError as e:
            return e
        raise AssertionError("the request with NaN logits succeeded")

    from concurrent.futures import ThreadPoolExecutor

    try:
        with nan_rows(monkeypatch, llm, lambda s: s.prompt_token_ids == marker and s.num_output_tokens == 2):
            with ThreadPoolExecutor(6) as pool:
                jobs = [pool.submit(f) for f in (good_stream, good_plain, bad_plain, bad_stream, bad_choice, nan_request)]
                stream_text, plain_text, bad, events, choice, nan = [j.result() for j in jobs]
        assert [stream_text, plain_text] == want
        assert bad.status_code == 400 and "no token can be generated" in bad.message
        assert "allowed_token_ids" in bad.message
        assert choice.status_code == 400 and "min_tokens=10" in choice.message
        error_events = [json.loads(e[6:]) for e in events if e != "data: [DONE]" and "error" in e]
        assert len(error_events) == 1 and error_events[0]["error"]["code"] == 400
        assert "bad_words" in error_events[0]["error"]["message"] and events[-1] == "data: [DONE]"
        assert nan.status_code == 500 and "not finite" not in nan.message and "Traceback" not in nan.message
        assert wait_until(server.kv_free)
        # and the server goes on serving
        again = client.completions.create(model="tiny", prompt=GOOD_PROMPTS[1], max_tokens=60, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert again.choices[0].text == want[1]
    finally:
        server.close()

