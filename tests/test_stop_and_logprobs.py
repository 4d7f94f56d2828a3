"""Stop conditions (stop strings, stop token ids, EOS, length), logprobs, prompt logprobs and
detokenization, against transformers (model and tokenizer) on the tiny Llama checkpoint."""

from __future__ import annotations

import pytest
import torch
import transformers

from quickdraft import LLM, SamplingParams

EOS_IDS = {0, 2}  # tiny checkpoints: generation_config eos_token_id [2, 0]
SPECIAL_IDS = {0, 1, 2}
PROMPT = [290, 223, 366, 345, 307, 368, 80, 312]  # "The quick brown fox"
TABLE = [94, 310, 352, 261, 223, 88, 326, 373, 261]  # "| name | value |": greedy emits EOS (0) at step 36
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tok(tiny_checkpoint):
    return transformers.AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))


@torch.no_grad()
def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position of ids (teacher forcing): [len, V]."""
    return model(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def run(llm, prompt, **kw):
    return llm.generate({"prompt_token_ids": prompt}, SamplingParams(**kw), use_tqdm=False)[0]


# ---- stop strings ----------------------------------------------------------------------------

def _pick_stop_string(text: str, ids: list[int], hf_tok) -> tuple[str, int]:
    """A 3-character printable-ASCII string from the middle of the text that first occurs there
    and that spans a token boundary; returns it and its first index."""
    bounds = {len(hf_tok.decode(ids[:k], skip_special_tokens=True)) for k in range(1, len(ids))}
    for i in range(len(text) // 3, len(text) - 3):
        s = text[i:i + 3]
        if (all(32 <= ord(c) < 127 for c in s) and text.find(s) == i
                and any(i < b < i + 3 for b in bounds)):
            return s, i
    raise AssertionError("no usable stop string in the greedy text")


def _tokens_to_complete(s: str, ids: list[int], hf_tok) -> int:
    """The number of tokens after which the full decode first contains s."""
    return next(k for k in range(1, len(ids) + 1) if s in hf_tok.decode(ids[:k], skip_special_tokens=True))


def test_stop_string_trims_text_tokens_and_logprobs(tiny_llm, hf_tok):
    base = run(tiny_llm, PROMPT, max_tokens=48, logprobs=2, **GREEDY).outputs[0]
    text, ids = base.text, base.token_ids
    assert text == hf_tok.decode(ids, skip_special_tokens=True)
    s, i = _pick_stop_string(text, ids, hf_tok)
    k = _tokens_to_complete(s, ids, hf_tok)
    assert 1 < k < 48
    for include in (False, True):
        out = run(tiny_llm, PROMPT, max_tokens=48, logprobs=2, stop=[s], include_stop_str_in_output=include,
                  **GREEDY).outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == s
        assert out.text == (text[:i + 3] if include else text[:i])
        assert out.token_ids == ids[:k]
        assert len(out.logprobs) == k
        assert out.logprobs == base.logprobs[:k]
        assert out.cumulative_logprob == pytest.approx(sum(d[t].logprob for d, t in zip(out.logprobs, ids)))
    # Several stop strings: the one that occurs first in the text wins, wherever it is in the list.
    later = text[-3:] if text.find(text[-3:]) > i else None
    if later is not None:
        out = run(tiny_llm, PROMPT, max_tokens=48, stop=[later, s], **GREEDY).outputs[0]
        assert out.stop_reason == s and out.token_ids == ids[:k]
    # A stop inside the budget beats the length cap, even on the last allowed token.
    out = run(tiny_llm, PROMPT, max_tokens=k, stop=[s], **GREEDY).outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == s and out.token_ids == ids[:k]
    # One token short of completing it: length.
    out = run(tiny_llm, PROMPT, max_tokens=k - 1, stop=[s], **GREEDY).outputs[0]
    assert out.finish_reason == "length" and out.stop_reason is None and out.token_ids == ids[:k - 1]


def test_stop_strings_wait_for_min_tokens(tiny_llm, hf_tok):
    base = run(tiny_llm, PROMPT, max_tokens=48, **GREEDY).outputs[0]
    text, ids = base.text, base.token_ids
    s, i = _pick_stop_string(text, ids, hf_tok)
    k = _tokens_to_complete(s, ids, hf_tok)
    # vLLM: the stop string must be completed by a token after the first min_tokens.
    out = run(tiny_llm, PROMPT, max_tokens=48, stop=[s], min_tokens=k - 1, **GREEDY).outputs[0]
    assert out.stop_reason == s and out.token_ids == ids[:k] and out.text == text[:i]
    # A string that occurs twice: with min_tokens covering the first occurrence, the second stops.
    s2 = next(text[a:a + 2] for a in range(len(text) - 2) if all(32 <= ord(c) < 127 for c in text[a:a + 2])
              and text.find(text[a:a + 2]) == a and text.find(text[a:a + 2], a + 1) != -1)
    for stop, min_tokens in ((s, k), (s2, _tokens_to_complete(s2, ids, hf_tok))):
        out = run(tiny_llm, PROMPT, max_tokens=48, stop=[stop], min_tokens=min_tokens, **GREEDY).outputs[0]
        # Oracle: the first occurrence that ends after the text of the first min_tokens tokens.
        seen = len(hf_tok.decode(ids[:min_tokens], skip_special_tokens=True))
        j = text.find(stop, seen - len(stop) + 1)
        if stop == s2:
            assert j > text.find(s2)
        if j == -1:
            assert out.finish_reason == "length" and out.token_ids == ids and out.text == text
        else:
            end = next(m for m in range(min_tokens + 1, 49)
                       if len(hf_tok.decode(ids[:m], skip_special_tokens=True)) >= j + len(stop))
            assert out.stop_reason == stop and out.token_ids == ids[:end] and out.text == text[:j]


def test_stop_string_never_produced_gives_length(tiny_llm):
    base = run(tiny_llm, PROMPT, max_tokens=20, **GREEDY).outputs[0]
    stop = "zzz\u2603"
    assert stop not in base.text
    out = run(tiny_llm, PROMPT, max_tokens=20, stop=[stop], **GREEDY).outputs[0]
    assert out.finish_reason == "length" and out.stop_reason is None
    assert out.text == base.text and out.token_ids == base.token_ids and len(out.token_ids) == 20


# ---- stop token ids, EOS, length -------------------------------------------------------------

def test_stop_token_ids_stop_at_the_token(tiny_llm, hf_tok):
    ids = run(tiny_llm, PROMPT, max_tokens=24, **GREEDY).outputs[0].token_ids
    j = next(j for j in range(4, 24) if ids[j] not in ids[:j] and ids[j] not in SPECIAL_IDS)
    out = run(tiny_llm, PROMPT, max_tokens=24, stop_token_ids=[ids[j]], logprobs=0, **GREEDY).outputs[0]
    assert out.token_ids == ids[:j + 1]
    assert out.finish_reason == "stop" and out.stop_reason == ids[j]
    assert len(out.logprobs) == j + 1
    # the stop token's text is not part of the output
    assert out.text == hf_tok.decode(ids[:j], skip_special_tokens=True)


def test_eos_stops_and_ignore_eos_runs_to_max_tokens(tiny_llm, hf):
    out = run(tiny_llm, TABLE, temperature=0, max_tokens=64).outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.token_ids[-1] in EOS_IDS and not EOS_IDS & set(out.token_ids[:-1])
    j = len(out.token_ids)
    # Oracle: transformers' greedy continuation through the EOS.
    ref = hf.generate(torch.tensor([TABLE]), attention_mask=torch.ones(1, len(TABLE), dtype=torch.long),
                      max_new_tokens=j + 12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(TABLE):]
    assert ref[:j].tolist() == out.token_ids
    full = run(tiny_llm, TABLE, temperature=0, max_tokens=j + 12, ignore_eos=True).outputs[0]
    assert full.finish_reason == "length" and full.stop_reason is None
    assert full.token_ids == ref.tolist()
    for max_tokens in (1, 10, j - 1):
        short = run(tiny_llm, TABLE, temperature=0, max_tokens=max_tokens).outputs[0]
        assert short.finish_reason == "length" and short.token_ids == out.token_ids[:max_tokens]


def test_max_model_len_caps_generation(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint("llama")), dtype="float32", device="cpu", max_model_len=32)
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=None, **GREEDY), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 32 - len(PROMPT) and out.outputs[0].finish_reason == "length"


# ---- logprobs --------------------------------------------------------------------------------

def _check_logprobs(out, prompt, n_top, hf):
    comp = out.outputs[0] if hasattr(out, "outputs") else out
    ids = comp.token_ids
    ref = hf_logprobs(hf, prompt + ids)[len(prompt) - 1:-1]  # row i predicts output token i
    assert len(comp.logprobs) == len(ids)
    total = 0.0
    for pos, (d, tok) in enumerate(zip(comp.logprobs, ids)):
        row = ref[pos]
        top = row.topk(n_top).indices.tolist() if n_top else []
        assert set(d) == set(top) | {tok}
        for rank, t in enumerate(top, start=1):
            assert d[t].rank == rank
        assert d[tok].rank == 1 + int((row > row[tok]).sum())
        for t, lp in d.items():
            assert lp.logprob == pytest.approx(float(row[t]), abs=1e-4)
        total += d[tok].logprob
    assert comp.cumulative_logprob == pytest.approx(total, abs=1e-4)
    return comp


def test_logprobs_greedy_match_transformers(tiny_llm, hf, hf_tok):
    comp = _check_logprobs(run(tiny_llm, PROMPT, max_tokens=12, logprobs=5, **GREEDY), PROMPT, 5, hf)
    assert all(d[t].rank == 1 for d, t in zip(comp.logprobs, comp.token_ids))
    assert all(len(d) == 5 for d in comp.logprobs)
    d = comp.logprobs[0]
    assert all(lp.decoded_token == hf_tok.decode([t]) for t, lp in d.items())


def test_logprobs_of_sampled_tokens_are_raw_model_logprobs(tiny_llm, hf):
    # temperature/top-k change the sampling law, not the reported (raw) logprobs
    out = run(tiny_llm, PROMPT, max_tokens=16, logprobs=2, temperature=1.3, top_k=30, seed=3, ignore_eos=True)
    comp = _check_logprobs(out, PROMPT, 2, hf)
    assert any(d[t].rank > 2 for d, t in zip(comp.logprobs, comp.token_ids))  # some sizes are 3
    comp0 = _check_logprobs(run(tiny_llm, PROMPT, max_tokens=6, logprobs=0, temperature=1.0, seed=4,
                                ignore_eos=True), PROMPT, 0, hf)
    assert all(len(d) == 1 for d in comp0.logprobs)
    none = run(tiny_llm, PROMPT, max_tokens=4, **GREEDY).outputs[0]
    assert none.logprobs is None and none.cumulative_logprob is None


def test_logprobs_counts_are_per_request_in_a_batch(tiny_llm, hf):
    params = [SamplingParams(max_tokens=6, logprobs=1, **GREEDY), SamplingParams(max_tokens=6, logprobs=4, **GREEDY),
              SamplingParams(max_tokens=6, **GREEDY)]
    outs = tiny_llm.generate([{"prompt_token_ids": PROMPT}, {"prompt_token_ids": TABLE},
                              {"prompt_token_ids": [7, 8, 9]}], params, use_tqdm=False)
    _check_logprobs(outs[0], PROMPT, 1, hf)
    _check_logprobs(outs[1], TABLE, 4, hf)
    assert outs[2].outputs[0].logprobs is None


@pytest.mark.parametrize("chunk", [None, 5])
def test_prompt_logprobs_match_transformers_teacher_forcing(tiny_checkpoint, tiny_llm, hf, chunk):
    llm = tiny_llm if chunk is None else LLM(str(tiny_checkpoint("llama")), dtype="float32", device="cpu",
                                             max_model_len=256, max_num_batched_tokens=chunk)
    prompt = list(range(40, 60)) + PROMPT  # 28 tokens: several prefill chunks when chunk=5
    for n_top in (0, 3):
        out = llm.generate({"prompt_token_ids": prompt},
                           SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=3, prompt_logprobs=n_top),
                           use_tqdm=False)[0]
        plp = out.prompt_logprobs
        assert len(plp) == len(prompt) and plp[0] is None
        ref = hf_logprobs(hf, prompt)
        for t in range(1, len(prompt)):
            row = ref[t - 1]
            top = row.topk(n_top).indices.tolist() if n_top else []
            assert set(plp[t]) == set(top) | {prompt[t]}
            for tok, lp in plp[t].items():
                assert lp.logprob == pytest.approx(float(row[tok]), abs=1e-4)
            assert plp[t][prompt[t]].rank == 1 + int((row > row[prompt[t]]).sum())
            for rank, tok in enumerate(top, start=1):
                assert plp[t][tok].rank == rank
    no = run(llm, prompt, max_tokens=2, **GREEDY)
    assert no.prompt_logprobs is None


# ---- detokenization --------------------------------------------------------------------------

@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_detokenization_equals_full_decode(tiny_llm, hf_tok, skip_special_tokens):
    tok = tiny_llm.get_tokenizer()
    prompts = [{"prompt_token_ids": p} for p in (PROMPT, TABLE, [5, 6, 7], list(range(100, 130)))]
    params = [SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, skip_special_tokens=skip_special_tokens)]
    params += [SamplingParams(temperature=1.5, seed=s, max_tokens=200, ignore_eos=True,
                              skip_special_tokens=skip_special_tokens) for s in range(3)]
    outs = tiny_llm.generate(prompts, params, use_tqdm=False)
    saw_special = False
    for o in outs:
        c = o.outputs[0]
        assert len(c.token_ids) == 200
        saw_special |= bool(SPECIAL_IDS & set(c.token_ids))
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=skip_special_tokens,
                                    spaces_between_special_tokens=True)
        if skip_special_tokens:
            assert c.text == hf_tok.decode(c.token_ids, skip_special_tokens=True)
    assert saw_special  # the runs exercise special tokens in the middle of the text
    raw = tiny_llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True,
                                                       detokenize=False), use_tqdm=False)[0].outputs[0]
    assert raw.text == "" and raw.token_ids == outs[0].outputs[0].token_ids
    if not skip_special_tokens:
        # Without spaces between special tokens the text is exactly transformers' decode.
        params = [SamplingParams(temperature=1.5, seed=s, max_tokens=200, ignore_eos=True, skip_special_tokens=False,
                                 spaces_between_special_tokens=False) for s in range(3)]
        for o in tiny_llm.generate(prompts[1:], params, use_tqdm=False):
            c = o.outputs[0]
            assert c.text == hf_tok.decode(c.token_ids, skip_special_tokens=False)
