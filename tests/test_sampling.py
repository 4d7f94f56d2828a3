"""Every SamplingParams option against an exact expectation.

Unit tests run the pure functions of quickdraft.sample.sampler on hand-made logits with explicit
generators; end-to-end tests compare the engine on the tiny Llama with laws and greedy loops
computed here from transformers' logits on the same checkpoint (the oracle).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import transformers

from quickdraft import SamplingParams
from quickdraft.sample.noise import ACCEPT, DRAFT, TARGET, NoiseCache, NoiseKey, exponential, uniform
from quickdraft.sample.sampler import (SamplingMetadata, apply_min_p, apply_penalties, apply_top_k_top_p,
                                       process_logits, sample, sample_from_probs)
from stats import chi_square_pvalue, powered_sample_size

ALPHA = 1e-3  # chi-square level of these tests
CPU = torch.device("cpu")

EOS_IDS = {0, 2}  # tiny checkpoints: generation_config eos_token_id [2, 0]


# ---- helpers ---------------------------------------------------------------------------------


def metadata(n: int, temperature: float = 1.0, **kw) -> SamplingMetadata:  # noqa: D103
    greedy = temperature == 0.0
    return SamplingMetadata(temperature=torch.full((n,), temperature if not greedy else 1.0),
                            greedy=torch.full((n,), greedy), all_greedy=greedy, **kw)


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def exp_noise(n: int, V: int, seed: int) -> torch.Tensor:
    """i.i.d. Exp(1) noise [n, V] (what the engine's per-position noise is, row by row)."""
    return torch.empty(n, V).exponential_(generator=gen(seed))


def softmax(x: list[float]) -> list[float]:
    m = max(v for v in x if v != -math.inf)
    e = [math.exp(v - m) if v != -math.inf else 0.0 for v in x]
    s = sum(e)
    return [v / s for v in e]


# ---- top-k / top-p / min-p -------------------------------------------------------------------

def test_top_k_keeps_exactly_the_k_largest():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    ks = torch.tensor([1, 3, 10, 0, 50])
    out = apply_top_k_top_p(logits, ks, None)
    for row, k in enumerate(ks.tolist()):
        kept = set(torch.isfinite(out[row]).nonzero().flatten().tolist())
        expect = set(logits[row].topk(k or 50).indices.tolist())
        assert kept == expect
        # kept logits are untouched
        idx = sorted(kept)
        assert torch.equal(out[row, idx], logits[row, idx])


def test_top_k_sampling_never_leaves_the_top_k_set():
    torch.manual_seed(1)
    row = torch.randn(40)
    top5 = set(row.topk(5).indices.tolist())
    # the law is softmax over the top 5 at temperature 1.5
    idx = sorted(top5)
    p = torch.zeros(40)
    p[idx] = (row[idx] / 1.5).softmax(-1)
    n = powered_sample_size(p, ALPHA)
    logits = row.expand(n, 40).clone()
    md = metadata(n, temperature=1.5, top_k=torch.full((n,), 5))
    tokens = sample(logits, md, exp_noise(n, 40, 0))
    assert set(tokens.tolist()) == top5  # never outside, and every one of the 5 reachable
    assert chi_square_pvalue(torch.bincount(tokens, minlength=40), p) > 1e-3


@pytest.mark.parametrize("top_p, kept", [(0.45, {3}), (0.6, {3, 0}), (0.75, {3, 0, 4}), (0.86, {3, 0, 4, 1}),
                                         (0.99, {0, 1, 2, 3, 4}), (1.0, {0, 1, 2, 3, 4})])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    # token: 0     1     2     3    4
    probs = [0.2, 0.1, 0.05, 0.5, 0.15]  # sorted: 3 (.5), 0 (.2), 4 (.15), 1 (.1), 2 (.05)
    logits = torch.tensor([probs]).log()
    out = apply_top_k_top_p(logits, None, torch.tensor([top_p]))
    assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == kept
    total = sum(probs[i] for i in kept)
    expect = torch.tensor([probs[i] / total if i in kept else 0.0 for i in range(5)])
    torch.testing.assert_close(out.softmax(-1)[0], expect)


def test_top_k_then_top_p_renormalizes_after_top_k():
    # top_k=2 keeps {.4, .3} -> renormalized .571, .429; top_p=.55 then keeps only the first.
    # Without renormalization (.4 < .55) the second would survive too.
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    out = apply_top_k_top_p(logits, torch.tensor([2]), torch.tensor([0.55]))
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]


def test_min_p_drops_tokens_below_min_p_times_max():
    probs = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]])
    out = apply_min_p(probs.log(), torch.tensor([0.3]))  # threshold .12
    assert torch.isfinite(out[0]).tolist() == [True, True, True, False, False]
    out = apply_min_p(probs.log(), torch.tensor([0.2]))  # threshold .08
    assert torch.isfinite(out[0]).tolist() == [True, True, True, True, False]
    out = apply_min_p(probs.log(), torch.tensor([0.0]))
    assert torch.isfinite(out[0]).all()


def test_min_p_applies_after_temperature():
    # At T=2 the probabilities are ∝ sqrt(p): ratios to the max 1, .866, .612, .5, .354; min_p=.55
    # keeps 3 tokens. At T=1 the ratios are 1, .75, .375, .25, .125: it would keep 2.
    p = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]])
    md = metadata(1, temperature=2.0, min_p=torch.tensor([0.55]))
    out = process_logits(p.log(), md)
    assert torch.isfinite(out[0]).tolist() == [True, True, True, False, False]
    q = p[0, :3].sqrt()
    torch.testing.assert_close(out.softmax(-1)[0, :3], q / q.sum())


# ---- temperature / greedy --------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_temperature_law_chi_square(temperature):
    logits_row = [1.0, 0.2, -0.5, 2.0, 0.0, -3.0, 1.5, 0.7]
    law = torch.tensor(softmax([v / temperature for v in logits_row]))
    n = powered_sample_size(law, ALPHA)
    logits = torch.tensor(logits_row).expand(n, 8).clone()
    tokens = sample(logits, metadata(n, temperature), exp_noise(n, 8, 1234))
    counts = torch.bincount(tokens, minlength=8)
    assert chi_square_pvalue(counts, law) > 1e-3
    # The test has power: the law at another temperature is clearly rejected.
    wrong = torch.tensor(softmax([v / (temperature * 1.25) for v in logits_row]))
    assert chi_square_pvalue(counts, wrong) < 1e-6


def test_greedy_is_argmax_also_in_a_mixed_batch():
    torch.manual_seed(3)
    logits = torch.randn(6, 30) * 3
    md = metadata(6, temperature=0.0)
    assert torch.equal(sample(logits, md, None), logits.argmax(-1))
    # rows 0, 2, 4 greedy, the others sample at T=1
    md = SamplingMetadata(temperature=torch.ones(6), greedy=torch.tensor([True, False] * 3), all_greedy=False)
    out = sample(logits, md, exp_noise(6, 30, 0))
    assert torch.equal(out[0::2], logits[0::2].argmax(-1))


# ---- penalties (vLLM semantics) --------------------------------------------------------------

def _penalty_md(rep=None, freq=None, pres=None):
    # Row 0: prompt {0, 1}; output [2, 2, 4, 0]. Row 1: prompt {3}; output [5].
    prompt_mask = torch.zeros(2, 6, dtype=torch.bool)
    prompt_mask[0, [0, 1]] = True
    prompt_mask[1, 3] = True
    counts = torch.zeros(2, 6)
    counts[0, 0], counts[0, 2], counts[0, 4] = 1, 2, 1
    counts[1, 5] = 1
    md = metadata(2)
    md.output_counts = counts
    if rep is not None:
        md.repetition_penalty = torch.tensor(rep)
        md.prompt_mask = prompt_mask
    if freq is not None:
        md.frequency_penalty = torch.tensor(freq)
    if pres is not None:
        md.presence_penalty = torch.tensor(pres)
    return md


LOGITS = [[2.0, -1.0, 0.5, 3.0, -0.5, 1.0], [2.0, -1.0, 0.5, 3.0, -0.5, 1.0]]


@pytest.mark.parametrize("kw, expected", [
    # repetition 2 on prompt+output tokens: positive / r, non-positive * r
    (dict(rep=[2.0, 1.0]), [[1.0, -2.0, 0.25, 3.0, -1.0, 1.0], LOGITS[1]]),
    (dict(rep=[1.0, 0.5]), [LOGITS[0], [2.0, -1.0, 0.5, 6.0, -0.5, 2.0]]),
    # frequency 0.5 * count on output tokens only (prompt token 1 untouched)
    (dict(freq=[0.5, -1.0]), [[1.5, -1.0, -0.5, 3.0, -1.0, 1.0], [2.0, -1.0, 0.5, 3.0, -0.5, 2.0]]),
    # presence 0.3 once per distinct output token
    (dict(pres=[0.3, 0.0]), [[1.7, -1.0, 0.2, 3.0, -0.8, 1.0], LOGITS[1]]),
    # all three, in order repetition -> frequency -> presence
    (dict(rep=[2.0, 1.5], freq=[0.5, 0.0], pres=[0.3, 1.0]),
     [[0.2, -2.0, -1.05, 3.0, -1.8, 1.0], [2.0, -1.0, 0.5, 2.0, -0.5, 1.0 / 1.5 - 1.0]]),
])
def test_penalties_match_vllm_formulas(kw, expected):
    out = apply_penalties(torch.tensor(LOGITS), _penalty_md(**kw))
    torch.testing.assert_close(out, torch.tensor(expected))


# ---- the exponential race --------------------------------------------------------------------

def test_exponential_race_law_and_zero_probability_tokens():
    probs_row = torch.tensor([0.3, 0.0, 0.25, 0.001, 0.0, 0.2, 0.149, 0.1])
    n = powered_sample_size(probs_row, ALPHA)
    probs = probs_row.expand(n, 8).clone()
    tokens = sample_from_probs(probs, exp_noise(n, 8, 7))
    counts = torch.bincount(tokens, minlength=8)
    assert counts[1] == 0 and counts[4] == 0
    assert chi_square_pvalue(counts, probs_row) > ALPHA
    # A one-token law is always drawn, whatever the noise.
    onehot = torch.zeros(1000, 8)
    onehot[:, 6] = 1.0
    assert (sample_from_probs(onehot, exp_noise(1000, 8, 8)) == 6).all()


# ---- counter-based noise (sample/noise.py) -------------------------------------------------------

def test_noise_is_a_function_of_its_key_alone():
    key = NoiseKey(2**64 - 1, 1, 37, TARGET)
    a = exponential(key, 64, CPU)
    cache = NoiseCache(64, CPU)
    for other in (NoiseKey(5, 0, 0, TARGET), NoiseKey(5, 0, 1, TARGET)):  # other draws first
        cache.exponential(other)
    assert torch.equal(cache.exponential(key), a)
    assert torch.equal(cache.rows([None, key])[1], a) and torch.equal(cache.rows([None, key])[0], torch.ones(64))
    # every field of the key matters
    for other in (NoiseKey(2**64 - 2, 1, 37, TARGET), NoiseKey(2**64 - 1, 0, 37, TARGET),
                  NoiseKey(2**64 - 1, 1, 36, TARGET), NoiseKey(2**64 - 1, 1, 37, DRAFT)):
        assert not torch.equal(exponential(other, 64, CPU), a)
    assert uniform(NoiseKey(3, 0, 4, ACCEPT)) == uniform(NoiseKey(3, 0, 4, ACCEPT)) != uniform(NoiseKey(3, 0, 5, ACCEPT))


def test_noise_is_numpys_philox_at_the_documented_key_and_counter():
    """The stream of a key is np.random.Philox(key=seed + 2**64 index, counter=2**64 position
    + 2**128 stream), whatever was drawn before on the reused bit generator."""
    import numpy as np

    for key in (NoiseKey(5, 0, 7, TARGET), NoiseKey(2**64 - 1, 3, 2**40, ACCEPT), NoiseKey(0, 0, 0, DRAFT)):
        ref = np.random.Generator(np.random.Philox(key=key.seed + (key.index << 64),
                                                   counter=(key.position << 64) + (key.stream << 128)))
        want = ref.standard_exponential(50, dtype=np.float32)
        exponential(NoiseKey(1, 1, 1, 1), 13, CPU)  # a partial draw in between
        assert torch.equal(exponential(key, 50, CPU), torch.from_numpy(np.maximum(want, np.finfo(np.float32).tiny)))
        ref = np.random.Generator(np.random.Philox(key=key.seed + (key.index << 64),
                                                   counter=(key.position << 64) + (key.stream << 128)))
        assert uniform(key) == ref.random()


def test_noise_rows_are_exp1_and_uniforms_are_uniform():
    """Binned into 10 equiprobable cells under the claimed law, across keys and within rows."""
    edges = -torch.log1p(-torch.arange(1, 10, dtype=torch.float64) / 10)  # Exp(1) deciles
    cells = torch.full((10,), 0.1, dtype=torch.float64)
    n = powered_sample_size(cells, ALPHA)
    per_key = 64
    values = torch.cat([exponential(NoiseKey(9, 0, pos, TARGET), per_key, CPU) for pos in range(n // per_key + 1)])
    counts = torch.bincount(torch.bucketize(values.double()[:n], edges), minlength=10)
    assert chi_square_pvalue(counts, cells) > ALPHA
    u = torch.tensor([uniform(NoiseKey(9, 0, pos, ACCEPT)) for pos in range(n)])
    assert chi_square_pvalue(torch.bincount((u * 10).long(), minlength=10), cells) > ALPHA


# ---- end to end against transformers ---------------------------------------------------------

@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), dtype=torch.float32).eval()


@torch.no_grad()
def hf_last_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0, -1].double()


PROMPT = [290, 223, 366, 345, 307, 368, 80, 312]  # "The quick brown fox" in the tiny tokenizer


def reference_law(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """vLLM's law written out independently: temperature, top-k, then the smallest prefix of the
    renormalized top-k whose mass reaches top_p (a token is kept iff the mass strictly before it
    is < top_p)."""
    z = logits / temperature
    order = z.argsort(descending=True).tolist()[:top_k]
    p = torch.softmax(z[order], 0)
    before = torch.cat([torch.zeros(1, dtype=p.dtype), p.cumsum(0)[:-1]])
    # the oracle is only meaningful away from the top-p boundary
    assert (before - top_p).abs().min() > 1e-4
    keep = before < top_p
    law = torch.zeros_like(logits)
    law[torch.tensor(order)[keep]] = p[keep] / p[keep].sum()
    return law


def test_first_token_law_matches_transformers(tiny_llm, hf):
    law = reference_law(hf_last_logits(hf, PROMPT), 0.7, 20, 0.9)
    support = int((law > 0).sum())
    assert 3 <= support < 20  # both top-k and top-p bite on this prompt
    n = powered_sample_size(law, ALPHA)
    params = [SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_tokens=1, seed=i) for i in range(n)]
    outs = tiny_llm.generate([{"prompt_token_ids": PROMPT}] * n, params, use_tqdm=False)
    tokens = torch.tensor([o.outputs[0].token_ids[0] for o in outs])
    counts = torch.bincount(tokens, minlength=law.numel())
    assert counts[law == 0].sum() == 0
    assert chi_square_pvalue(counts, law) > 1e-3
    # and n > 1 from the engine's own generator follows the same law
    out = tiny_llm.generate({"prompt_token_ids": PROMPT},
                            SamplingParams(n=n, temperature=0.7, top_k=20, top_p=0.9, max_tokens=1),
                            use_tqdm=False)[0]
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in out.outputs]), minlength=law.numel())
    assert counts[law == 0].sum() == 0
    assert chi_square_pvalue(counts, law) > 1e-3


def test_seeded_requests_repeat_alone_and_batched(tiny_llm):
    sp = SamplingParams(temperature=1.0, max_tokens=16, seed=123, ignore_eos=True)
    alone = tiny_llm.generate({"prompt_token_ids": PROMPT}, sp, use_tqdm=False)[0].outputs[0].token_ids
    again = tiny_llm.generate({"prompt_token_ids": PROMPT}, sp, use_tqdm=False)[0].outputs[0].token_ids
    assert alone == again and len(alone) == 16
    others = [SamplingParams(temperature=0.9, max_tokens=20, seed=7, ignore_eos=True),
              SamplingParams(temperature=1.2, max_tokens=5, ignore_eos=True),
              sp,
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]
    prompts = [{"prompt_token_ids": p} for p in ([5, 6, 7], PROMPT, PROMPT, list(range(40, 70)))]
    batched = tiny_llm.generate(prompts, others, use_tqdm=False)
    assert batched[2].outputs[0].token_ids == alone
    other_seed = tiny_llm.generate({"prompt_token_ids": PROMPT},
                                   SamplingParams(temperature=1.0, max_tokens=16, seed=124, ignore_eos=True),
                                   use_tqdm=False)[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_returns_n_different_completions(tiny_llm):
    sp = SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=9, ignore_eos=True)
    out = tiny_llm.generate({"prompt_token_ids": PROMPT}, sp, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    seqs = [tuple(c.token_ids) for c in out.outputs]
    assert len(set(seqs)) == 4 and all(len(s) == 12 for s in seqs)
    assert [tuple(c.token_ids) for c in tiny_llm.generate({"prompt_token_ids": PROMPT}, sp,
                                                          use_tqdm=False)[0].outputs] == seqs
    assert out.finished and all(c.finish_reason == "length" for c in out.outputs)


def reference_greedy(model, prompt: list[int], max_tokens: int, *, rep: float = 1.0, freq: float = 0.0,
                     pres: float = 0.0, banned_until: int = 0, banned: set[int] = frozenset(),
                     stops: set[int] = frozenset()) -> list[int]:
    """Greedy decoding on transformers' logits with vLLM's rules: repetition penalty on prompt and
    output tokens, frequency/presence on output tokens, `banned` masked while fewer than
    `banned_until` tokens were generated, stop after a token in `stops`."""
    out: list[int] = []
    while len(out) < max_tokens:
        logits = hf_last_logits(model, prompt + out)
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[prompt + out] = True
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).double()
        logits = logits - freq * counts - pres * (counts > 0).double()
        if len(out) < banned_until:
            logits[sorted(banned)] = -math.inf
        top2 = logits.topk(2)
        assert top2.values[0] - top2.values[1] > 1e-4, "near tie: pick another prompt"
        out.append(int(top2.indices[0]))
        if out[-1] in stops:
            break
    return out


FIB = [292, 72, 289, 10, 80, 318]  # "def fibonacci(n):" — its greedy output repeats tokens


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.3), dict(repetition_penalty=0.8),
                                dict(frequency_penalty=0.6), dict(presence_penalty=1.0),
                                dict(repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=-0.4)])
def test_penalties_end_to_end_match_reference_greedy(tiny_llm, hf, kw):
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **kw)
    got = tiny_llm.generate({"prompt_token_ids": FIB}, sp, use_tqdm=False)[0].outputs[0].token_ids
    expect = reference_greedy(hf, FIB, 24, rep=kw.get("repetition_penalty", 1.0),
                              freq=kw.get("frequency_penalty", 0.0), pres=kw.get("presence_penalty", 0.0))
    assert got == expect
    plain = tiny_llm.generate({"prompt_token_ids": FIB}, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0].token_ids
    assert got != plain  # the penalty actually changed the output


TABLE = [94, 310, 352, 261, 223, 88, 326, 373, 261]  # "| name | value |": greedy emits EOS (0) at step 36


def test_min_tokens_delays_eos(tiny_llm, hf):
    plain = tiny_llm.generate({"prompt_token_ids": TABLE}, SamplingParams(temperature=0, max_tokens=64),
                              use_tqdm=False)[0].outputs[0]
    assert plain.finish_reason == "stop" and plain.token_ids[-1] in EOS_IDS
    j = len(plain.token_ids)  # EOS is the greedy choice for token number j
    for min_tokens in (j, j + 3):  # j: the ban must still cover the j-th token
        sp = SamplingParams(temperature=0, max_tokens=j + 20, min_tokens=min_tokens)
        got = tiny_llm.generate({"prompt_token_ids": TABLE}, sp, use_tqdm=False)[0].outputs[0]
        assert not EOS_IDS & set(got.token_ids[:min_tokens])
        assert len(got.token_ids) > min_tokens
        assert got.token_ids[:j - 1] == plain.token_ids[:j - 1]
        expect = reference_greedy(hf, TABLE, j + 20, banned_until=min_tokens, banned=EOS_IDS, stops=EOS_IDS)
        assert got.token_ids == expect
        assert got.finish_reason == ("stop" if expect[-1] in EOS_IDS else "length")


def test_min_tokens_delays_stop_token_ids(tiny_llm, hf):
    first = tiny_llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=1),
                              use_tqdm=False)[0].outputs[0].token_ids[0]
    # Without min_tokens the greedy first token stops the request at once.
    out = tiny_llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, stop_token_ids=[first]),
                            use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [first] and out.stop_reason == first
    # min_tokens=1: the first token may not be it.
    out = tiny_llm.generate({"prompt_token_ids": PROMPT},
                            SamplingParams(temperature=0, max_tokens=3, min_tokens=1, stop_token_ids=[first]),
                            use_tqdm=False)[0].outputs[0]
    assert out.token_ids[0] != first and len(out.token_ids) > 1
    sp = SamplingParams(temperature=0, max_tokens=30, min_tokens=5, stop_token_ids=[first])
    got = tiny_llm.generate({"prompt_token_ids": PROMPT}, sp, use_tqdm=False)[0].outputs[0]
    assert first not in got.token_ids[:5] and len(got.token_ids) >= 5
    expect = reference_greedy(hf, PROMPT, 30, banned_until=5, banned={first} | EOS_IDS, stops={first} | EOS_IDS)
    assert got.token_ids == expect


# ---- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-1), "temperature must be non-negative, got -1"),
    (dict(top_p=0), "top_p must be in (0, 1], got 0"),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(top_k=-2), "top_k must be 0 (disable), or at least 1, got -2"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens must be less than or equal to max_tokens=4"),
    (dict(stop=[""]), "stop cannot contain an empty string."),
    (dict(n=2, temperature=0), "n must be 1 when using greedy sampling, got 2"),
    (dict(max_tokens=0), "max_tokens must be at least 1, got 0"),
    (dict(seed=2**70), "seed must be an integer in [0, 2**64 - 1], got 1180591620717411303424"),
    (dict(seed=-1), "seed must be an integer in [0, 2**64 - 1], got -1"),
    (dict(temperature=3.5e38), "temperature must be at most 10000, got 3.5e+38"),
    (dict(temperature=math.inf), "temperature must be at most 10000, got inf"),
    (dict(temperature=math.nan), "temperature must be non-negative, got nan"),
    (dict(repetition_penalty=math.inf), "repetition_penalty must be a finite number greater than zero, got inf"),
    (dict(logit_bias={5: 101.0}), "logit_bias values must be numbers in [-100, 100], got 101.0 for token 5"),
    (dict(logit_bias={"x": 1.0}), "logit_bias keys must be token ids, got 'x'"),
    (dict(logit_bias={-3: 1.0}), "logit_bias token ids must be non-negative, got -3"),
    (dict(allowed_token_ids=[]), "allowed_token_ids must not be empty"),
    (dict(allowed_token_ids=[3, -1]), "allowed_token_ids must be non-negative integers, got -1"),
    (dict(bad_words=["ok", "  "]), "bad_words must be non-empty strings, got '  '"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens must be >= 1, got 0"),
])
def test_bad_values_raise_with_the_brief_message(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplingParams(**kw)


def test_valid_edge_values_are_accepted():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(seed=2**64 - 1, temperature=1e4).seed == 2**64 - 1
    assert SamplingParams(logit_bias={"12": -100, 7: 100.0}).logit_bias == {12: -100, 7: 100.0}  # JSON keys too
    assert SamplingParams(bad_words="fox").bad_words == ["fox"]
    SamplingParams(top_p=1.0, top_k=1, temperature=0, min_tokens=16, max_tokens=16, n=1)
    assert SamplingParams(stop="ab").stop == ["ab"]


def test_a_bad_request_in_a_list_runs_nothing(tiny_llm):
    engine = tiny_llm.engine
    good = {"prompt_token_ids": PROMPT}
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    before = tiny_llm.generate(good, sp, use_tqdm=False)[0].outputs[0].token_ids
    def counters():
        return {m.name: m.value for m in tiny_llm.get_metrics()
                if m.name in ("quickdraft:prompt_tokens", "quickdraft:generation_tokens")}

    before_counts = counters()
    bad_inputs = [
        [good, {"prompt_token_ids": [5, 10_000]}, good],  # token out of vocabulary
        [good, {"prompt_token_ids": list(range(3, 259))}],  # longer than max_model_len
        [good, {"prompt_token_ids": []}],
    ]
    for prompts in bad_inputs:
        with pytest.raises(ValueError):
            tiny_llm.generate(prompts, sp, use_tqdm=False)
    # token ids in the params outside the vocabulary, in the last request of a list
    for bad in (SamplingParams(max_tokens=4, allowed_token_ids=[5, 384]), SamplingParams(logit_bias={10**6: 1.0})):
        with pytest.raises(ValueError, match=r"Request 2 of 3 is invalid \(nothing was run\): .*out-of-vocabulary "
                                             r"token id (384|1000000) \(vocab size 384\)"):
            tiny_llm.generate([good, good, good], [sp, sp, bad], use_tqdm=False)
    with pytest.raises(ValueError):  # wrong number of sampling params
        tiny_llm.generate([good, good], [sp, sp, sp], use_tqdm=False)
    # nothing was queued, prefilled or generated for the good requests
    assert counters() == before_counts and len(before_counts) == 2
    assert not engine.has_unfinished_requests() and not engine.requests
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    after = tiny_llm.generate([good, good], sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in after] == [before, before]


# ---- logit_bias, allowed_token_ids, bad_words, truncate_prompt_tokens -----------------------------

def test_bans_and_bias_come_before_penalties_and_temperature():
    """vLLM's order on hand-made logits: allowed_token_ids, bans, logit_bias, then penalties,
    then temperature (and the law is the softmax of that)."""
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5, 3.0, 0.0]])
    md = metadata(1, temperature=2.0, allowed_mask=torch.tensor([[True, True, True, True, False, True]]),
                  banned_tokens=[[3]], logit_bias=(torch.tensor([0, 0]), torch.tensor([1, 2]), torch.tensor([2.5, 2.0])),
                  repetition_penalty=torch.tensor([2.0]), output_counts=torch.zeros(1, 6),
                  prompt_mask=torch.tensor([[False, True, True, False, False, False]]))
    inf = math.inf
    # token 4 not allowed, 3 banned; bias: 1 -> 3.5, 2 -> 1.0; repetition on 1, 2 (positive: / 2)
    expected = torch.tensor([[2.0, 1.75, 0.5, -inf, -inf, 0.0]]) / 2.0
    assert torch.equal(process_logits(logits, md), expected)
    law = torch.tensor(softmax(expected[0].tolist()))
    n = powered_sample_size(law, ALPHA)
    tokens = sample(logits.expand(n, 6).clone(), metadata(n, temperature=2.0, allowed_mask=md.allowed_mask.expand(n, 6),
                                                         banned_tokens=[[3]] * n,
                                                         logit_bias=(torch.arange(n).repeat_interleave(2),
                                                                     torch.tensor([1, 2] * n), torch.tensor([2.5, 2.0] * n)),
                                                         repetition_penalty=torch.full((n,), 2.0),
                                                         output_counts=torch.zeros(n, 6),
                                                         prompt_mask=md.prompt_mask.expand(n, 6)),
                    exp_noise(n, 6, 21))
    assert chi_square_pvalue(torch.bincount(tokens, minlength=6), law) > ALPHA


def reference_greedy_with(model, prompt: list[int], max_tokens: int, transform) -> list[int]:
    """Greedy decoding on transformers' logits after transform(logits, output_so_far)."""
    out: list[int] = []
    while len(out) < max_tokens:
        logits = transform(hf_last_logits(model, prompt + out), out)
        top2 = logits.topk(2)
        assert top2.values[0] - top2.values[1] > 1e-4, "near tie: pick another prompt"
        out.append(int(top2.indices[0]))
    return out


def test_logit_bias_and_allowed_token_ids_end_to_end(tiny_llm, hf):
    plain = tiny_llm.generate({"prompt_token_ids": FIB}, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0].token_ids
    bias = {plain[3]: -4.0, 100: 3.0, 37: 2.5}

    def biased(logits, out):
        logits = logits.clone()
        for t, b in bias.items():
            logits[t] += b
        return logits

    got = tiny_llm.generate({"prompt_token_ids": FIB}, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                                       logit_bias=bias), use_tqdm=False)[0]
    assert got.outputs[0].token_ids == reference_greedy_with(hf, FIB, 16, biased) != plain
    allowed = sorted(set(range(3, 384, 3)) - set(plain[:4]))

    def only_allowed(logits, out):
        masked = torch.full_like(logits, -math.inf)
        masked[allowed] = logits[allowed]
        return masked

    got = tiny_llm.generate({"prompt_token_ids": FIB}, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                                       allowed_token_ids=allowed), use_tqdm=False)[0]
    assert got.outputs[0].token_ids == reference_greedy_with(hf, FIB, 16, only_allowed)
    sampled = tiny_llm.generate({"prompt_token_ids": FIB}, SamplingParams(n=50, temperature=1.5, max_tokens=8, seed=3,
                                                                           allowed_token_ids=allowed), use_tqdm=False)[0]
    assert all(t in allowed for c in sampled.outputs for t in c.token_ids)


def test_bad_words_are_never_generated(tiny_llm, hf):
    """A two-token word of the plain greedy output is banned: vLLM's rule, written out here,
    bans the word's last token wherever the output ends with the rest of it (both the word as
    it reads at the start of a text and after a space)."""
    tok = tiny_llm.get_tokenizer()
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = tiny_llm.generate({"prompt_token_ids": FIB}, sp, use_tqdm=False)[0].outputs[0]
    ids = plain.token_ids
    word = next(text for i in range(len(ids) - 1) for text in [tok.decode(ids[i:i + 2])]
                if text.strip() == text and text and tok.encode(text, add_special_tokens=False) == ids[i:i + 2])
    sequences = [tok.encode(word, add_special_tokens=False)]
    spaced = tok.encode(" " + word, add_special_tokens=False)
    if spaced[0] != sequences[0][0] and len(spaced) == len(sequences[0]):
        sequences.append(spaced)

    def banned(logits, out):
        logits = logits.clone()
        for seq in sequences:
            if len(seq) == 1 or out[len(out) - len(seq) + 1:] == seq[:-1] and len(out) >= len(seq) - 1:
                logits[seq[-1]] = -math.inf
        return logits

    got = tiny_llm.generate({"prompt_token_ids": FIB}, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                                       bad_words=[word]), use_tqdm=False)[0].outputs[0]
    assert got.token_ids == reference_greedy_with(hf, FIB, 24, banned)
    assert got.token_ids != plain.token_ids
    for seq in sequences:
        ids = got.token_ids
        assert not any(ids[i:i + len(seq)] == seq for i in range(len(ids)))


def test_truncate_prompt_tokens_keeps_the_last_tokens(tiny_llm):
    long_prompt = list(range(40, 90))
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, prompt_logprobs=1)
    got = tiny_llm.generate({"prompt_token_ids": long_prompt}, SamplingParams(
        temperature=0, max_tokens=10, ignore_eos=True, prompt_logprobs=1, truncate_prompt_tokens=12), use_tqdm=False)[0]
    want = tiny_llm.generate({"prompt_token_ids": long_prompt[-12:]}, sp, use_tqdm=False)[0]
    assert got.prompt_token_ids == long_prompt[-12:] and got.outputs[0].token_ids == want.outputs[0].token_ids
    assert len(got.prompt_logprobs) == 12
    # a prompt longer than the context is fine once truncated
    too_long = list(range(3, 300))
    out = tiny_llm.generate({"prompt_token_ids": too_long}, SamplingParams(temperature=0, max_tokens=4,
                                                                          truncate_prompt_tokens=100), use_tqdm=False)[0]
    assert out.prompt_token_ids == too_long[-100:] and len(out.outputs[0].token_ids) == 4
