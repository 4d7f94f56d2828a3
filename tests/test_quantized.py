"""Block-quantized weights and the integer kernels, against independent oracles.

* A plain numpy reference of the same integer arithmetic (written here, from the contract in
  layers/quantization.py: int8 activation blocks, exact int64 dot products per sub-block, float32
  scales applied in a fixed order): the torch reference and every native instruction-set variant
  this CPU has must equal it bit for bit, for every GGUF block type, alone and in batches of
  1..70 rows. Mutating a packed scale, or the nibble order, must make them differ.
* ggml's reference quantizers (the `gguf` package) for quantization="q8_0" / "q4_0".
* Blocks split from GGUF bytes dequantize to the `gguf` package's values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from quickdraft.kernels import default_quant_isa, quant_isas, quant_linear_kernel  # noqa: E402
from quickdraft.layers import quantization as qz  # noqa: E402
from quickdraft.models import gguf_loader as gl  # noqa: E402

ISAS = quant_isas()
# Every variant this CPU runs, plus the VNNI code path with dpbusd emulated on AVX2 (so that its
# accumulation is checked on CPUs without VNNI too).
TESTED_ISAS = ISAS + ["vnniemu"] if ISAS else []
needs_kernels = pytest.mark.skipif(not ISAS, reason="native kernels unavailable (no compiler or no AVX2)")
BLOCK_TYPES = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K]
EXPECTED_FORMAT = {QT.Q8_0: qz.FMT_S8H, QT.Q4_0: qz.FMT_U4H, QT.Q4_1: qz.FMT_U4H, QT.Q5_0: qz.FMT_U8F,
                   QT.Q5_1: qz.FMT_U8F, QT.Q4_K: qz.FMT_U4F, QT.Q5_K: qz.FMT_U8F, QT.Q6_K: qz.FMT_U8F16}
F16_OFFSETS = {QT.Q8_0: [0], QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2],
               QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208]}


def random_blocks(qtype: QT, rows: int, cols: int, seed: int) -> np.ndarray:
    """Raw GGUF bytes [rows, row bytes]: arbitrary quants and 6-bit scales, sane float16 scales."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * cols // block, type_size), dtype=np.uint8)
    for off in F16_OFFSETS[qtype]:
        scales = rng.uniform(-0.05, 0.05, raw.shape[0]).astype(np.float16)
        scales[:2] = 0.0
        raw[:, off:off + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def activations(M: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4
    x[0, :32] = 0.0  # an all-zero block (scale 0)
    if M > 2:
        x[2, 5] = 3e4  # one huge value: the rest of its block rounds to 0
        x[1, 40:72] = -0.5  # a constant block
    return x


def numpy_reference(x: torch.Tensor, w: qz.QuantizedWeight) -> np.ndarray:
    """The contract, computed independently: float32 numpy for the float steps, int64 sums."""
    xs = x.numpy().astype(np.float32)
    M, K = xs.shape
    xb = xs.reshape(M, K // 32, 32)
    dx = (np.abs(xb).max(axis=-1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(dx != 0, np.float32(1) / dx, np.float32(0)).astype(np.float32)
    xq = np.rint(xb * inv[..., None]).astype(np.int64).reshape(M, K)
    q = w.q.numpy().astype(np.int64)
    d = w.d.numpy().astype(np.float32)
    off = w.offset
    m = None if off is None else off.numpy().astype(np.float32)
    bs = w.bs
    acc = np.zeros((M, q.shape[0]), dtype=np.float32)
    for j in range(K // bs):
        cols = slice(j * bs, (j + 1) * bs)
        isum = (xq[:, cols] @ q[:, cols].T).astype(np.float32)  # exact: |isum| < 2^24
        b = j * bs // 32
        acc = (acc + isum * (d[None, :, j] * dx[:, None, b])).astype(np.float32)
        if m is not None:
            sx = (dx[:, b] * xq[:, cols].sum(axis=1).astype(np.float32)).astype(np.float32)
            acc = (acc + m[None, :, j] * sx[:, None]).astype(np.float32)
    return acc


def bits(t) -> np.ndarray:
    a = t.numpy() if isinstance(t, torch.Tensor) else t
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_split_blocks_dequantize_to_ggml_values(qtype):
    raw = random_blocks(qtype, 12, 512, seed=int(qtype))
    w = gl.split_blocks(torch.from_numpy(raw), int(qtype))
    assert w.shape == (12, 512)
    np.testing.assert_array_equal(bits(w.dequantize()), bits(gguf.quants.dequantize(raw, qtype)))
    assert qz.kernel_format(w) == EXPECTED_FORMAT[qtype]


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_torch_reference_equals_the_numpy_contract(qtype):
    w = gl.split_blocks(torch.from_numpy(random_blocks(qtype, 21, 512, seed=7)), int(qtype))
    x = activations(9, 512, seed=1)
    got = qz.quantized_linear_reference(x, w)
    np.testing.assert_array_equal(bits(got), bits(numpy_reference(x, w)))
    # and it is a good approximation of the float product
    exact = x @ w.dequantize().T
    assert ((got - exact).norm() / exact.norm()).item() < 0.02


@needs_kernels
@pytest.mark.parametrize("isa", TESTED_ISAS)
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_native_kernel_bit_equal_to_reference_and_batch_invariant(qtype, isa):
    N, K = 8 * 5 + 3, 512  # a partial last panel
    w = gl.split_blocks(torch.from_numpy(random_blocks(qtype, N, K, seed=int(qtype) + 50)), int(qtype))
    lin = quant_linear_kernel(isa)(w)
    assert lin.fmt == EXPECTED_FORMAT[qtype]
    x = activations(70, K, seed=2)
    want = numpy_reference(x, w)
    full = lin(x, None)
    np.testing.assert_array_equal(bits(full), bits(want))
    for M in range(1, 71):  # every row equals the row computed with any number of others
        assert torch.equal(lin(x[:M], None), full[:M]), M
    for i in (0, 3, 69):
        assert torch.equal(lin(x[i:i + 1], None)[0], full[i])
    bias, res = torch.randn(N), torch.randn(70, N)
    out = lin(x, bias, residual=res.clone())
    assert torch.equal(out, res + (full + bias))


# Bits of packed weight per weight, by kernel format (panel padding aside): what a decode step
# reads, against the file's 8.5 (Q8_0), 4.5 (Q4_0), 5 (Q4_1), 5.5 / 6 (Q5_0 / Q5_1), 4.5 (Q4_K),
# 5.5 (Q5_K) and 6.5625 (Q6_K).
PACKED_BITS = {qz.FMT_S8H: 8.5, qz.FMT_U4H: 5.0, qz.FMT_U4F: 6.0, qz.FMT_U8F: 10.0, qz.FMT_U8F16: 12.0}


@needs_kernels
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_packed_bytes_per_weight(qtype):
    N, K = 16, 512
    w = gl.split_blocks(torch.from_numpy(random_blocks(qtype, N, K, seed=31)), int(qtype))
    lin = quant_linear_kernel()(w)
    assert lin.packed.numel() * 8 / (N * K) == PACKED_BITS[lin.fmt]


@needs_kernels
@pytest.mark.parametrize("isa", TESTED_ISAS)
def test_parts_in_different_formats_run_side_by_side_bit_exact(isa):
    """A fused weight whose row blocks are stored as Q4_K, Q6_K and float16 (Q4_K_M files keep
    V in Q6_K beside Q/K in Q4_K): each part's columns are its own kernel's, bit for bit the
    numpy reference (the float16 part: the float kernel's), bias included, in every batch size."""
    from quickdraft.kernels import PackedParts, linear_kernel

    K = 512
    q = gl.split_blocks(torch.from_numpy(random_blocks(QT.Q4_K, 8 * 3 + 5, K, seed=21)), int(QT.Q4_K))
    v = gl.split_blocks(torch.from_numpy(random_blocks(QT.Q6_K, 16, K, seed=22)), int(QT.Q6_K))
    h = torch.randn(11, K, generator=torch.Generator().manual_seed(23)).half()
    parts = PackedParts([quant_linear_kernel(isa)(q), quant_linear_kernel(isa)(v), linear_kernel()(h)])
    x = activations(70, K, seed=24)
    bias = torch.randn(parts.out_features, generator=torch.Generator().manual_seed(25))
    want = torch.cat([torch.from_numpy(numpy_reference(x, q)), torch.from_numpy(numpy_reference(x, v)),
                      linear_kernel()(h.float())(x, None)], dim=1) + bias
    full = parts(x, bias)
    np.testing.assert_array_equal(bits(full), bits(want))
    for M in range(1, 71):
        assert torch.equal(parts(x[:M], bias), full[:M]), M


@needs_kernels
def test_every_instruction_set_gives_the_same_bits():
    w = gl.split_blocks(torch.from_numpy(random_blocks(QT.Q4_1, 40, 576, seed=3)), int(QT.Q4_1))
    x = activations(7, 576, seed=4)
    outs = [quant_linear_kernel(isa)(w)(x, None) for isa in TESTED_ISAS]
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert default_quant_isa() == ISAS[0] and "avx2" in ISAS


@needs_kernels
def test_native_activation_quantization_equals_reference():
    lin = quant_linear_kernel()(qz.quantize_weight(torch.randn(8, 256), "q8_0"))
    x = activations(33, 256, seed=5)
    for got, want in zip(lin.quantize(x), qz.quantize_activations(x)):
        assert torch.equal(got, want)


@needs_kernels
@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_1, QT.Q6_K], ids=lambda t: t.name)
def test_mutated_scale_or_nibble_order_is_detected(qtype):
    """The bit-equality checks above are sharp: one changed scale in the packed weight, or the
    two halves of every block's quants swapped, changes the output."""
    N, K = 16, 256
    w = gl.split_blocks(torch.from_numpy(random_blocks(qtype, N, K, seed=9)), int(qtype))
    x = activations(4, K, seed=6)
    want = numpy_reference(x, w)
    lin = quant_linear_kernel()(w)
    np.testing.assert_array_equal(bits(lin(x, None)), bits(want))
    lin.packed[1, 2, 1] ^= 0x10  # a bit of row 8 + 0's scale (float16 high byte / float32 byte 1), block 2
    assert not np.array_equal(bits(lin(x, None)), bits(want))
    swapped = qz.QuantizedWeight(w.q.view(N, K // 32, 2, 16).flip(2).reshape(N, K).contiguous(), w.d, w.m, w.bs,
                                 w.source, w.zero)
    assert not np.array_equal(bits(quant_linear_kernel()(swapped)(x, None)), bits(want))


@pytest.mark.parametrize("method,qtype", [("q8_0", QT.Q8_0), ("q4_0", QT.Q4_0)])
def test_quantize_weight_matches_ggml_reference_quantizer(method, qtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((24, 256)) * rng.uniform(0.01, 2, (24, 1))).astype(np.float32)
    x[0] = 0.0
    w = qz.quantize_weight(torch.from_numpy(x), method)
    expected = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)
    np.testing.assert_array_equal(bits(w.dequantize()), bits(expected))


@needs_kernels
def test_embedding_rows_from_packed_weight():
    raw = random_blocks(QT.Q8_0, 37, 256, seed=11)
    w = gl.split_blocks(torch.from_numpy(raw), int(QT.Q8_0))
    lin = quant_linear_kernel()(w)
    idx = torch.tensor([0, 36, 8, 9, 8])
    np.testing.assert_array_equal(bits(lin.rows(idx)), bits(gguf.quants.dequantize(raw, QT.Q8_0)[idx.numpy()]))


def test_bad_layouts_are_rejected():
    with pytest.raises(ValueError, match="divisible by 32"):
        qz.quantize_weight(torch.randn(4, 48), "q8_0")
    with pytest.raises(ValueError, match="quantization must be one of"):
        qz.quantize_weight(torch.randn(4, 64), "q3_k")
    a = qz.quantize_weight(torch.randn(4, 64), "q8_0")
    b = qz.quantize_weight(torch.randn(4, 64), "q4_0")
    with pytest.raises(ValueError, match="cannot fuse"):
        qz.QuantizedWeight.cat([a, b])
