"""The real SmolLM2-135M-Instruct GGUF against transformers loading the same file."""

from __future__ import annotations

import pytest
import torch

from quickdraft import LLM, SamplingParams
from quickdraft.engine.model_runner import SeqInput

QUESTIONS = [
    "Write a Python function that checks whether a number is prime.",
    "What is the capital of France?",
    "Summarize: The cat sat on the mat. It was warm and sunny, and the cat fell asleep.",
    "List three colors.",
]


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


def test_default_model_name_loads_the_embedded_gguf(smollm2_llm, smollm2_gguf):
    assert smollm2_llm.model_path == smollm2_gguf
    cfg = smollm2_llm.model_config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings) == (30, 576, 49152, True)


def test_logits_match_transformers(smollm2_llm, hf_smollm2):
    tok = smollm2_llm.get_tokenizer()
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], tokenize=True)
    bm = smollm2_llm.engine.block_manager
    logits = smollm2_llm.engine.runner.execute([SeqInput(ids, 0, bm.grow_to(99, len(ids)), 0)])
    bm.free(99)
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, ref, atol=2e-3, rtol=1e-3)


def test_greedy_chat_matches_transformers_token_for_token(smollm2_llm, hf_smollm2):
    tok = smollm2_llm.get_tokenizer()
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outs = smollm2_llm.chat(convs, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    for conv, out in zip(convs, outs):
        ids = tok.apply_chat_template(conv, tokenize=True)
        assert out.prompt_token_ids == ids
        x = torch.tensor([ids])
        # Chat prompts contain token 2 (<|im_end|>), transformers' pad id: pass the mask explicitly.
        ref = hf_smollm2.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=40, do_sample=False)
        ref_ids = ref[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == ref_ids
        if ref_ids[-1] == 2:
            assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason is None
        assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_default_model_generates_sensible_text(smollm2_llm):
    out = smollm2_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text
