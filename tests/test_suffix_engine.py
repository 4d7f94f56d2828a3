"""Suffix decoding in the engine (method "suffix"): vLLM's keys, drafts from the global trie
across requests, per-source metrics; num_speculative_tokens_per_batch_size for every method;
a draft model with a shorter context than the target. Exactness of suffix decoding against
plain decoding (greedy, seeded, chi-square) runs with the other methods in test_spec_decode.py
and, on SmolLM2, in test_exactness.py."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from quickdraft import SamplingParams
from quickdraft.entrypoints.serve_metrics import ServeMetrics
from quickdraft.spec_decode.config import SpeculativeConfig
from quickdraft.spec_decode.proposer import SuffixProposer
from test_spec_decode import assert_no_leaks, gen, ids, make_llm, repetitive_prompts, self_copy_prompts, \
    spec_metrics

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def suffix_metrics(llm) -> dict[str, dict[str, int]]:
    return {m.name.removeprefix("quickdraft:spec_decode_suffix_"): m.values for m in llm.get_metrics()
            if m.name.startswith("quickdraft:spec_decode_suffix_")}


# ---- configuration ---------------------------------------------------------------------------------

def test_vllm_keys_and_defaults(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint("llama"), {"method": "suffix", "num_speculative_tokens": 16})
    cfg = llm.speculative_config
    assert (cfg.suffix_decoding_max_tree_depth, cfg.suffix_decoding_max_cached_requests,
            cfg.suffix_decoding_max_spec_factor, cfg.suffix_decoding_min_token_prob) == (24, 10000, 1.0, 0.1)
    cache = llm.engine.proposer.cache
    assert isinstance(llm.engine.proposer, SuffixProposer)
    assert (cache.max_tree_depth, cache.max_cached_requests, cache.max_spec_factor, cache.min_token_prob) == \
        (24, 10000, 1.0, 0.1)


@pytest.mark.parametrize("key, value, message", [
    ("suffix_decoding_max_tree_depth", 1, "suffix_decoding_max_tree_depth must be an integer >= 2, got 1"),
    ("suffix_decoding_max_tree_depth", 8.5, "suffix_decoding_max_tree_depth must be an integer >= 2"),
    ("suffix_decoding_max_cached_requests", -1, "suffix_decoding_max_cached_requests must be an integer >= 0"),
    ("suffix_decoding_max_spec_factor", 0, "suffix_decoding_max_spec_factor must be a number > 0, got 0"),
    ("suffix_decoding_min_token_prob", 1.5, r"suffix_decoding_min_token_prob must be a number in \[0, 1\], got 1.5"),
    ("suffix_decoding_min_token_prob", "high", "suffix_decoding_min_token_prob must be a number"),
])
def test_bad_suffix_values_name_the_key_and_range(key, value, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.from_any({"method": "suffix", "num_speculative_tokens": 8, key: value})


def test_suffix_keys_belong_to_the_suffix_method():
    with pytest.raises(ValueError, match="only apply to method='suffix'"):
        SpeculativeConfig.from_any({"method": "ngram", "num_speculative_tokens": 4,
                                    "suffix_decoding_max_tree_depth": 12})
    with pytest.raises(ValueError, match="prompt_lookup"):
        SpeculativeConfig.from_any({"method": "suffix", "num_speculative_tokens": 4, "prompt_lookup_max": 3})
    with pytest.raises(ValueError, match="standard"):
        SpeculativeConfig.from_any({"method": "suffix", "num_speculative_tokens": 4,
                                    "rejection_sample_method": "standard"})


@pytest.mark.parametrize("mapping, message", [
    ({"1-16": 5, "10-20": 2}, "ranges 1-16 and 10-20 overlap"),
    ({"0-4": 2}, "'0-4' must be 'LO-HI' with 1 <= LO <= HI"),
    ({"8-4": 2}, "'8-4'"),
    ({"small": 2}, "'small'"),
    ({"1-4": 9}, r"num_speculative_tokens_per_batch_size\['1-4'\] must be an integer in \[0, "
                 r"num_speculative_tokens=5\], got 9"),
    ([1, 2], "must be a dict"),
])
def test_batch_size_map_errors(mapping, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.from_any({"method": "ngram", "num_speculative_tokens": 5,
                                    "num_speculative_tokens_per_batch_size": mapping})


def test_batch_size_map_lookup():
    cfg = SpeculativeConfig.from_any({"num_speculative_tokens": 5, "disable_by_batch_size": 100,
                                      "num_speculative_tokens_per_batch_size": {"1-16": 5, "17-64": 2, "65": 0}})
    assert [cfg.draft_length_for_batch(b) for b in (1, 16, 17, 64, 65, 66, 99, 100)] == [5, 5, 2, 2, 0, 5, 5, 0]


# ---- the global trie learns across requests --------------------------------------------------------

def test_a_repeated_request_is_drafted_from_the_global_trie(tiny_checkpoint, plain_llama):
    """The same prompt twice: the second time the first answer, in the global trie, drafts it;
    with the global trie off (max_cached_requests=0) it cannot."""
    path = tiny_checkpoint("llama")
    prompt = [11, 250, 37, 198, 77, 5, 301, 64]  # no repeats: the request's own trie has little
    want = ids(gen(plain_llama, [prompt], GREEDY))
    cfg = {"method": "suffix", "num_speculative_tokens": 8, "draft_length_policy": "fixed"}
    llm = make_llm(path, cfg)
    first = gen(llm, [prompt], GREEDY)
    before = {k: dict(v) for k, v in suffix_metrics(llm).items()}
    second = gen(llm, [prompt], GREEDY)
    assert ids(first) == ids(second) == want
    after = suffix_metrics(llm)
    global_drafts = after["num_drafts"]["global"] - before["num_drafts"]["global"]
    global_tokens = after["num_draft_tokens"]["global"] - before["num_draft_tokens"]["global"]
    global_accepted = after["num_accepted_tokens"]["global"] - before["num_accepted_tokens"]["global"]
    assert global_drafts > 0 and global_accepted >= 0.8 * global_tokens
    assert second[0].metrics.num_accepted_tokens > first[0].metrics.num_accepted_tokens
    assert spec_metrics(llm)["per_pos"][7] > 0  # whole 8-token drafts accepted
    assert_no_leaks(llm)
    off = make_llm(path, {**cfg, "suffix_decoding_max_cached_requests": 0})
    gen(off, [prompt], GREEDY)
    assert ids(gen(off, [prompt], GREEDY)) == want
    assert suffix_metrics(off)["num_drafts"]["global"] == 0
    assert off.engine.proposer.cache.global_trie is None


def test_aborted_and_batched_requests_feed_the_global_trie(tiny_checkpoint, plain_llama):
    path = tiny_checkpoint("llama")
    prompts = repetitive_prompts(6, seed=3)
    llm = make_llm(path, {"method": "suffix", "num_speculative_tokens": 6, "suffix_decoding_max_cached_requests": 4,
                          "draft_length_policy": "fixed"})
    assert ids(gen(llm, prompts, GREEDY)) == ids(gen(plain_llama, prompts, GREEDY))
    cache = llm.engine.proposer.cache
    assert cache.num_cached_requests == 4  # the oldest two evicted
    llm.engine.add_request("gone", None, prompts[0], GREEDY)
    llm.engine.step()
    llm.engine.abort_request("gone")
    assert cache.num_cached_requests == 4 and not cache._local
    m = spec_metrics(llm)
    assert m["drafts"] > 0 and m["accepted"] > 0
    assert_no_leaks(llm)


def test_suffix_metrics_in_prometheus_and_the_log_line(tiny_checkpoint, caplog):
    """With the default adaptive policy (and its cut by the drafts' odds): counters add up, and
    greedy output is plain decoding's."""
    path = tiny_checkpoint("mistral")
    prompts = self_copy_prompts(path, 3, seed=5)
    llm = make_llm(path, {"method": "suffix", "num_speculative_tokens": 4}, disable_log_stats=False)
    llm.engine.log_interval_s = 0
    with caplog.at_level(logging.INFO, logger="quickdraft"):
        outs = gen(llm, prompts + prompts, GREEDY)
    assert ids(outs) == ids(gen(make_llm(path), prompts + prompts, GREEDY))
    sm = suffix_metrics(llm)
    m = spec_metrics(llm)
    assert sum(sm["num_drafts"].values()) == m["drafts"] > 0
    assert sum(sm["num_accepted_tokens"].values()) == m["accepted"]
    text = ServeMetrics("tiny", llm.get_metrics).render()
    text = text.decode() if isinstance(text, bytes) else text
    for source in ("request", "global"):
        assert (f'quickdraft:spec_decode_suffix_num_drafts_total{{model_name="tiny",source="{source}"}} '
                f'{float(sm["num_drafts"][source])}') in text
    line = [r.getMessage() for r in caplog.records if "SpecDecoding metrics" in r.getMessage()][-1]
    assert "request trie:" in line


# ---- num_speculative_tokens_per_batch_size ------------------------------------------------------------

@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_draft_length_follows_the_batch_size_map(method, tiny_checkpoint, plain_mistral):
    path = tiny_checkpoint("mistral")
    prompts = self_copy_prompts(path, 6, seed=45)
    spec = {"method": method, "num_speculative_tokens": 4, "draft_length_policy": "fixed",
            "num_speculative_tokens_per_batch_size": {"1-2": 4, "3-4": 1, "5-64": 0}}
    llm = make_llm(path, spec)
    engine = llm.engine
    asked: list[tuple[int, int]] = []  # (sequences running, draft slots given) per proposal
    propose = engine.proposer.propose

    def spy(seqs, max_tokens, noise, after=None):
        asked.extend((len(engine.scheduler.running), k) for k in max_tokens)
        return propose(seqs, max_tokens, noise, after)

    engine.proposer.propose = spy
    sp = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (12, 20, 28, 36, 44, 52)]
    assert ids(gen(llm, prompts, sp)) == ids(gen(plain_mistral, prompts, sp))
    assert asked and not any(running >= 5 for running, _ in asked)  # lookahead 0: nothing proposed
    assert all(k <= 1 for running, k in asked if running in (3, 4))
    assert {k for running, k in asked if running in (3, 4)} == {1}
    assert 4 in {k for running, k in asked if running <= 2}
    m = spec_metrics(llm)
    assert m["drafts"] > 0 and m["accepted"] > 0
    assert_no_leaks(llm)


# ---- a draft model with a shorter context ----------------------------------------------------------

def test_a_draft_with_a_shorter_context_drafts_until_it_is_full(tiny_checkpoint, tmp_path, caplog, plain_llama):
    """vLLM's behaviour: a warning at start, drafts while the sequence fits in the draft's
    context, plain decoding after; outputs as plain decoding."""
    src = tiny_checkpoint("llama")
    short = tmp_path / "short_draft"
    shutil.copytree(src, short)
    cfg = json.loads((short / "config.json").read_text())
    cfg["max_position_embeddings"] = 64
    (short / "config.json").write_text(json.dumps(cfg))
    spec = {"method": "draft_model", "model": str(short), "num_speculative_tokens": 4, "draft_length_policy": "fixed"}
    with caplog.at_level(logging.WARNING, logger="quickdraft"):
        llm = make_llm(src, spec, max_model_len=256)
    assert any("The draft model's context length 64 is shorter than max_model_len=256" in r.getMessage()
               for r in caplog.records)
    prompt = repetitive_prompts(1, seed=9)[0]  # ~20-30 tokens; 80 more cross position 64
    sp = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    out = gen(llm, [prompt], sp)
    assert ids(out) == ids(gen(plain_llama, [prompt], sp))
    proposer = llm.engine.proposer
    assert proposer.max_len == 64 and proposer.num_skipped > 0
    m = out[0].metrics
    assert m.num_draft_tokens > 0 and m.num_accepted_tokens > 0  # the draft is the target: all accepted early on
    # drafts stopped once sequence + draft no longer fit in 64 positions
    assert m.num_drafts <= 64 - len(prompt)
    assert_no_leaks(llm)
    # the adaptive policy's start-up timing also stays within the draft's context
    make_llm(src, {**spec, "draft_length_policy": "adaptive"}, max_model_len=256)


@pytest.fixture(scope="module")
def plain_llama(tiny_checkpoint):
    return make_llm(tiny_checkpoint("llama"))


@pytest.fixture(scope="module")
def plain_mistral(tiny_checkpoint):
    return make_llm(tiny_checkpoint("mistral"))
