"""Greedy speculative decoding is token-identical to plain decoding on the real model, in
every CPU dtype: 50 chat prompts x 128 tokens, batched (verification rows of many sequences
share the forward pass with decodes of others)."""

from __future__ import annotations

import pytest

from quickdraft import LLM, SamplingParams

TOPICS = ["the moon", "bread", "rivers", "chess", "volcanoes", "bees", "trains", "music", "glaciers", "paper"]
SPEC = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 1, "prompt_lookup_max": 4}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_speculation_is_token_identical_on_smollm2(smollm2_gguf, dtype):
    convs = [[{"role": "user", "content": f"Tell me about {TOPICS[i % 10]} and repeat the key facts {i}."}]
             for i in range(50)]
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    plain = LLM(str(smollm2_gguf), dtype=dtype, device="cpu", max_model_len=1024)
    expected = [o.outputs[0].token_ids for o in plain.chat(convs, params, use_tqdm=False)]
    del plain
    spec = LLM(str(smollm2_gguf), dtype=dtype, device="cpu", max_model_len=1024, speculative_config=SPEC)
    outs = spec.chat(convs, params, use_tqdm=False)
    assert sum(o.metrics.num_draft_tokens for o in outs) > 0
    assert sum(o.metrics.num_accepted_tokens for o in outs) > 0
    mismatches = [i for i, (o, e) in enumerate(zip(outs, expected)) if o.outputs[0].token_ids != e]
    assert mismatches == []
