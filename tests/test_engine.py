"""Scheduler, KV-cache and API behaviour of the engine on a tiny random checkpoint."""

from __future__ import annotations

import random

import pytest

from quickdraft import LLM, RequestOutput, SamplingParams
from quickdraft.engine.block_manager import BlockManager

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def random_prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 380) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def token_ids(outs: list[RequestOutput]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def assert_no_leaks(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.num_allocated_blocks() == 0
    assert not llm.engine.has_unfinished_requests()


def test_block_manager_accounting():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.grow_to(1, 5) == [0, 1]
    assert bm.can_grow_to(1, 8) and not bm.can_grow_to(2, 9)
    bm.grow_to(2, 8)
    assert bm.num_free_blocks == 0 and bm.usage == 1.0
    with pytest.raises(RuntimeError, match="Out of KV-cache blocks"):
        bm.grow_to(1, 9)
    bm.free(1)
    assert bm.num_free_blocks == 2 and bm.block_table(1) == []
    bm.free(2)
    assert bm.num_free_blocks == 4 and bm.num_allocated_blocks() == 0


def test_batched_greedy_equals_one_at_a_time(tiny_llm):
    prompts = random_prompts(12, seed=1)
    batched = token_ids(tiny_llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False))
    single = [token_ids(tiny_llm.generate({"prompt_token_ids": p}, GREEDY, use_tqdm=False))[0] for p in prompts]
    assert batched == single
    assert_no_leaks(tiny_llm)


def test_preemption_under_tiny_kv_budget_gives_same_outputs(tiny_checkpoint, tiny_llm):
    prompts = random_prompts(10, seed=2, lo=20, hi=40)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = token_ids(tiny_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))
    # 8 blocks of 16 slots: room for about two sequences of 80 tokens at a time.
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # K/V * layers * block * kv_heads * head_dim * fp32
    small = LLM(str(tiny_checkpoint("llama")), dtype="float32", device="cpu", max_model_len=128,
                kv_cache_memory=8 * per_block)
    assert small.engine.block_manager.num_blocks == 8
    got = token_ids(small.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))
    assert got == expected
    assert small.engine.scheduler.num_preemptions > 0
    assert_no_leaks(small)
    # Seeded sampling is also unchanged by preemption (recompute consumes no randomness).
    sampled = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=40, ignore_eos=True) for i in range(10)]
    ref = token_ids(tiny_llm.generate([{"prompt_token_ids": p} for p in prompts], sampled, use_tqdm=False))
    assert token_ids(small.generate([{"prompt_token_ids": p} for p in prompts], sampled, use_tqdm=False)) == ref


def test_prompt_logprobs_survive_a_preemption_during_chunked_prefill(tiny_checkpoint, tiny_llm, monkeypatch):
    """41-token prompts prefilled 8 tokens a step under a 4-block KV budget: sequences are
    preempted in the middle of their prompt and recomputed; every request still gets all 41
    prompt entries (None, then 40 logprob dicts), equal to those of a run without pressure."""
    prompts = random_prompts(4, seed=5, lo=40, hi=41)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=3)
    want = tiny_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    per_block = 2 * 2 * 16 * 2 * 16 * 4
    small = LLM(str(tiny_checkpoint("llama")), dtype="float32", device="cpu", max_model_len=64,
                kv_cache_memory=4 * per_block, max_num_batched_tokens=8)
    preempted_in_prompt = []
    original = small.engine.scheduler._preempt

    def spy(seq):
        if seq.num_computed_tokens < seq.num_prompt_tokens:
            preempted_in_prompt.append(seq.request_id)
        original(seq)

    monkeypatch.setattr(small.engine.scheduler, "_preempt", spy)
    got = small.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert preempted_in_prompt
    for g, w in zip(got, want):
        assert len(g.prompt_logprobs) == len(g.prompt_token_ids) == 41 and g.prompt_logprobs[0] is None
        assert g.prompt_logprobs == w.prompt_logprobs
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
    assert_no_leaks(small)


def test_chunked_prefill_and_small_batches_give_same_outputs(tiny_checkpoint, tiny_llm):
    prompts = random_prompts(6, seed=3, lo=30, hi=60)
    expected = token_ids(tiny_llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False))
    llm = LLM(str(tiny_checkpoint("llama")), dtype="float32", device="cpu", max_model_len=256,
              max_num_batched_tokens=7, max_num_seqs=2)
    assert token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)) == expected
    assert_no_leaks(llm)


def test_continuous_batching_admits_new_requests_as_others_finish(tiny_checkpoint, tiny_llm):
    prompts = random_prompts(5, seed=4)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (2, 30, 5, 17, 1)]
    expected = token_ids(tiny_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))
    llm = LLM(str(tiny_checkpoint("llama")), dtype="float32", device="cpu", max_model_len=128, max_num_seqs=2)
    engine = llm.engine
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"cb{i}", None, p, sp)
    finished_at: dict[str, int] = {}
    first_running_at: dict[str, int] = {}
    results = {}
    step = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        for seq in engine.scheduler.running:
            first_running_at.setdefault(seq.request_id, step)
        for out in outs:
            finished_at[out.request_id] = step
            results[out.request_id] = out.outputs[0].token_ids
        assert len(engine.scheduler.running) <= 2
        step += 1
    # cb2 could only start once cb0 (2 tokens) had finished and freed its slot.
    assert finished_at["cb0"] < first_running_at["cb2"] < finished_at["cb1"]
    assert [results[f"cb{i}"] for i in range(5)] == expected
    assert_no_leaks(llm)


def test_prompt_longer_than_max_model_len_names_both_lengths(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint("llama")), dtype="float32", device="cpu", max_model_len=32)
    with pytest.raises(ValueError, match=r"length 40.*maximum model length of 32"):
        llm.generate({"prompt_token_ids": [5] * 40}, GREEDY, use_tqdm=False)
    # max_tokens beyond the context is clipped with finish_reason="length".
    out = llm.generate({"prompt_token_ids": [5] * 20}, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 12 and out.finish_reason == "length"
    assert_no_leaks(llm)


def test_outputs_keep_input_order_and_fields(tiny_llm):
    prompts = ["def fibonacci(n):", {"prompt_token_ids": [5, 6, 7]}, {"prompt": "The quick brown fox"}]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (3, 5, 7)]
    outs = tiny_llm.generate(prompts, params, use_tqdm=False)
    tok = tiny_llm.get_tokenizer()
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 5, 7]
    assert outs[0].prompt == "def fibonacci(n):" and outs[0].prompt_token_ids == tok.encode("def fibonacci(n):")
    assert outs[1].prompt is None and outs[1].prompt_token_ids == [5, 6, 7]
    assert len({o.request_id for o in outs}) == 3
    for o in outs:
        assert o.finished and o.outputs[0].index == 0 and o.prompt_logprobs is None
        assert o.outputs[0].cumulative_logprob is None and o.outputs[0].logprobs is None
        m = o.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
        assert m.num_prompt_tokens == len(o.prompt_token_ids) and m.num_generation_tokens == len(o.outputs[0].token_ids)
        assert m.time_to_first_token >= 0 and m.e2e_latency >= m.time_to_first_token


def test_empty_prompt_list_returns_empty(tiny_llm):
    assert tiny_llm.generate([], GREEDY, use_tqdm=False) == []


def test_unknown_llm_keyword_is_a_type_error(tiny_checkpoint):
    with pytest.raises(TypeError, match="gpu_memory_utilisation"):
        LLM(str(tiny_checkpoint("llama")), gpu_memory_utilisation=0.9)


def test_bad_model_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist.*not found: expected a Hugging Face model folder"):
        LLM(str(tmp_path / "does-not-exist"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        LLM(str(tmp_path / "weights.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LLM(str(tmp_path / "empty"))


def test_bad_engine_arguments(tiny_checkpoint):
    folder = str(tiny_checkpoint("llama"))
    with pytest.raises(ValueError, match="dtype must be one of.*'float64'"):
        LLM(folder, dtype="float64")
    with pytest.raises(ValueError, match="device must be"):
        LLM(folder, device="tpu")
    with pytest.raises(ValueError, match="max_model_len=999 is larger than the model's context length 256"):
        LLM(folder, max_model_len=999)
    with pytest.raises(ValueError, match="kv_cache_memory='1KiB' holds 0 tokens"):
        LLM(folder, device="cpu", kv_cache_memory="1KiB")
    with pytest.raises(ValueError, match="kv_cache_memory must be"):
        LLM(folder, device="cpu", kv_cache_memory="lots")


def test_out_of_vocabulary_token_ids_are_rejected_without_disturbing_others(tiny_llm):
    with pytest.raises(ValueError, match="Token id 384 is out of vocabulary"):
        tiny_llm.generate([{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [5, 384]}], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="Token id -1"):
        tiny_llm.generate({"prompt_token_ids": [-1]}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt is empty"):
        tiny_llm.generate({"prompt_token_ids": []}, GREEDY, use_tqdm=False)
    with pytest.raises(TypeError, match="ambiguous"):
        tiny_llm.generate([1, 2, 3], GREEDY, use_tqdm=False)
    assert_no_leaks(tiny_llm)
    assert len(tiny_llm.generate({"prompt_token_ids": [5, 6]}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 20


def test_sampling_params_list_must_match_prompts(tiny_llm):
    with pytest.raises(ValueError, match="Got 2 sampling params for 3 prompts"):
        tiny_llm.generate(["a", "b", "c"], [GREEDY, GREEDY], use_tqdm=False)


def test_chat_uses_the_model_template(tiny_llm):
    tok = tiny_llm.get_tokenizer()
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    expected_text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    outs = tiny_llm.chat(conv, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert outs[0].prompt == expected_text
    assert outs[0].prompt_token_ids == tok.encode(expected_text, add_special_tokens=False)
    assert outs[0].prompt_token_ids[0] == tok.backend.token_to_id("<|im_start|>")  # atomic special token
    both = tiny_llm.chat([conv, conv[1:]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(both) == 2 and both[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    no_prompt = tiny_llm.chat(conv, GREEDY, use_tqdm=False, add_generation_prompt=False)
    assert not no_prompt[0].prompt.endswith("assistant\n")
    custom = tiny_llm.chat(conv, GREEDY, use_tqdm=False, chat_template="{{ messages[-1]['content'] }}")
    assert custom[0].prompt == "Hi there"
    with pytest.raises(ValueError, match="role"):
        tiny_llm.chat([{"content": "no role"}], GREEDY, use_tqdm=False)


def test_progress_bar_reports_tokens_per_second(tiny_llm, capsys):
    tiny_llm.generate(["a b c", "d e f"], SamplingParams(temperature=0, max_tokens=5), use_tqdm=True)
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "2/2" in err and "toks/s" in err


def test_default_sampling_params_come_from_generation_config(tiny_checkpoint, tmp_path):
    import json
    import shutil

    dst = tmp_path / "genconf"
    shutil.copytree(tiny_checkpoint("llama"), dst)
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "temperature": 0.0, "max_new_tokens": 6}))
    llm = LLM(str(dst), dtype="float32", device="cpu", max_model_len=64)
    sp = llm.get_default_sampling_params()
    assert sp.temperature == 0.0 and sp.max_tokens == 6
    assert len(llm.generate("hello", use_tqdm=False)[0].outputs[0].token_ids) <= 6


def test_metrics_count_tokens(tiny_llm):
    before = {m.name: m.value for m in tiny_llm.get_metrics()}
    tiny_llm.generate({"prompt_token_ids": [5, 6, 7]}, GREEDY, use_tqdm=False)
    after = {m.name: m.value for m in tiny_llm.get_metrics()}
    assert after["quickdraft:prompt_tokens"] - before["quickdraft:prompt_tokens"] == 3
    assert after["quickdraft:generation_tokens"] - before["quickdraft:generation_tokens"] == 20
    assert after["quickdraft:kv_cache_usage_perc"] == 0.0
