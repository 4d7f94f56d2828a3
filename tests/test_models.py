"""Logits and greedy sequences against transformers on the same weights (the oracle)."""

from __future__ import annotations

import pytest
import torch
import transformers

from quickdraft import LLM, SamplingParams
from quickdraft.engine.model_runner import SeqInput
from tiny_models import ARCH_CONFIGS

ARCHS = list(ARCH_CONFIGS)
# Ragged prompts; the first is longer than Mistral's sliding window (24) and than the
# short-query threshold, so both attention paths and the window mask are exercised.
PROMPTS = [
    [5, 17, 33, 99, 120, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21] * 2,
    [3, 4, 5],
    [200, 201, 202, 203, 204, 205, 206],
    [42],
]


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_match_transformers(tiny_checkpoint, arch):
    folder = tiny_checkpoint(arch)
    llm = LLM(str(folder), dtype="float32", device="cpu", max_model_len=128)
    runner = llm.engine.runner
    bm = llm.engine.block_manager
    # All prompts in one ragged forward, every position's logits returned.
    inputs = []
    for i, p in enumerate(PROMPTS):
        table = bm.grow_to(1000 + i, len(p))
        inputs.append(SeqInput(p, 0, table, 0))
    logits = runner.execute(inputs)
    for i in range(len(PROMPTS)):
        bm.free(1000 + i)
    ref_model = hf_model(folder)
    start = 0
    for p in PROMPTS:
        with torch.no_grad():
            ref = ref_model(torch.tensor([p])).logits[0]
        torch.testing.assert_close(logits[start:start + len(p)], ref, atol=2e-4, rtol=1e-4)
        start += len(p)
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_ragged_batch(tiny_checkpoint, arch):
    folder = tiny_checkpoint(arch, shard=(arch == "llama"))
    llm = LLM(str(folder), dtype="float32", device="cpu", max_model_len=128)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    ref_model = hf_model(folder)
    for p, out in zip(PROMPTS, outs):
        assert out.prompt_token_ids == p
        assert out.outputs[0].token_ids == hf_greedy(ref_model, p, 24)
        assert out.outputs[0].finish_reason == "length"


def test_sharded_checkpoint_loads_every_shard(tiny_checkpoint):
    folder = tiny_checkpoint("llama", shard=True)
    assert len(list(folder.glob("*.safetensors"))) > 1
    assert (folder / "model.safetensors.index.json").is_file()
    llm = LLM(str(folder), dtype="float32", device="cpu", max_model_len=64)
    bm = llm.engine.block_manager
    logits = llm.engine.runner.execute([SeqInput(PROMPTS[0], 0, bm.grow_to(5, len(PROMPTS[0])), 0)])
    bm.free(5)
    with torch.no_grad():
        ref = hf_model(folder)(torch.tensor([PROMPTS[0]])).logits[0]
    torch.testing.assert_close(logits, ref, atol=2e-4, rtol=1e-4)


def test_transformers5_rope_parameters_config(tiny_checkpoint, tmp_path):
    """A config that only has transformers-5 `rope_parameters` (no rope_theta) loads the same."""
    import json
    import shutil

    src = tiny_checkpoint("llama3_tied")
    dst = tmp_path / "ropeparams"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    theta = cfg.pop("rope_theta", None) or cfg["rope_parameters"]["rope_theta"]
    scaling = cfg.pop("rope_scaling", None) or {k: v for k, v in cfg["rope_parameters"].items() if k != "rope_theta"}
    cfg["rope_parameters"] = dict(scaling, rope_theta=theta)
    (dst / "config.json").write_text(json.dumps(cfg))
    from quickdraft.models.model_config import ModelConfig
    mc = ModelConfig.from_hf_config(cfg)
    assert mc.rope_theta == 500000.0 and mc.rope_scaling["rope_type"] == "llama3"
    a = LLM(str(dst), dtype="float32", device="cpu", max_model_len=64)
    out = a.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                     use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(hf_model(src), PROMPTS[0], 8)


def test_unsupported_architecture_is_named(tiny_checkpoint, tmp_path):
    import json
    import shutil

    dst = tmp_path / "gpt2ish"
    shutil.copytree(tiny_checkpoint("llama"), dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM.*Supported architectures.*LlamaForCausalLM"):
        LLM(str(dst), device="cpu")


def test_bfloat16_runs_close_to_float32(tiny_checkpoint):
    folder = tiny_checkpoint("qwen2")
    ref = hf_model(folder)
    llm = LLM(str(folder), dtype="bfloat16", device="cpu", max_model_len=64)
    assert llm.engine.runner.model.embed_tokens.dtype == torch.bfloat16
    bm = llm.engine.block_manager
    p = PROMPTS[0]
    logits = llm.engine.runner.execute([SeqInput(p, 0, bm.grow_to(7, len(p)), 0)])
    bm.free(7)
    with torch.no_grad():
        expect = ref(torch.tensor([p])).logits[0]
    assert logits.dtype == torch.float32
    assert (logits - expect).abs().max() < 0.25 * expect.abs().max()
