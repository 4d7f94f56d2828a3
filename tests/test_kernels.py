"""Native CPU kernels (quickdraft/kernels): results against torch references, batch invariance
(a row's or a query's result bit-identical whatever else shares the call), and the engine with
the kernels switched off (oneDNN / float64 torch fallbacks) still exact."""

from __future__ import annotations

import pytest
import torch

from quickdraft import LLM, SamplingParams
from quickdraft.kernels import layer_ops, linear_kernel, paged_attention_kernel
from quickdraft.layers.norm import rms_norm
from quickdraft.layers.rotary import RotaryEmbedding, apply_rotary

needs_kernels = pytest.mark.skipif(linear_kernel() is None or paged_attention_kernel() is None or layer_ops() is None,
                                   reason="native kernels unavailable (no AVX2/FMA CPU or no C compiler)")


@needs_kernels
@pytest.mark.parametrize("K, N, bias", [(576, 960, False), (37, 13, True), (64, 7, True), (64, 40, True)])
def test_linear_matches_torch_and_is_batch_invariant(K, N, bias):
    g = torch.Generator().manual_seed(K + N)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    x = torch.randn(70, K, generator=g)
    packed = linear_kernel()(w)
    linear = lambda rows, w, b: packed(rows, b)  # noqa: E731
    y = linear(x, w, b)
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4 * K ** 0.5)
    for m in (1, 2, 3, 4, 5, 6, 9, 12, 33, 64, 65, 70):  # every row alone equals the same row in a batch
        rows = linear(x[:m], w, b)
        for r in range(m):
            assert torch.equal(rows[r], y[r])
        # the fused residual add is one float32 addition after the product
        residual = torch.randn(m, N, generator=g)
        assert torch.equal(packed(x[:m], b, residual.clone()), residual + y[:m])
    # a strided view of rows gives the same bits as its contiguous copy
    assert torch.equal(linear(x[::2], w, b), linear(x[::2].contiguous(), w, b))
    # the packed panels give back the weight's rows (embedding lookup on tied matrices)
    index = torch.tensor([0, N - 1, N // 2, 0])
    assert torch.equal(packed.rows(index), w[index])


def _reference_attention(q, k_cache, v_cache, pos, table, block_size, scale, window):
    """One query [H, D] in float64: softmax over keys [lo, pos] of its sequence."""
    H, D = q.shape
    G = H // k_cache.shape[1]
    lo = max(0, pos - window + 1) if window else 0
    slots = torch.tensor([table[j // block_size] * block_size + j % block_size for j in range(lo, pos + 1)])
    k = k_cache[slots].double().repeat_interleave(G, dim=1)  # [n, H, D]
    v = v_cache[slots].double().repeat_interleave(G, dim=1)
    s = torch.einsum("hd,nhd->hn", q.double(), k) * scale
    return torch.einsum("hn,nhd->hd", s.softmax(-1), v).reshape(-1)


def _check_attention(q, k_cache, v_cache, pos, seq, tables, bs, scale, window):
    """Run all queries in one call: each must equal the float64 reference and, bit for bit,
    itself computed alone."""
    T, H, D = q.shape
    kernel = paged_attention_kernel()
    out = torch.full((T, H * D), float("nan"))
    kernel(q, k_cache, v_cache, torch.arange(T), pos, seq, tables, bs, scale, window, int(pos.max()) + 1, out)
    for i in range(T):
        ref = _reference_attention(q[i], k_cache, v_cache, int(pos[i]), tables[seq[i]].tolist(), bs, scale, window)
        torch.testing.assert_close(out[i].double(), ref, rtol=1e-5, atol=1e-5)
        alone = torch.full((1, H * D), float("nan"))
        kernel(q[i:i + 1], k_cache, v_cache, torch.tensor([0]), pos[i:i + 1], torch.tensor([0]),
               tables[seq[i]:seq[i] + 1], bs, scale, window, int(pos[i]) + 1, alone)
        assert torch.equal(alone[0], out[i])


@needs_kernels
@pytest.mark.parametrize("window", [0, 5])
def test_paged_attention_matches_reference_and_is_batch_invariant(window):
    g = torch.Generator().manual_seed(window)
    H, Hkv, D, bs = 6, 2, 32, 4
    k_cache = torch.randn(40 * bs, Hkv, D, generator=g)
    v_cache = torch.randn(40 * bs, Hkv, D, generator=g)
    tables = torch.tensor([[7, 3, 11, 0, 25, 2], [1, 9, 4, 30, 0, 0], [5, 6, 8, 10, 12, 13]])
    # queries: two verification runs (3 and 2 tokens) and a decode, in mixed order
    seq = torch.tensor([0, 0, 0, 1, 1, 2])
    pos = torch.tensor([17, 18, 19, 13, 14, 0])
    T = 6
    q = torch.randn(T, H, D, generator=g)
    _check_attention(q, k_cache, v_cache, pos, seq, tables, bs, 0.3, window)


@needs_kernels
@pytest.mark.parametrize("window", [0, 50])
def test_paged_attention_long_runs_match_alone(window):
    """A prompt chunk longer than one work item (16 queries) over more keys than one key block
    (32), with head_dim 64 (the specialised path) beside a decode of another sequence: every
    query equals the reference and, bit for bit, itself computed alone."""
    g = torch.Generator().manual_seed(1 + window)
    H, Hkv, D, bs = 6, 2, 64, 16
    k_cache = torch.randn(12 * bs, Hkv, D, generator=g)
    v_cache = torch.randn(12 * bs, Hkv, D, generator=g)
    tables = torch.tensor([[3, 8, 1, 10, 5, 0], [7, 2, 11, 4, 9, 6]])
    pos = torch.cat([torch.arange(30, 70), torch.tensor([90])])  # 40 prompt queries of seq 0, one decode
    seq = torch.cat([torch.zeros(40, dtype=torch.long), torch.ones(1, dtype=torch.long)])
    T = pos.shape[0]
    q = torch.randn(T, H, D, generator=g)
    _check_attention(q, k_cache, v_cache, pos, seq, tables, bs, 0.125, window)


@needs_kernels
def test_paged_attention_large_batch_matches_alone():
    """Many sequences at once (items then take every head of a sequence): each query equals the
    reference and, bit for bit, itself computed alone (where items take one KV head)."""
    g = torch.Generator().manual_seed(7)
    H, Hkv, D, bs, B = 9, 3, 64, 16, 12
    k_cache = torch.randn(40 * bs, Hkv, D, generator=g)
    v_cache = torch.randn(40 * bs, Hkv, D, generator=g)
    tables = torch.randperm(40, generator=g)[:B * 3].reshape(B, 3)
    seq = torch.cat([torch.arange(B), torch.tensor([0, 0])])  # 12 decodes, then 2 more tokens of seq 0
    pos = torch.cat([torch.randint(0, 40, (B,), generator=g), torch.tensor([41, 42])])
    pos[0] = 40
    order = torch.randperm(seq.shape[0], generator=g)  # runs of one sequence need not be adjacent
    seq, pos = seq[order], pos[order]
    T = seq.shape[0]
    q = torch.randn(T, H, D, generator=g)
    _check_attention(q, k_cache, v_cache, pos, seq, tables, bs, 0.125, 0)


@needs_kernels
def test_layer_ops_match_torch_and_are_row_independent():
    ops = layer_ops()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 100, generator=g) * 3
    w = torch.randn(100, generator=g)
    y = ops.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(y, rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-6)
    assert torch.equal(ops.rms_norm(x[4:5], w, 1e-5)[0], y[4])
    assert torch.equal(ops.rms_norm(x[:, :50], w[:50], 1e-5), ops.rms_norm(x[:, :50].contiguous(), w[:50], 1e-5))

    gu = torch.randn(5, 2 * 37, generator=g) * 6
    out = ops.silu_mul(gu)
    ref = torch.nn.functional.silu(gu[:, :37].double()) * gu[:, 37:].double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(ops.silu_mul(gu[2:3].contiguous())[0], out[2])

    H, Hkv, D = 4, 2, 16
    rot = RotaryEmbedding(D, 64, 10000.0, None, torch.float32, torch.device("cpu"))
    qkv = torch.randn(3, (H + 2 * Hkv) * D, generator=g)
    positions = torch.tensor([5, 0, 63])
    slots = torch.tensor([7, 2, 11])
    kv_cache = torch.zeros(2, 12, Hkv, D)
    rotated = qkv.clone()
    ops.rope_cache(rotated, H, Hkv, D, rot.cos, rot.sin, positions, slots, kv_cache)
    cos, sin = rot.tables(positions)
    heads = qkv.view(3, H + 2 * Hkv, D)
    expect_q = apply_rotary(heads[:, :H], cos, sin)
    expect_k = apply_rotary(heads[:, H:H + Hkv], cos, sin)
    got = rotated.view(3, H + 2 * Hkv, D)
    assert torch.equal(got[:, :H], expect_q) and torch.equal(got[:, H:H + Hkv], expect_k)  # same bits as torch
    assert torch.equal(got[:, H + Hkv:], heads[:, H + Hkv:])  # values untouched
    assert torch.equal(kv_cache[0][slots], expect_k) and torch.equal(kv_cache[1][slots], heads[:, H + Hkv:])


def _without_native_kernels(monkeypatch) -> None:
    import quickdraft.layers.linear as linear
    import quickdraft.models.llama as llama

    monkeypatch.setattr(linear, "linear_kernel", lambda: None)
    monkeypatch.setattr(llama, "layer_ops", lambda: None)


def test_fallback_kernels_keep_speculation_exact(tiny_checkpoint, monkeypatch):
    """With the native kernels off (no compiler), oneDNN and float64 attention take over: the
    engine still matches transformers and greedy speculation still equals plain decoding."""
    from test_models import hf_greedy, hf_model
    from test_spec_decode import repetitive_prompts

    _without_native_kernels(monkeypatch)
    path = str(tiny_checkpoint("llama"))
    plain = LLM(path, dtype="float32", device="cpu", max_model_len=256)
    assert not plain.engine.runner.native and plain.engine.runner.model.native_decoder is None
    assert all(lin.native is None for lin in (plain.engine.runner.model.layers[0].qkv_proj,
                                              plain.engine.runner.model.lm_head))
    prompts = repetitive_prompts(16, seed=3)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in prompts]
    expected = [o.outputs[0].token_ids for o in plain.generate(requests, sp, use_tqdm=False)]
    hf = hf_model(path)
    assert expected == [hf_greedy(hf, p, 24) for p in prompts]
    spec = LLM(path, dtype="float32", device="cpu", max_model_len=256,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1})
    outs = spec.generate(requests, sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert sum(o.metrics.num_draft_tokens for o in outs) > 0
    assert sum(o.metrics.num_accepted_tokens for o in outs) > 0


def test_build_falls_back_cleanly_when_compiling_fails(tmp_path, monkeypatch, caplog):
    """A broken compiler means torch's kernels, with a warning, not an error."""
    import quickdraft.kernels as kernels

    monkeypatch.setenv("QUICKDRAFT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    with caplog.at_level("WARNING", logger="quickdraft"):
        assert kernels._build() is None
    assert "Could not compile the native kernels" in caplog.text
    assert not list((tmp_path / "kernels").glob("*.so"))  # no partial library left behind


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_weights_give_the_float32_kernels_bits(dtype):
    """float16/bfloat16 panels are widened exactly in registers: the same bits as the float32
    kernel on the widened weight, alone and in every batch size."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 96, generator=g).to(dtype)
    x = torch.randn(20, 96, generator=g)
    packed = linear_kernel()(w)
    want = linear_kernel()(w.float())(x, None)
    assert packed.packed.dtype == dtype and torch.equal(packed(x, None), want)
    assert all(torch.equal(packed(x[:m], None), want[:m]) for m in range(1, 21))
    assert torch.equal(packed.rows(torch.tensor([0, 36, 17])), w.float()[[0, 36, 17]])
