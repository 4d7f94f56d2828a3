"""The engine on quantized weights: GGUF blocks as stored (the default) and float checkpoints
quantized at load, against the dequantized float32 path and transformers.

Kernel-level bit equality is tested in test_quantized.py and exactness under speculation on the
real model in test_exactness.py; this file checks selection, quality and the tiny models.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quickdraft import LLM, SamplingParams
from quickdraft.engine.model_runner import SeqInput
from quickdraft.kernels import quant_isas

needs_kernels = pytest.mark.skipif(not quant_isas(), reason="native kernels unavailable (no compiler or no AVX2)")

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about autumn.", "Explain photosynthesis simply.",
    "Give me three tips for learning to code.", "What is 17 times 23?", "Describe a cat to a child.",
    "Write a Python function that reverses a string.", "Why is the sky blue?", "Name five fruits.",
    "What does a compiler do?", "Summarize the plot of Cinderella.", "How do vaccines work?",
    "Translate 'good morning' into Spanish and French.", "What is a prime number?",
    "Write a short poem about the sea.", "List the planets of the solar system.",
    "What causes rain?", "Give a recipe for pancakes.", "What is machine learning?",
    "Tell me a fun fact about octopuses.", "How do I make a cup of tea?", "What is gravity?",
]


def _logits(llm: LLM, ids: list[int], first: int) -> torch.Tensor:
    bm = llm.engine.block_manager
    try:
        return llm.engine.runner.execute([SeqInput(ids, 0, bm.grow_to(10**6, len(ids)), first)])
    finally:
        bm.free(10**6)


@needs_kernels
def test_default_runs_the_gguf_blocks_as_stored(smollm2_quantized):
    model = smollm2_quantized.engine.runner.model
    assert model.native_decoder is not None
    isa = quant_isas()[0]
    assert model.layers[0].qkv_proj.kernel == f"native-U4H-{isa}"  # Q4_1 as stored
    assert model.lm_head.kernel == f"native-S8H-{isa}"  # the Q8_0 embedding, tied
    assert model.embed_tokens.numel() == 0 and model.embed_quant is not None


@needs_kernels
def test_quality_against_the_dequantized_path(smollm2_quantized, smollm2_llm):
    """Teacher-forced over 22 chat prompts x 64 tokens (the dequantized model's greedy
    continuation): the quantized path's top-1 agrees on >= 97% of positions and the mean
    KL(dequantized || quantized) is below 0.01 nats.

    The two paths share the weights bit for bit; they differ only in the int8 activation blocks
    (a rounding error of at most dx / 2 = max|x| / 254 per value). llama.cpp computes with the same
    Q8 activation blocks, and its own quality scale for 8-bit blocks (a Q8_0 model against F16,
    weights quantized too) is a mean KL of about 1e-3 on models of this size; 0.01 is ten times
    that, the same error source, to keep the test stable (measured: 97.7% and 2.7e-3, the same
    on every instruction set, whose bits agree)."""
    tok = smollm2_llm.get_tokenizer()
    agree = total = 0
    kls = []
    for q in QUESTIONS:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True)
        cont = smollm2_llm.generate({"prompt_token_ids": prompt},
                                    SamplingParams(temperature=0, max_tokens=64, ignore_eos=True),
                                    use_tqdm=False)[0].outputs[0].token_ids
        ids = prompt + cont[:-1]
        ref = _logits(smollm2_llm, ids, len(prompt) - 1).double()
        got = _logits(smollm2_quantized, ids, len(prompt) - 1).double()
        assert ref.shape == got.shape == (64, 49152)
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += 64
        lp, lq = ref.log_softmax(-1), got.log_softmax(-1)
        kls.append((lp.exp() * (lp - lq)).sum(-1))
    kl = torch.cat(kls).mean().item()
    print(f"top-1 agreement {agree / total:.4f}, mean KL {kl:.2e}")
    assert agree / total >= 0.97, (agree, total)
    assert kl < 0.01, kl


def test_quantization_argument_is_checked(smollm2_gguf, tiny_checkpoint):
    path = str(tiny_checkpoint("llama"))
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(path, device="cpu", quantization="q3_k")
    with pytest.raises(ValueError, match="needs a .gguf model file"):
        LLM(path, device="cpu", quantization="gguf")
    with pytest.raises(ValueError, match="runs as stored"):
        LLM(str(smollm2_gguf), device="cpu", quantization="q8_0")
    with pytest.raises(ValueError, match="dtype=bfloat16"):
        LLM(str(smollm2_gguf), device="cpu", dtype="bfloat16", quantization="gguf")
    # auto: float checkpoints stay float, bfloat16 runs dequantized
    assert LLM(path, device="cpu", max_model_len=64).config.quantization is None
    bf16 = LLM(str(smollm2_gguf), device="cpu", dtype="bfloat16", max_model_len=64)
    assert bf16.config.quantization is None and bf16.engine.runner.model.layers[0].qkv_proj.weight.numel() > 0


@needs_kernels
@pytest.mark.parametrize("method", ["q8_0", "q4_0"])
def test_float_checkpoint_quantized_at_load(tiny_checkpoint, monkeypatch, method):
    """quantization='q8_0' / 'q4_0' on a float checkpoint: every linear (LM head included) on
    the integer kernels; logits equal (to float rounding in attention and norms) to the torch
    path on the same quantized weights (layers/quantization.py's reference, torch attention),
    and close to transformers' model with the quantized weights dequantized (what remains is
    the int8 activation blocks' rounding, a few percent in a random 2-layer model); greedy with
    n-gram and with a draft model equal to plain decoding, with drafts accepted."""
    import transformers
    from test_spec_decode import repetitive_prompts

    path = str(tiny_checkpoint("llama"))
    plain = LLM(path, device="cpu", max_model_len=256, quantization=method)
    model = plain.engine.runner.model
    fmt = "S8H" if method == "q8_0" else "U4H"
    assert model.native_decoder is not None and model.lm_head.kernel.startswith(f"native-{fmt}")
    assert all(lin.kernel.startswith(f"native-{fmt}") for lin in model._linears())
    from quickdraft.layers.quantization import quantize_weight

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in hf.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(quantize_weight(module.weight, method).dequantize())
    prompts = repetitive_prompts(12, seed=5)
    got = _logits(plain, prompts[0], 0)
    with torch.no_grad():
        ref = hf(torch.tensor([prompts[0]])).logits[0]
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < 0.06, err
    import quickdraft.layers.linear as linear_mod
    import quickdraft.models.llama as llama_mod

    with monkeypatch.context() as m:
        m.setattr(linear_mod, "quant_linear_kernel", lambda: None)
        m.setattr(llama_mod, "layer_ops", lambda: None)
        torch_path = LLM(path, device="cpu", max_model_len=256, quantization=method)
    assert torch_path.engine.runner.model.lm_head.kernel == "torch-quantized"
    assert torch_path.engine.runner.model.native_decoder is None
    torch.testing.assert_close(_logits(torch_path, prompts[0], 0), got, rtol=1e-4, atol=1e-4)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    reqs = [{"prompt_token_ids": p} for p in prompts]
    want = [o.outputs[0].token_ids for o in plain.generate(reqs, sp, use_tqdm=False)]
    for spec in ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1},
                 {"model": path, "num_speculative_tokens": 3, "draft_length_policy": "fixed"}):
        llm = LLM(path, device="cpu", max_model_len=256, quantization=method, speculative_config=spec)
        outs = llm.generate(reqs, sp, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == want
        assert sum(o.metrics.num_accepted_tokens for o in outs) > 0
        alone = [llm.generate(r, sp, use_tqdm=False)[0].outputs[0].token_ids for r in reqs[:3]]
        assert alone == want[:3]


@needs_kernels
@pytest.mark.parametrize("variant", ["mixed", "quantized", "16-bit"])
def test_tiny_gguf_blocks_as_stored(tmp_path, tiny_checkpoint, monkeypatch, variant):
    """Tiny GGUFs: with Q/K/V (and gate/up) in different block types, as Q4_K_M files have, the
    fused matrix runs each part as stored, side by side, and the rest as stored too; with uniform types (Q/K rows
    permuted by llama.cpp's converter) everything runs as stored, float16/bfloat16 matrices too
    (widened in registers). Logits equal the torch path on the same stored weights (to float
    rounding; exactly the dequantized path's where only 16-bit matrices differ), stay near the
    dequantized path (the file's weights are unscaled N(0, 1) draws: activations are large and
    the int8 rounding shows more than in a trained model), and greedy n-gram speculation equals
    plain decoding."""
    from gguf import GGMLQuantizationType as QT
    from test_gguf_loader import _tiny_model

    qtypes = {"mixed": {},
              "quantized": {"attn_q": QT.Q4_0, "attn_k": QT.Q4_0, "attn_v": QT.Q4_0, "ffn_gate": QT.Q5_0,
                            "ffn_up": QT.Q5_0},
              "16-bit": {"attn_q": QT.F16, "attn_k": QT.F16, "attn_v": QT.F16, "ffn_gate": QT.BF16,
                         "ffn_up": QT.BF16, "attn_output": QT.F16, "ffn_down": QT.BF16, "token_embd": QT.F16}}[variant]
    path, _ = _tiny_model(tmp_path, "llama", qtypes=qtypes)
    kw = dict(device="cpu", max_model_len=256, tokenizer=str(tiny_checkpoint("llama")))
    llm = LLM(str(path), **kw)
    deq = LLM(str(path), quantization=None, **kw)
    layer = llm.engine.runner.model.layers[0]
    isa = quant_isas()[0]
    if variant != "16-bit":
        assert layer.o_proj.kernel == f"native-U8F-{isa}" and layer.down_proj.kernel == f"native-U8F16-{isa}"
        assert llm.engine.runner.model.lm_head.kernel == f"native-S8H-{isa}"
    if variant == "mixed":  # each part as stored, side by side
        assert layer.qkv_proj.kernel == f"native-f16+bf16+U4H-{isa}"
        assert layer.gate_up_proj.kernel == f"native-U4H+S8H-{isa}"
    elif variant == "quantized":
        assert layer.qkv_proj.kernel == f"native-U4H-{isa}" and layer.gate_up_proj.kernel == f"native-U8F-{isa}"
    else:
        assert layer.qkv_proj.kernel == layer.o_proj.kernel == llm.engine.runner.model.lm_head.kernel == "native-f16"
        assert layer.gate_up_proj.kernel == layer.down_proj.kernel == "native-bf16"
        assert deq.engine.runner.model.layers[0].qkv_proj.kernel == "native-f32"
    ids = [(i * 7) % 90 + 3 for i in range(50)]
    a, b = _logits(llm, ids, 0), _logits(deq, ids, 0)
    if variant == "16-bit":
        assert torch.equal(a, b)
    else:
        assert ((a - b).norm() / b.norm()).item() < 0.2
        import quickdraft.layers.linear as linear_mod
        import quickdraft.models.llama as llama_mod

        with monkeypatch.context() as m:
            m.setattr(linear_mod, "quant_linear_kernel", lambda: None)
            m.setattr(llama_mod, "layer_ops", lambda: None)
            torch_path = LLM(str(path), **kw)
        assert torch_path.engine.runner.model.layers[0].o_proj.kernel == "torch-quantized"
        if variant == "mixed":
            assert torch_path.engine.runner.model.layers[0].qkv_proj.kernel == "torch-parts"
        # Float rounding in attention can move an activation across an int8 rounding boundary,
        # which these unscaled weights amplify: nearly every logit agrees to 1e-3.
        close = torch.isclose(_logits(torch_path, ids, 0), a, rtol=1e-4, atol=1e-3)
        assert close.float().mean().item() > 0.95
    spec = LLM(str(path), speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                              "prompt_lookup_min": 1}, **kw)
    prompts = [{"prompt_token_ids": ([7, 8, 9, 10, 11] * 6)[: 10 + i]} for i in range(6)]
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = spec.generate(prompts, sp, use_tqdm=False)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in outs] == want
    assert np.sum([o.metrics.num_draft_tokens for o in outs]) > 0


def test_bfloat16_checkpoint_runs_16_bit_with_the_float32_bits(tiny_checkpoint, tmp_path):
    """A bfloat16 checkpoint in a float32 model keeps its linear weights 16-bit (half the bytes
    per token): logits bit-identical to the same values stored as float32."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_checkpoint("llama")
    weights = load_file(str(src / "model.safetensors"))
    for name, dtype in (("bf16", torch.bfloat16), ("f32", torch.float32)):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        save_file({k: v.to(torch.bfloat16).to(dtype) for k, v in weights.items()}, str(dst / "model.safetensors"))
    half = LLM(str(tmp_path / "bf16"), device="cpu", max_model_len=128)
    full = LLM(str(tmp_path / "f32"), device="cpu", max_model_len=128)
    native = half.engine.runner.model.layers[0].qkv_proj.kernel == "native-bf16"
    if quant_isas():
        assert native and full.engine.runner.model.layers[0].qkv_proj.kernel == "native-f32"
    ids = [(i * 5) % 300 + 3 for i in range(40)]
    assert torch.equal(_logits(half, ids, 0), _logits(full, ids, 0))
