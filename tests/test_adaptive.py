"""The adaptive draft-length policy: pure rules, and its effect in the engine."""

from __future__ import annotations

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
