"""Speculative decoding end to end: configuration, exactness and metrics.

Oracles: plain decoding without speculation (greedy must be token-identical), the target's
exact law computed here from transformers' logits on the same checkpoint (sampling), and hand
arithmetic on the counters. Tiny random checkpoints (vocabulary 384) serve as targets and
drafts; the tiny Mistral (sliding window 24, two layers) cannot see tokens ~48 positions back,
which lets a prompt hold a copy of its own future output, so n-gram drafts get accepted on
demand. A draft model that differs from the target but often agrees is the target's checkpoint
with 3% noise added to every weight.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from quickdraft import LLM, SamplingParams, SpeculativeConfig
from quickdraft.engine.model_runner import ModelRunner, SeqInput
from quickdraft.spec_decode.draft_model import DraftModelProposer
from quickdraft.spec_decode.proposer import NgramProposer
from stats import chi_square_df, chi_square_power, chi_square_pvalue, samples_for_power
from tiny_models import self_copy_prompts as copying_prompts

P_MIN = 1e-5  # chi-square p-value threshold
NGRAM = {"method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 3}


# ---- helpers --------------------------------------------------------------------------------------

def make_llm(path, spec=None, max_model_len=256, **kw) -> LLM:
    return LLM(str(path), dtype="float32", device="cpu", max_model_len=max_model_len, speculative_config=spec, **kw)


def ngram(k: int, **kw) -> dict:
    return {**NGRAM, "num_speculative_tokens": k, **kw}


def suffix(k: int, **kw) -> dict:
    """Suffix decoding allowed drafts up to 4x the matched length (vLLM's default is 1x), so that
    short matches in these short prompts still draft the full k that the tests exercise, with a
    fixed draft length (the adaptive policy's choices depend on step costs timed at start; the
    suffix-specific tests in test_suffix_engine.py run it)."""
    return {"method": "suffix", "num_speculative_tokens": k, "suffix_decoding_max_spec_factor": 4.0,
            "draft_length_policy": "fixed", **kw}


def draft(path, k: int, **kw) -> dict:
    """A draft-model config with a fixed draft length: these drafts cost as much as the target
    (tiny models, overhead-bound), so the adaptive policy would rightly stop drafting, and these
    tests are about verifying drafts (the policy has its own tests in test_adaptive.py)."""
    return {"method": "draft_model", "model": str(path), "num_speculative_tokens": k,
            "draft_length_policy": "fixed", **kw}


def spec_metrics(llm: LLM) -> dict:
    m = {x.name.removeprefix("quickdraft:"): x for x in llm.get_metrics()}
    return {"drafts": m["spec_decode_num_drafts"].value, "draft_tokens": m["spec_decode_num_draft_tokens"].value,
            "accepted": m["spec_decode_num_accepted_tokens"].value,
            "per_pos": list(m["spec_decode_num_accepted_tokens_per_pos"].values),
            "preemptions": m["num_preemptions"].value}


def gen(llm: LLM, prompts: list[list[int]], params) -> list:
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def ids(outs) -> list[list[int]]:
    return [c.token_ids for o in outs for c in o.outputs]


def assert_no_leaks(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert not llm.engine.requests and not llm.engine.scheduler.running


def assert_same_completion(a, b, logprobs: bool = False) -> None:
    assert a.token_ids == b.token_ids
    assert a.text == b.text
    assert a.finish_reason == b.finish_reason and a.stop_reason == b.stop_reason
    if logprobs:
        assert a.logprobs is not None and b.logprobs is not None
        assert len(a.logprobs) == len(b.logprobs) == len(a.token_ids)
        for da, db in zip(a.logprobs, b.logprobs):
            assert da.keys() == db.keys()
            for t in da:
                assert da[t].rank == db[t].rank and da[t].decoded_token == db[t].decoded_token
                assert da[t].logprob == pytest.approx(db[t].logprob, abs=1e-5)
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-4)
    else:
        assert a.logprobs == b.logprobs


def repetitive_prompts(n: int, seed: int) -> list[list[int]]:
    """A random segment repeated a few times: n-gram drafts happen from the first step."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        seg = [rng.randrange(3, 384) for _ in range(rng.randrange(3, 8))]
        out.append(seg * 4 + seg[:2])
    return out


def self_copy_prompts(mistral_path, n: int, seed: int, body: int = 60, copy: int = 24) -> list[list[int]]:
    """n prompts O[:copy] + Q (Q random, ``body`` tokens) whose greedy continuation is O again
    (`tiny_models.self_copy_prompts`)."""
    return copying_prompts(make_llm(mistral_path), [body + copy] * n, seed, copy)


def reference_law(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
                  ) -> tuple[torch.Tensor, bool]:
    """vLLM's processed law written out: temperature, keep the top_k largest, then the smallest
    prefix (by decreasing probability) whose mass reaches top_p; renormalize. Also returns
    whether the law is unambiguous: no top-k tie and no top-p cut within 1e-5 of the boundary
    (float32 rounding could fall either way there)."""
    z = logits.double() / temperature
    order = z.argsort(descending=True)
    clear = True
    keep = len(order) if top_k == 0 else top_k
    if top_k:
        zs = z[order]
        clear = bool(zs[top_k - 1] - zs[top_k] > 1e-5)
    idx = order[:keep]
    p = torch.softmax(z[idx], 0)
    if top_p < 1.0:
        before = torch.cat([torch.zeros(1, dtype=p.dtype), p.cumsum(0)[:-1]])
        clear = clear and bool((before - top_p).abs().min() > 1e-5)
        kept = before < top_p
        idx, p = idx[kept], p[kept] / p[kept].sum()
    law = torch.zeros_like(z)
    law[idx] = p
    return law, clear


def penalized(logits: torch.Tensor, prompt: list[int], output: list[int], params: dict) -> torch.Tensor:
    """vLLM's penalties on raw logits: repetition (seen in prompt or output: divide positive
    logits by r, multiply the others), then frequency * count and presence over the output."""
    z = logits.clone()
    r = params.get("repetition_penalty", 1.0)
    if r != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(output)))
        z[seen] = torch.where(z[seen] > 0, z[seen] / r, z[seen] * r)
    for t in set(output):
        z[t] -= params.get("frequency_penalty", 0.0) * output.count(t) + params.get("presence_penalty", 0.0)
    return z


@torch.no_grad()
def hf_next_logits(model, seqs: list[list[int]]) -> torch.Tensor:
    """transformers' next-token logits after each (equal-length) sequence: [len(seqs), V]; for
    an LLM (a quantized model, which transformers cannot compute), the engine's own, one
    prefill per sequence."""
    if isinstance(model, LLM):
        bm, out = model.engine.block_manager, []
        for i in range(0, len(seqs), 64):
            chunk = seqs[i:i + 64]
            inputs = [SeqInput(s, 0, bm.grow_to(10**6 + j, len(s)), len(s) - 1) for j, s in enumerate(chunk)]
            out.append(model.engine.runner.execute(inputs).double())
            for j in range(len(chunk)):
                bm.free(10**6 + j)
        return torch.cat(out)
    out = []
    for i in range(0, len(seqs), 128):
        out.append(model(torch.tensor(seqs[i:i + 128])).logits[:, -1].double())
    return torch.cat(out)


# ---- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return lambda arch: tiny_checkpoint(arch)


@pytest.fixture(scope="module")
def perturbed(tiny_checkpoint, tmp_path_factory):
    """perturbed(arch): the arch's tiny checkpoint with N(0, (0.03 std)^2) noise on every weight:
    a different model that agrees with the target often, but not always."""
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            src = tiny_checkpoint(arch)
            dst = tmp_path_factory.mktemp(f"perturbed_{arch}") / "model"
            shutil.copytree(src, dst)
            g = torch.Generator().manual_seed(17)
            weights = load_file(str(dst / "model.safetensors"))
            weights = {k: (v + 0.03 * v.float().std() * torch.randn(v.shape, generator=g)).to(v.dtype)
                       for k, v in weights.items()}
            save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
            cache[arch] = dst
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def plain(tiny_checkpoint):
    """plain(arch): an LLM without speculation (the oracle for greedy outputs)."""
    cache: dict[str, LLM] = {}

    def get(arch: str) -> LLM:
        if arch not in cache:
            cache[arch] = make_llm(tiny_checkpoint(arch))
        return cache[arch]

    return get


# ---- configuration ----------------------------------------------------------------------------------

def test_unknown_key_lists_the_valid_keys(ckpt):
    with pytest.raises(ValueError) as e:
        make_llm(ckpt("llama"), {"num_speculative_tokens": 3, "num_lookahead": 2})
    msg = str(e.value)
    assert "num_lookahead" in msg
    for key in ("method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model",
                "draft_dtype", "disable_by_batch_size"):
        assert key in msg


@pytest.mark.parametrize("k", [0, -1, 1.5, None, True])
def test_num_speculative_tokens_must_be_a_positive_integer(ckpt, k):
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        make_llm(ckpt("llama"), {"method": "ngram", "num_speculative_tokens": k})


def test_num_speculative_tokens_is_required(ckpt):
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        make_llm(ckpt("llama"), {"method": "ngram", "prompt_lookup_max": 3})


def test_prompt_lookup_min_above_max_is_rejected_with_vllms_message(ckpt):
    with pytest.raises(ValueError, match="prompt_lookup_min=4 must be <= prompt_lookup_max=2"):
        make_llm(ckpt("llama"), {"method": "ngram", "num_speculative_tokens": 3,
                                 "prompt_lookup_min": 4, "prompt_lookup_max": 2})
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        make_llm(ckpt("llama"), {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 0})


@pytest.mark.parametrize("given, expected", [
    ({}, (5, 5)),
    ({"prompt_lookup_min": 2}, (2, 2)),
    ({"prompt_lookup_max": 4}, (4, 4)),
    ({"prompt_lookup_min": 2, "prompt_lookup_max": 4}, (2, 4)),
])
def test_prompt_lookup_defaults_follow_vllm(ckpt, given, expected):
    llm = make_llm(ckpt("llama"), {"num_speculative_tokens": 2, **given})
    cfg = llm.speculative_config
    assert cfg.method == "ngram"
    assert (cfg.prompt_lookup_min, cfg.prompt_lookup_max) == expected
    proposer = llm.engine.proposer
    assert isinstance(proposer, NgramProposer) and (proposer.min_n, proposer.max_n) == expected


def test_method_is_draft_model_when_a_model_is_given(ckpt):
    llm = make_llm(ckpt("llama"), {"model": str(ckpt("mistral")), "num_speculative_tokens": 2})
    assert llm.speculative_config.method == "draft_model"
    assert isinstance(llm.engine.proposer, DraftModelProposer)
    assert SpeculativeConfig(num_speculative_tokens=1, model="x").method == "draft_model"
    assert SpeculativeConfig(num_speculative_tokens=1).method == "ngram"


def test_missing_draft_model_is_a_file_not_found_error(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError):
        make_llm(ckpt("llama"), draft(tmp_path / "no_such_model", 3))


def test_draft_with_another_vocabulary_is_rejected(ckpt, tmp_path):
    src = ckpt("llama")
    cfg = json.loads((src / "config.json").read_text())
    hf_cfg = transformers.LlamaConfig(
        vocab_size=512, hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], max_position_embeddings=cfg["max_position_embeddings"],
        bos_token_id=1, eos_token_id=2)
    folder = tmp_path / "vocab512"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / name, folder / name)
    with pytest.raises(ValueError, match="Target and draft model should have the same vocabulary size"):
        make_llm(src, draft(folder, 3))


def test_other_bad_configs(ckpt):
    with pytest.raises(ValueError, match="method"):
        make_llm(ckpt("llama"), {"method": "eagle", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="model"):
        make_llm(ckpt("llama"), {"method": "draft_model", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="disable_by_batch_size"):
        make_llm(ckpt("llama"), ngram(2, disable_by_batch_size=0))
    with pytest.raises(ValueError, match="draft_length_policy must be one of .*'greedy'"):
        make_llm(ckpt("llama"), ngram(2, draft_length_policy="greedy"))
    with pytest.raises(TypeError):
        make_llm(ckpt("llama"), [("num_speculative_tokens", 2)])


def test_a_speculative_config_object_is_accepted(ckpt, plain):
    cfg = SpeculativeConfig(num_speculative_tokens=3, method="ngram", prompt_lookup_min=1, prompt_lookup_max=3)
    llm = make_llm(ckpt("llama"), cfg)
    assert llm.speculative_config == cfg
    prompts = repetitive_prompts(4, seed=1)
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    assert ids(gen(llm, prompts, sp)) == ids(gen(plain("llama"), prompts, sp))
    assert spec_metrics(llm)["drafts"] > 0


# ---- greedy speculation is token-identical to plain decoding ----------------------------------------

GREEDY_48 = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("method", ["ngram", "suffix", "draft_model"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_with_speculation_equals_plain_greedy(arch, method, k, ckpt, plain, perturbed):
    """ngram runs the default adaptive policy here (it drafted and had drafts accepted even with
    step costs pinned at 1 + 1.5 k plain steps, where the policy only probes)."""
    extra = {"draft_length_policy": "adaptive"} if method == "ngram" else {}
    spec = spec_for(method, perturbed, k, arch=arch, **extra)
    prompts = repetitive_prompts(16, seed=k)
    expected = ids(gen(plain(arch), prompts, GREEDY_48))
    llm = make_llm(ckpt(arch), spec)
    outs = gen(llm, prompts, GREEDY_48)
    assert ids(outs) == expected
    m = spec_metrics(llm)
    assert m["drafts"] > 0 and m["accepted"] > 0
    assert m["accepted"] < m["draft_tokens"]  # rejections happened too
    assert_no_leaks(llm)
    # batch size 1: the prompt that had the most accepted drafts in the batch, alone
    best = max(range(16), key=lambda i: outs[i].metrics.num_accepted_tokens)
    alone = make_llm(ckpt(arch), spec)
    out = gen(alone, [prompts[best]], GREEDY_48)
    assert ids(out) == ids(gen(plain(arch), [prompts[best]], GREEDY_48)) == [expected[best]]
    m = spec_metrics(alone)
    assert m["drafts"] > 0 and m["accepted"] > 0
    assert_no_leaks(alone)


@pytest.mark.parametrize("k", [2, 5])
def test_greedy_ngram_with_long_accepted_runs_equals_plain(k, ckpt, plain):
    """Self-copying prompts on the tiny Mistral: most drafts are accepted whole. The draft length
    is fixed: the adaptive policy's lengths follow step costs timed at start, and on a busy CI
    machine it once drafted no 5-token runs here (per_pos[4] == 0) though the outputs were equal."""
    prompts = self_copy_prompts(ckpt("mistral"), 8, seed=k)
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = ids(gen(plain("mistral"), prompts, sp))
    for batch in (prompts, prompts[:1]):
        llm = make_llm(ckpt("mistral"), ngram(k, draft_length_policy="fixed"))
        assert ids(gen(llm, batch, sp)) == expected[:len(batch)]
        m = spec_metrics(llm)
        assert m["drafts"] > 0 and m["per_pos"][k - 1] > 0  # full-length runs accepted
        assert m["accepted"] / m["draft_tokens"] > 0.3
        assert_no_leaks(llm)


@pytest.mark.parametrize("target, other", [("llama", "llama3_tied"), ("qwen3", "llama")])
def test_greedy_with_a_draft_of_another_architecture_equals_plain(target, other, ckpt, plain):
    prompts = repetitive_prompts(16, seed=0)
    sp = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    llm = make_llm(ckpt(target), draft(ckpt(other), 3))
    assert ids(gen(llm, prompts, sp)) == ids(gen(plain(target), prompts, sp))
    m = spec_metrics(llm)
    assert m["drafts"] > 0 and m["accepted"] > 0
    assert_no_leaks(llm)


def test_draft_model_equal_to_target_accepts_everything(ckpt):
    k, steps = 4, 24
    max_tokens = 1 + steps * (k + 1)  # prefill token, then full runs of k accepted + 1 bonus
    llm = make_llm(ckpt("llama"), draft(ckpt("llama"), k))
    outs = gen(llm, repetitive_prompts(4, seed=5), SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                   ignore_eos=True))
    m = spec_metrics(llm)
    assert m["drafts"] > 0
    assert m["accepted"] / m["draft_tokens"] > 0.99
    assert 1 + m["accepted"] / m["drafts"] > k + 1 - 0.05
    for o in outs:
        assert len(o.outputs[0].token_ids) == max_tokens
        assert o.metrics.num_drafts == steps
        assert o.metrics.acceptance_rate > 0.99
        assert o.metrics.mean_acceptance_length == pytest.approx(k + 1, abs=0.05)


# ---- the real SmolLM2 ---------------------------------------------------------------------------------

SMOL_CHATS = [
    "Repeat this code exactly:\n\ndef add(a, b):\n    total = a + b\n    return total\n\nprint(add(2, 3))",
    "Fix the typo in: The quick brown fox jumpd over the lazy dog and then ran back to the farm.",
    "Copy this JSON and add a field \"age\": 30:\n{\"name\": \"Alice\", \"city\": \"Paris\", \"job\": \"engineer\"}",
    "Rewrite this list in uppercase: apple, banana, cherry, grape, lemon, mango, orange, peach.",
]


def test_smollm2_greedy_with_ngram_speculation_equals_plain(smollm2_gguf, smollm2_llm):
    convs = [[{"role": "user", "content": c}] for c in SMOL_CHATS]
    sp = SamplingParams(temperature=0, max_tokens=64)
    expected = smollm2_llm.chat(convs, sp, use_tqdm=False)
    spec = LLM(str(smollm2_gguf), dtype="float32", device="cpu", max_model_len=2048, quantization=None,
               speculative_config={"method": "ngram", "num_speculative_tokens": 5,
                                   "prompt_lookup_min": 2, "prompt_lookup_max": 5})
    got = spec.chat(convs, sp, use_tqdm=False)
    for g, e in zip(got, expected):
        assert_same_completion(g.outputs[0], e.outputs[0])
    m = spec_metrics(spec)
    assert m["drafts"] > 0 and m["accepted"] > 0
    assert sum(o.metrics.num_accepted_tokens for o in got) == m["accepted"]
    # batch size 1 (the code-copying prompt)
    one = spec.chat(convs[0], sp, use_tqdm=False)[0]
    assert_same_completion(one.outputs[0], expected[0].outputs[0])
    assert one.metrics.num_accepted_tokens > 0
    assert_no_leaks(spec)


# ---- sampling with speculation follows the target's exact law ----------------------------------------

LAW_ALPHA = 1e-3  # level of the end-to-end law tests
LAW_CELLS = 8  # cells of the law of the first three tokens tested (the rest pooled into one)


def triple_law_cells(model, prompt: list[int], params: dict) -> dict[tuple[int, ...], float]:
    """The exact law of the first three output tokens, from transformers' logits (penalties see
    the tokens before each position, drafted or not), as cells: a triple (t1, t2, t3), or a
    prefix (t1,) / (t1, t2) holding the whole mass below it where the conditional law sits on a
    top-k/top-p boundary (ambiguous to float rounding) or the prefix has mass < 1e-4. The
    LAW_CELLS largest cells are kept and the rest pooled under the key ()."""
    T, top_k, top_p = params["temperature"], params.get("top_k", 0), params.get("top_p", 1.0)

    def law(logits: torch.Tensor, output: list[int]) -> tuple[torch.Tensor, bool]:
        return reference_law(penalized(logits, prompt, output, params), T, top_k, top_p)

    p1, clear = law(hf_next_logits(model, [prompt])[0], [])
    assert clear
    cells: dict[tuple[int, ...], float] = {}
    pairs: dict[tuple[int, int], float] = {}
    firsts = p1.nonzero().flatten().tolist()
    for a, lg in zip(firsts, hf_next_logits(model, [prompt + [a] for a in firsts])):
        p2, clear = law(lg, [a])
        if not clear:
            cells[(a,)] = float(p1[a])
            continue
        for b in p2.nonzero().flatten().tolist():
            pairs[(a, b)] = float(p1[a] * p2[b])
    big = [pair for pair, mass in pairs.items() if mass > 1e-4]
    cells.update({pair: mass for pair, mass in pairs.items() if mass <= 1e-4})
    for (a, b), lg in zip(big, hf_next_logits(model, [prompt + list(pair) for pair in big])):
        p3, clear = law(lg, [a, b])
        if not clear:
            cells[(a, b)] = pairs[(a, b)]
            continue
        for c in p3.nonzero().flatten().tolist():
            cells[(a, b, c)] = pairs[(a, b)] * float(p3[c])
    assert abs(sum(cells.values()) - 1.0) < 1e-6
    kept = dict(sorted(cells.items(), key=lambda kv: -kv[1])[:LAW_CELLS])
    kept[()] = 1.0 - sum(kept.values())
    return kept


def law_sample_size() -> int:
    """Samples for an 80%-power test of LAW_CELLS + 1 cells (tests/stats.py)."""
    n = samples_for_power(LAW_CELLS, LAW_ALPHA)
    assert chi_square_power(n, LAW_CELLS, LAW_ALPHA) >= 0.8
    return n


def assert_triple_law(outs, cells: dict[tuple[int, ...], float]) -> None:
    keys = list(cells)
    index = {key: i for i, key in enumerate(keys)}
    counts = torch.zeros(len(keys))
    for t in ids(outs):
        key = next((k for k in (tuple(t[:3]), tuple(t[:2]), tuple(t[:1])) if k in index), ())
        counts[index[key]] += 1
    probs = torch.tensor([cells[k] for k in keys], dtype=torch.float64)
    assert chi_square_df(probs, int(counts.sum())) == LAW_CELLS  # every cell big enough to count
    assert chi_square_pvalue(counts, probs) > LAW_ALPHA


# The draft model's standard rule runs 3-4 minutes per case here: its engine-level law runs in
# `make fuzz`; `make test` keeps its law at the sampler (test_rejection_sampler.py).
@pytest.mark.parametrize("method,quantization", [
    ("ngram", None), ("suffix", None), ("ngram", "q4_0"),
    pytest.param("standard", None, marks=pytest.mark.fuzz), pytest.param("standard", "q8_0", marks=pytest.mark.fuzz)])
def test_sampling_law_with_speculation_equals_the_target_law(method, quantization, ckpt, perturbed):
    """The first three tokens follow the target's exact law (chi-square of 9 cells with 80%
    power against a 5% shift of a cell of mass 0.2). The coupled draft model needs no test of
    its own here: its outputs are plain sampling's, token for token (the seeded tests below),
    whose law test_sampling.py tests; its verifier's law is tested in test_rejection_sampler.py.
    n-gram: the target is the tiny Mistral and
    the prompt is [c, y, z] + S where c, y, z are the most likely continuation of S (which the
    sliding window makes the continuation of the whole prompt too), so after t1 = c the lookup
    drafts [y, z], accepted often but far from always; other t1 get other drafts or none. Draft
    model (standard rejection sampler): the target's perturbed copy drafts; the request's
    penalties, temperature and top-p shape both p and q. Suffix decoding: the n-gram prompt, with
    its global trie also learning from the samples that finish first. Also with the target quantized at load
    (the integer kernels): its law is then that of its own logits, from a plain quantized engine."""
    path = ckpt("mistral")
    if quantization is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    else:  # the law of the quantized target: its logits, from a plain quantized engine
        model = make_llm(path, quantization=quantization)
    rng = random.Random(11)
    if method in ("ngram", "suffix"):
        params = dict(temperature=0.6, top_k=40, presence_penalty=0.5, frequency_penalty=0.2)
        S = [rng.randrange(3, 384) for _ in range(30)]
        head: list[int] = []
        for _ in range(3):
            head.append(int(hf_next_logits(model, [S + head])[0].argmax()))
        prompt = head + S
    else:
        params = dict(temperature=0.8, top_p=0.9, repetition_penalty=1.3)
        prompt = rng.sample(range(3, 384), 20)
    cells = triple_law_cells(model, prompt, params)
    n = law_sample_size()
    # A fixed draft length: the adaptive policy's choices follow step costs timed at start, and a
    # busy machine once drew no 2-token drafts here (per_pos[1] == 0) though the law held.
    llm = make_llm(path, spec_for(method, perturbed, 3, draft_length_policy="fixed"), max_num_seqs=32,
                   quantization=quantization)
    assert llm.config.quantization == quantization
    outs = llm.generate({"prompt_token_ids": prompt},
                        SamplingParams(n=n, **params, max_tokens=4, seed=7, ignore_eos=True), use_tqdm=False)
    m = spec_metrics(llm)
    assert m["drafts"] > n // 4 and 0 < m["accepted"] < m["draft_tokens"]
    assert m["per_pos"][1] > 0  # two-token runs accepted too
    assert_triple_law(outs, cells)
    assert_no_leaks(llm)


# ---- seeds: same seed, same text -------------------------------------------------------------------

SAMPLED = [dict(temperature=0.5, top_k=50), dict(temperature=0.8, top_p=0.8, presence_penalty=0.4),
           dict(temperature=0.6, min_p=0.05, repetition_penalty=1.2),
           dict(temperature=0.4, frequency_penalty=0.3, min_tokens=5, logit_bias={7: 2.0, 11: -3.0})]


def spec_for(method: str, perturbed, k: int, arch: str = "mistral", **kw) -> dict:
    """ngram, suffix, the coupled draft model (default) or the standard rejection sampler's
    draft model (the perturbed copy of ``arch``), all with a fixed draft length unless ``kw``
    says otherwise: these tests assert that drafts were accepted, and the adaptive policy's
    lengths follow step costs timed at start (on a machine where they look steep it only probes
    one token now and then, and the sampled texts here then had no accepted drafts). The policy
    has its own tests (test_adaptive.py), and test_greedy_with_speculation_equals_plain_greedy
    runs ngram with it."""
    if method == "ngram":
        return ngram(k, **{"draft_length_policy": "fixed", **kw})
    if method == "suffix":
        return suffix(k, **kw)
    if method == "standard":
        return draft(perturbed(arch), k, rejection_sample_method="standard", **kw)
    return draft(perturbed(arch), k, **kw)


@pytest.mark.parametrize("method", ["ngram", "suffix", "draft_model"])
def test_seeded_sampling_gives_the_same_text_with_and_without_speculation(method, ckpt, plain, perturbed):
    """Same seed, same text: each of 40 seeded requests (temperature, top-k/p, min-p, penalties,
    min_tokens, logit_bias) gives the text of plain decoding, alone, inside the batch of 40,
    with prompts chunked by a 16-token budget and under preemption by a tiny KV budget."""
    path = ckpt("mistral")
    prompts = self_copy_prompts(path, 40, seed=21)
    params = [SamplingParams(**SAMPLED[i % 4], max_tokens=32, seed=1000 + i, ignore_eos=True) for i in range(40)]
    want = ids(gen(plain("mistral"), prompts, params))
    spec = spec_for(method, perturbed, 4)
    llm = make_llm(path, spec)
    for i in range(4):
        assert ids(gen(llm, [prompts[i]], params[i]))[0] == want[i]
    alone = spec_metrics(llm)
    assert alone["accepted"] > 0 and alone["per_pos"][1] > 0
    assert ids(gen(llm, prompts, params)) == want
    chunked = make_llm(path, spec, max_num_batched_tokens=16)
    assert ids(gen(chunked, prompts[:8], params[:8])) == want[:8]
    per_block = ModelRunner.kv_bytes_per_block(llm.model_config, 16, torch.float32) * (2 if method == "draft_model" else 1)
    small = make_llm(path, spec, max_model_len=128, kv_cache_memory=12 * per_block)
    assert ids(gen(small, prompts[:8], params[:8])) == want[:8]
    for m in (spec_metrics(chunked), spec_metrics(small)):
        assert m["drafts"] > 0 and m["accepted"] > 0
    assert spec_metrics(small)["preemptions"] > 0
    # and the seed matters
    other = SamplingParams(**SAMPLED[0], max_tokens=32, seed=999, ignore_eos=True)
    assert ids(gen(llm, [prompts[0]], other))[0] != want[0]
    for x in (llm, chunked, small):
        assert_no_leaks(x)


@pytest.mark.parametrize("method", ["ngram", "suffix", "draft_model"])
def test_token_options_under_speculation_equal_plain(method, ckpt, plain, perturbed):
    """bad_words, allowed_token_ids, logit_bias and truncate_prompt_tokens are part of the law
    the drafts are verified against: greedy and seeded outputs equal plain decoding's."""
    path = ckpt("mistral")
    prompts = self_copy_prompts(path, 4, seed=23)
    tok = plain("mistral").get_tokenizer()
    base = ids(gen(plain("mistral"), prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)))
    word = next(text for i in range(len(base[0]) - 1) for text in [tok.decode(base[0][i:i + 2])]
                if text.strip() == text and text and tok.encode(text, add_special_tokens=False) == base[0][i:i + 2])
    options = [dict(bad_words=[word]), dict(allowed_token_ids=sorted(set(range(3, 384)) - {base[1][3]})),
               dict(logit_bias={base[2][4]: -5.0, 17: 1.5}), dict(truncate_prompt_tokens=40)]
    llm = make_llm(path, spec_for(method, perturbed, 4))
    for temperature, seed in ((0.0, None), (0.6, 77)):
        params = [SamplingParams(temperature=temperature, seed=seed, max_tokens=24, ignore_eos=True, **o)
                  for o in options]
        want = ids(gen(plain("mistral"), prompts, params))
        assert ids(gen(llm, prompts, params)) == want
        if temperature == 0:
            assert all(w != b for w, b in zip(want[:3], base[:3]))  # the options change the text
    m = spec_metrics(llm)
    assert m["drafts"] > 0 and m["accepted"] > 0
    assert_no_leaks(llm)


def test_seeded_sampling_with_the_standard_rejection_sampler_repeats(ckpt, perturbed):
    """The standard sampler's text depends on what was drafted (its law does not): the same seed
    and the same batch give the same text."""
    path = ckpt("mistral")
    prompts = self_copy_prompts(path, 3, seed=22)
    sp = SamplingParams(temperature=0.7, top_k=50, max_tokens=32, seed=1234, ignore_eos=True)
    llm = make_llm(path, spec_for("standard", perturbed, 4))
    first = ids(gen(llm, prompts, sp))
    assert spec_metrics(llm)["accepted"] > 0
    assert ids(gen(llm, prompts, sp)) == first
    assert ids(gen(make_llm(path, spec_for("standard", perturbed, 4)), prompts, sp)) == first
    assert ids(gen(llm, prompts, SamplingParams(temperature=0.7, top_k=50, max_tokens=32, seed=1235,
                                                ignore_eos=True))) != first
    assert_no_leaks(llm)


# ---- stops inside an accepted run -----------------------------------------------------------------------

TABLE = [94, 310, 352, 261, 223, 88, 326, 373, 261]  # tiny Llama's greedy output has EOS (0) at step 36


@pytest.fixture(scope="module")
def same_draft(ckpt):
    """Draft model = target, k = 5: every greedy draft is accepted, so a step emits 6 tokens."""
    return make_llm(ckpt("llama"), draft(ckpt("llama"), 5))


def _compare(spec_llm, plain_llm, prompt, **kw):
    sp = SamplingParams(**kw)
    before = spec_metrics(spec_llm)
    got = gen(spec_llm, [prompt], sp)[0]
    want = gen(plain_llm, [prompt], sp)[0]
    assert_same_completion(got.outputs[0], want.outputs[0], logprobs=kw.get("logprobs") is not None)
    after = spec_metrics(spec_llm)
    assert after["accepted"] > before["accepted"]
    return got.outputs[0]


def test_eos_inside_an_accepted_run_cuts_like_plain(same_draft, plain):
    out = _compare(same_draft, plain("llama"), TABLE, temperature=0, max_tokens=60, logprobs=2)
    assert out.finish_reason == "stop" and out.stop_reason is None
    n = len(out.token_ids)
    assert out.token_ids[-1] in (0, 2) and (n - 1) % 6 != 0  # the EOS is not the run's last token


def test_stop_token_and_stop_string_inside_an_accepted_run_cut_like_plain(same_draft, plain):
    prompt = repetitive_prompts(1, seed=31)[0]
    base = gen(plain("llama"), [prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    toks, text = base.outputs[0].token_ids, base.outputs[0].text
    # a stop token first emitted in the middle of a run of 6 (tokens 1..6, 7..12, ... after the first)
    j = next(j for j in range(8, 40) if toks[j] not in toks[:j] and j % 6 not in (0, 1))
    out = _compare(same_draft, plain("llama"), prompt, temperature=0, max_tokens=40, ignore_eos=True,
                   stop_token_ids=[toks[j]], logprobs=1)
    assert out.finish_reason == "stop" and out.stop_reason == toks[j] and len(out.token_ids) == j + 1
    # min_tokens bans the stop token inside the drafts too: it must first appear after min_tokens
    later = next((i for i in range(j + 1, 40) if toks[i] not in toks[:i]), None)
    if later is not None:
        _compare(same_draft, plain("llama"), prompt, temperature=0, max_tokens=40, ignore_eos=True,
                 stop_token_ids=[toks[j], toks[later]], min_tokens=j + 1)
    # a stop string from the middle of the text
    i = next(i for i in range(len(text) // 2, len(text) - 3)
             if text[i:i + 3].isprintable() and text[i:i + 3].strip() and text.find(text[i:i + 3]) == i)
    for include in (False, True):
        out = _compare(same_draft, plain("llama"), prompt, temperature=0, max_tokens=40, ignore_eos=True,
                       stop=[text[i:i + 3]], include_stop_str_in_output=include, logprobs=2)
        assert out.finish_reason == "stop" and out.stop_reason == text[i:i + 3]
        assert len(out.token_ids) < 40


@pytest.mark.parametrize("max_tokens", [2, 5, 9, 10, 16])
def test_max_tokens_inside_an_accepted_run_cuts_like_plain(same_draft, plain, max_tokens):
    prompt = repetitive_prompts(1, seed=32)[0]
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    got = gen(same_draft, [prompt], sp)[0].outputs[0]
    want = gen(plain("llama"), [prompt], sp)[0].outputs[0]
    assert_same_completion(got, want, logprobs=True)
    assert len(got.token_ids) == max_tokens and got.finish_reason == "length"
    assert_no_leaks(same_draft)


# ---- logprobs, n > 1, preemption, mixed batches -------------------------------------------------------

@pytest.mark.parametrize("method", ["ngram", "suffix", "draft_model"])
def test_greedy_logprobs_with_speculation_equal_plain(method, ckpt, plain, perturbed):
    path = ckpt("mistral")
    prompts = self_copy_prompts(path, 4, seed=41)
    spec = spec_for(method, perturbed, 4)
    llm = make_llm(path, spec)
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=3)
    for g, w in zip(gen(llm, prompts, sp), gen(plain("mistral"), prompts, sp)):
        assert_same_completion(g.outputs[0], w.outputs[0], logprobs=True)
    m = spec_metrics(llm)
    assert m["drafts"] > 0 and m["accepted"] > 0


@pytest.mark.parametrize("method", ["ngram", "suffix", "draft_model"])
def test_n_greater_than_one_with_speculation(method, ckpt, perturbed):
    path = ckpt("mistral")
    prompt = self_copy_prompts(path, 1, seed=42)[0]
    llm = make_llm(path, spec_for(method, perturbed, 4))
    sp = SamplingParams(n=4, temperature=0.5, max_tokens=24, seed=9, ignore_eos=True, logprobs=1)
    out = gen(llm, [prompt], sp)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 24 and len(c.logprobs) == 24 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    m = spec_metrics(llm)
    assert m["drafts"] > 0 and m["accepted"] > 0
    assert out.metrics.num_drafts == m["drafts"] and out.metrics.num_accepted_tokens == m["accepted"]
    assert ids(gen(llm, [prompt], sp)) == ids([out])  # seeded: repeats
    assert_no_leaks(llm)


@pytest.mark.parametrize("method", ["ngram", "suffix", "draft_model"])
def test_preemption_under_a_tiny_kv_budget_gives_the_same_outputs(method, ckpt, perturbed):
    path = ckpt("mistral")
    prompts = self_copy_prompts(path, 8, seed=43, body=50, copy=20)
    spec = spec_for(method, perturbed, 3)
    big = make_llm(path, spec, max_model_len=128)
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    sampled = [SamplingParams(temperature=0.8, max_tokens=40, seed=100 + i, ignore_eos=True) for i in range(8)]
    want_greedy = ids(gen(big, prompts, greedy))
    cfg = big.model_config
    per_block = ModelRunner.kv_bytes_per_block(cfg, 16, torch.float32) * (2 if method == "draft_model" else 1)
    small = make_llm(path, spec, max_model_len=128, kv_cache_memory=12 * per_block)
    assert small.engine.block_manager.num_blocks == 12  # ~2 sequences of 110 tokens at a time
    assert ids(gen(small, prompts, greedy)) == want_greedy
    m = spec_metrics(small)
    assert m["preemptions"] > 0 and m["drafts"] > 0 and m["accepted"] > 0
    assert_no_leaks(small)
    # Seeded sampling under preemption gives the text of the run without it.
    assert ids(gen(small, prompts, sampled)) == ids(gen(big, prompts, sampled))
    assert_no_leaks(small)


@pytest.mark.parametrize("method", ["ngram", "suffix", "draft_model"])
def test_mixed_batch(method, ckpt, plain, perturbed):
    path = ckpt("mistral")
    prompts = self_copy_prompts(path, 5, seed=44)
    spec = spec_for(method, perturbed, 3)
    llm = make_llm(path, spec)
    params = [SamplingParams(temperature=0, max_tokens=20, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0.9, max_tokens=7, seed=3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=13, ignore_eos=True),
              SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_tokens=25, seed=4, logprobs=1,
                             ignore_eos=True),
              SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, presence_penalty=0.5)]
    outs = gen(llm, prompts, params)
    for o, sp in zip(outs, params):
        c = o.outputs[0]
        assert len(c.token_ids) == sp.max_tokens and c.finish_reason == "length"
        assert (c.logprobs is None) == (sp.logprobs is None)
        if c.logprobs is not None:
            assert len(c.logprobs) == sp.max_tokens
            assert all(t in d for t, d in zip(c.token_ids, c.logprobs))
    for i in (0, 2):  # greedy rows: as plain decoding
        want = gen(plain("mistral"), [prompts[i]], params[i])[0].outputs[0]
        assert_same_completion(outs[i].outputs[0], want, logprobs=params[i].logprobs is not None)
    for i in (1, 3):  # seeded rows: as the same request alone without speculation
        alone = gen(plain("mistral"), [prompts[i]], params[i])[0].outputs[0]
        assert_same_completion(outs[i].outputs[0], alone, logprobs=params[i].logprobs is not None)
    m = spec_metrics(llm)
    assert m["drafts"] > 0 and m["accepted"] > 0
    assert_no_leaks(llm)


@pytest.mark.parametrize("method", ["ngram", "suffix", "draft_model"])
def test_tiny_token_budget_and_one_token_prompts(method, ckpt, plain, perturbed):
    """Chunked prefill with a 7-token budget (drafts squeezed by the budget), two sequences at a
    time, a one-token prompt (drafting from its prefill step) and prompt logprobs: as plain."""
    path = ckpt("mistral")
    prompts = self_copy_prompts(path, 3, seed=48) + [[77]]
    spec = spec_for(method, perturbed, 4)
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=1, prompt_logprobs=2)
    want = gen(plain("mistral"), prompts, sp)
    for kw in (dict(max_num_batched_tokens=7, max_num_seqs=2), dict()):
        llm = make_llm(path, spec, **kw)
        got = gen(llm, prompts, sp)
        for g, w in zip(got, want):
            assert_same_completion(g.outputs[0], w.outputs[0], logprobs=True)
            assert [d.keys() if d else None for d in g.prompt_logprobs] == \
                [d.keys() if d else None for d in w.prompt_logprobs]
        m = spec_metrics(llm)
        assert m["drafts"] > 0 and m["accepted"] > 0
        assert_no_leaks(llm)


# ---- disable_by_batch_size ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["ngram", "suffix", "draft_model"])
def test_disable_by_batch_size(method, ckpt, plain, perturbed):
    path = ckpt("mistral")
    prompts = self_copy_prompts(path, 6, seed=45)
    spec = spec_for(method, perturbed, 3, disable_by_batch_size=4)
    llm = make_llm(path, spec)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    assert ids(gen(llm, prompts, sp)) == ids(gen(plain("mistral"), prompts, sp))
    assert spec_metrics(llm)["drafts"] == 0  # 6 >= 4 running the whole time
    # seeded sampling without any draft is plain sampling, draw for draw
    sampled = [SamplingParams(temperature=0.9, max_tokens=24, seed=50 + i, ignore_eos=True) for i in range(6)]
    assert ids(gen(llm, prompts, sampled)) == ids(gen(plain("mistral"), prompts, sampled))
    assert spec_metrics(llm)["drafts"] == 0
    # once the batch shrinks below 4, drafting resumes for the sequences left
    mixed = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (30, 30, 30, 4, 4, 4)]
    outs = gen(llm, prompts, mixed)
    assert ids(outs) == ids(gen(plain("mistral"), prompts, mixed))
    assert all(o.metrics.num_drafts == 0 for o in outs[3:])
    assert all(o.metrics.num_drafts > 0 for o in outs[:3])
    assert spec_metrics(llm)["accepted"] > 0
    # a batch below the limit drafts from the first decode step
    alone = make_llm(path, spec)
    assert ids(gen(alone, prompts[:3], sp)) == ids(gen(plain("mistral"), prompts[:3], sp))
    assert spec_metrics(alone)["drafts"] > 0
    assert_no_leaks(llm)


# ---- metrics ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["ngram", "suffix", "draft_model"])
def test_metrics_are_consistent(method, ckpt, perturbed):
    k = 4
    path = ckpt("mistral")
    prompts = self_copy_prompts(path, 5, seed=46) + repetitive_prompts(3, seed=46)
    spec = spec_for(method, perturbed, k)
    llm = make_llm(path, spec)
    params = [SamplingParams(temperature=0 if i % 2 else 0.8, seed=i, max_tokens=10 + 5 * i, ignore_eos=True)
              for i in range(len(prompts))]
    outs = gen(llm, prompts, params)
    m = spec_metrics(llm)
    assert m["drafts"] > 0 and m["accepted"] > 0
    assert len(m["per_pos"]) == k
    assert sum(m["per_pos"]) == m["accepted"]
    assert all(a >= b for a, b in zip(m["per_pos"], m["per_pos"][1:]))
    assert m["per_pos"][0] <= m["drafts"]
    assert m["drafts"] <= m["draft_tokens"] <= k * m["drafts"]
    assert m["accepted"] <= m["draft_tokens"]
    assert sum(o.metrics.num_drafts for o in outs) == m["drafts"]
    assert sum(o.metrics.num_draft_tokens for o in outs) == m["draft_tokens"]
    assert sum(o.metrics.num_accepted_tokens for o in outs) == m["accepted"]
    for o in outs:
        r = o.metrics
        assert r.num_drafts <= r.num_draft_tokens <= k * r.num_drafts
        # every step emits 1 + accepted tokens (no stop can cut them here): steps >= drafts
        assert r.num_accepted_tokens + r.num_drafts <= len(o.outputs[0].token_ids)
        if r.num_drafts:
            assert r.acceptance_rate == pytest.approx(r.num_accepted_tokens / r.num_draft_tokens)
            assert r.mean_acceptance_length == pytest.approx(1 + r.num_accepted_tokens / r.num_drafts)
        else:
            assert r.acceptance_rate is None and r.mean_acceptance_length is None
    # counters only grow
    gen(llm, prompts[:2], params[:2])
    m2 = spec_metrics(llm)
    assert all(m2[key] >= m[key] for key in ("drafts", "draft_tokens", "accepted"))
    assert all(b >= a for a, b in zip(m["per_pos"], m2["per_pos"]))


def test_no_spec_metrics_without_speculation(plain):
    names = {x.name for x in plain("llama").get_metrics()}
    assert not any("spec_decode" in n for n in names)


def test_stats_log_line(ckpt, caplog):
    path = ckpt("mistral")
    prompts = self_copy_prompts(path, 2, seed=47)
    llm = make_llm(path, ngram(3), disable_log_stats=False)
    llm.engine.log_interval_s = 0
    with caplog.at_level(logging.INFO, logger="quickdraft"):
        gen(llm, prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    lines = [r.getMessage() for r in caplog.records if "SpecDecoding metrics" in r.getMessage()]
    assert lines
    m = spec_metrics(llm)
    last = lines[-1]
    assert f"Accepted: {m['accepted']} tokens" in last and f"Drafted: {m['draft_tokens']} tokens" in last
    assert f"{100 * m['accepted'] / m['draft_tokens']:.1f}%" in last
    # quiet by default
    caplog.clear()
    quiet = make_llm(path, ngram(3))
    quiet.engine.log_interval_s = 0
    with caplog.at_level(logging.INFO, logger="quickdraft"):
        gen(quiet, prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert not any("SpecDecoding" in r.getMessage() for r in caplog.records)
