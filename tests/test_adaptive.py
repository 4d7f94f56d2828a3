"""The adaptive draft-length policy: pure rules, and its effect in the engine."""

from __future__ import annotations

import pytest

from quickdraft import LLM, SamplingParams
from quickdraft.spec_decode.adaptive import DraftLengthPolicy


def test_update_rules():
    p = DraftLengthPolicy(max_k=8)
    assert p.update(4, drafted=4, accepted=4) == 8  # full hit: double
    assert p.update(8, drafted=8, accepted=8) == 8  # capped at k
    assert p.update(1, drafted=1, accepted=1) == 2
    assert p.update(5, drafted=5, accepted=0) == 2  # full miss: halve
    assert p.update(1, drafted=1, accepted=0) == 0  # down to no drafting
    assert p.update(5, drafted=5, accepted=2) == 3  # one past the accepted run
    assert p.update(6, drafted=0, accepted=0) == 6  # nothing verified: unchanged


def test_batch_cap():
    p = DraftLengthPolicy(max_k=5, rows_budget=128)
    assert p.for_batch(5, 1) == 5 and p.for_batch(5, 16) == 5
    assert p.for_batch(5, 32) == 3 and p.for_batch(5, 64) == 1 and p.for_batch(5, 200) == 0


def test_failing_drafts_shrink_to_zero_then_probe_again(tiny_checkpoint):
    """A prompt full of repeated n-grams whose continuations the model never follows: drafting
    backs off (fewer draft tokens than fixed k would spend) and outputs stay identical."""
    path = str(tiny_checkpoint("llama"))
    prompt = [7, 8, 9, 10, 11] * 12
    sp = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    plain = LLM(path, dtype="float32", device="cpu", max_model_len=256)
    expected = plain.generate({"prompt_token_ids": prompt}, sp, use_tqdm=False)[0].outputs[0].token_ids
    spec = LLM(path, dtype="float32", device="cpu", max_model_len=256, speculative_config={
        "method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 1, "prompt_lookup_max": 3})
    ks: list[int] = []
    engine = spec.engine
    engine.add_request("r", None, prompt, sp)
    outs = []
    while engine.has_unfinished_requests():
        for seq in engine.scheduler.running:
            ks.append(seq.spec_k)
        outs += engine.step()
    assert outs[0].outputs[0].token_ids == expected
    m = outs[0].metrics
    assert m.num_drafts > 0 and m.num_draft_tokens < 5 * m.num_drafts
    assert 0 in ks  # backed off completely at some point
    assert any(a == 0 and b > 0 for a, b in zip(ks, ks[1:]))  # and probed again


def test_expected_tokens_hand_computed():
    E = DraftLengthPolicy.expected_tokens
    assert E(0, 0.3) == 1.0
    assert abs(E(2, 0.5) - 1.75) < 1e-12  # 1 + 0.5 + 0.25
    assert E(4, 1.0) == 5.0


def test_cost_rule_drafts_only_what_pays():
    """costs[k] in plain steps; E(k) / cost[k] decides: p = 0.1 -> no draft (1.1 / 1.2 < 1);
    p = 0.5 -> k = 2 (1.5 / 1.2 and 1.75 / 1.4 tie at 1.25: the longer; 1.875 / 2.4 < 1);
    p = 1 -> k = 2 (3 / 1.4 = 2.14 beats 2 / 1.2 and 4 / 2.4 = 1.67)."""
    p = DraftLengthPolicy(max_k=3, step_cost=(1.0, 1.2, 1.4, 2.4))
    assert p.worth(3, 0.1) == 0
    assert p.worth(3, 0.5) == 2
    assert p.worth(3, 1.0) == 2
    assert p.worth(1, 1.0) == 1  # never above the k it is given
    assert p.worth(3, 0.25) == 1  # 1.25 / 1.2 = 1.04 > 1; 1.3125 / 1.4 < 1
    assert DraftLengthPolicy(max_k=3).worth(3, 0.0) == 3  # no costs: the rule is off
    assert abs(p.break_even() - 0.2) < 1e-6  # (1 + p) / 1.2 = 1
    assert DraftLengthPolicy(max_k=2, step_cost=(1.0, 2.1, 3.2)).break_even() == 1.0  # never pays


def test_acceptance_estimate_is_a_discounted_count():
    p = DraftLengthPolicy(max_k=5, decay=0.5)
    assert p.acceptance(0.0, 0.0) == 0.5  # the prior
    h, m = p.observe(0.0, 0.0, drafted=5, accepted=5)  # all accepted: 5 hits, no miss
    assert (h, m) == (5.0, 0.0)
    h, m = p.observe(h, m, drafted=4, accepted=1)  # one hit, then a rejection
    assert (h, m) == (3.5, 1.0)
    assert p.acceptance(h, m) == 4.5 / 6.5
    assert p.observe(h, m, drafted=0, accepted=0) == (h, m)


def test_step_costs_measured_and_a_costly_draft_is_not_used(tiny_checkpoint):
    """A draft model as large as the target (the same tiny checkpoint) costs more per drafted
    token than it can save: the engine measures that at start and only probes one token now and
    then, with outputs identical to plain decoding. With draft_length_policy="fixed" it drafts
    k tokens every step, as vLLM does."""
    path = str(tiny_checkpoint("llama"))
    prompt = [5, 6, 7, 8] * 8
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = LLM(path, dtype="float32", device="cpu", max_model_len=256)
    want = plain.generate({"prompt_token_ids": prompt}, sp, use_tqdm=False)[0].outputs[0].token_ids
    spec = {"model": path, "num_speculative_tokens": 3}
    adaptive = LLM(path, dtype="float32", device="cpu", max_model_len=256, speculative_config=spec)
    costs = adaptive.engine.draft_policy.step_cost
    assert len(costs) == 4 and costs[0] == 1.0 and list(costs) == sorted(costs)
    assert costs[3] > 2.0  # three draft steps of a model as large as the target, and four rows
    # The measured draft step is about one target step, so drafting is near break-even at best
    # and timing noise decides; the engine's behaviour is checked on the costs such a draft has
    # without noise (each draft token one more plain step, each row a little more).
    policy = DraftLengthPolicy(3, step_cost=(1.0, 2.05, 3.1, 4.15))
    assert policy.break_even() == 1.0
    adaptive.engine.draft_policy = policy
    out = adaptive.generate({"prompt_token_ids": prompt}, sp, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == want
    m = out.metrics
    assert 0 < m.num_drafts <= 40 // adaptive.engine.draft_policy.probe_interval
    assert m.num_draft_tokens == m.num_drafts  # probes of one token only
    fixed = LLM(path, dtype="float32", device="cpu", max_model_len=256,
                speculative_config={**spec, "draft_length_policy": "fixed"})
    out = fixed.generate({"prompt_token_ids": prompt}, sp, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == want
    assert out.metrics.num_draft_tokens >= 3 * (out.metrics.num_drafts - 1)  # k each; the last may be cut short
    assert out.metrics.num_accepted_tokens == out.metrics.num_draft_tokens  # the draft is the target


def test_trim_keeps_the_prefix_with_the_best_tokens_per_cost():
    policy = DraftLengthPolicy(4, step_cost=(1.0, 1.2, 1.4, 1.6, 1.8))
    # (1 + 0.9) / 1.2 = 1.58, (1 + 0.9 + 0.8) / 1.4 = 1.93, (2.7 + 0.1) / 1.6 = 1.75
    assert policy.trim([0.9, 0.8, 0.1]) == 2
    # capped by the sequence's record p = 0.5: 0.5, 0.25, 0.125 -> 1.25, 1.25 (no better), 1.16
    assert policy.trim([0.9, 0.8, 0.1], p=0.5) == 1
    assert policy.trim([]) == 0
    # no length beats plain decoding
    assert DraftLengthPolicy(2, step_cost=(1.0, 2.0, 3.0)).trim([0.5, 0.2]) == 0
    # fixed, or no measured costs: the whole draft
    assert DraftLengthPolicy(4, fixed=True).trim([0.01, 0.01]) == 2
    assert DraftLengthPolicy(4).trim([0.01, 0.01]) == 2


def test_in_a_batch_draft_rows_cost_every_sequence():
    """T(R) = 4 + R (a step reads the weights, 4 row-times, then computes R rows): alone a draft
    row costs 1/5 of a step; in a batch of 8 it slows all 8 sequences' step of 12 by 1/12, i.e.
    8/12 of a plain step per sequence."""
    row_time = tuple((r, 4.0 + r) for r in (1, 2, 4, 8, 16, 32))
    policy = DraftLengthPolicy(3, step_cost=(1.0, 1.2, 1.4, 1.6), row_time=row_time)
    assert policy.cost(2, 1) == 1.4
    assert policy.cost(1, 8) == pytest.approx(1 + 8 * 1 / 12)
    assert policy.cost(3, 8) == pytest.approx(1 + 8 * 3 / 12)
    assert policy.cost(2, 40) == pytest.approx(1 + 40 * 2 / 44)  # extrapolated past 32 rows
    # p = 0.6: alone E(1) / 1.2 = 1.33 pays; in the batch E(1) = 1.6 < 1.67 does not
    assert policy.worth(3, 0.6, batch=1) > 0 and policy.worth(3, 0.6, batch=8) == 0
    assert policy.trim([0.6, 0.4], batch=1) > 0 and policy.trim([0.6, 0.4], batch=8) == 0
    assert policy.worth(3, 0.95, batch=8) > 0  # drafts accepted almost always still pay


def test_row_times_are_measured_at_start(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint("llama")), dtype="float32", device="cpu", max_model_len=256,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    rows = [r for r, _ in llm.engine.draft_policy.row_time]
    times = [t for _, t in llm.engine.draft_policy.row_time]
    assert rows == [1, 2, 4, 8, 16, 32, 64, 128] and times == sorted(times) and times[0] > 0
