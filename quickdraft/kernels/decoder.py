"""One native call for the whole decoder stack of a step (``decoder.c``), on CPU with float32
activations and float32 or block-quantized linears.

The per-layer pointers (packed weights, norms, the layer's KV cache) are gathered once; a step
passes its metadata and scratch buffers. Same kernels, in the same order, as the per-call path.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

from quickdraft.kernels import native_library

if TYPE_CHECKING:
    from quickdraft.layers.attention import NativeQueries
    from quickdraft.models.llama import DecoderLayer

_p = ctypes.c_void_p
_i = ctypes.c_int64


MAX_PARTS = 4  # QD_MAX_PARTS in decoder.c


class _Part(ctypes.Structure):
    _fields_ = [("w", _p), ("fn", _p), ("fmt", _i), ("rows", _i)]


class _Lin(ctypes.Structure):
    _fields_ = [("bias", _p), ("num_parts", _i), ("parts", _Part * MAX_PARTS)]


class _Layer(ctypes.Structure):
    _fields_ = [*[(name, _p) for name in ("input_norm", "post_norm", "q_norm", "k_norm")],
                *[(name, _Lin) for name in ("qkv", "o", "gate_up", "down")],
                ("k_cache", _p), ("v_cache", _p)]


class _Dims(ctypes.Structure):
    _fields_ = [("hidden", _i), ("heads", _i), ("kv_heads", _i), ("head_dim", _i), ("intermediate", _i),
                ("window", _i), ("block_size", _i), ("eps", ctypes.c_float), ("scale", ctypes.c_float)]


class _Step(ctypes.Structure):
    _fields_ = [("T", _i), ("positions", _p), ("slot_mapping", _p), ("query_token", _p), ("query_pos", _p),
                ("query_seq", _p), ("num_queries", _i), ("block_tables", _p), ("max_blocks", _i),
                ("max_context", _i), ("cos", _p), ("sin", _p), ("h", _p), ("qkv", _p), ("attn", _p),
                ("gate_up", _p), ("act", _p), ("xq", _p), ("xd", _p), ("xs32", _p), ("xs16", _p)]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class NativeDecoder:
    """Runs ``layers`` over a step's hidden states in one call; x [T, hidden] is updated in place."""

    def __init__(self, layers: list[DecoderLayer], hidden: int, intermediate: int, eps: float) -> None:
        lib = native_library()
        assert lib is not None
        self._fn = lib.qd_decoder
        self._fn.argtypes = [_p, ctypes.POINTER(_Layer), _i, ctypes.POINTER(_Dims), ctypes.POINTER(_Step), ctypes.c_int]
        self._fn.restype = None
        self.layers = layers
        first = layers[0]
        self.dims = _Dims(hidden=hidden, heads=first.n_heads, kv_heads=first.n_kv, head_dim=first.head_dim,
                          intermediate=intermediate, window=0, block_size=0, eps=eps, scale=first.scale)
        self.hidden, self.intermediate = hidden, intermediate
        self._table: ctypes.Array | None = None
        self._caches: list[int] = []

    def _layer_table(self, kv_caches: list[torch.Tensor]) -> ctypes.Array:
        ptrs = [c.data_ptr() for c in kv_caches]
        if self._table is None or ptrs != self._caches:
            table = (_Layer * len(self.layers))()
            for entry, layer, cache in zip(table, self.layers, kv_caches):
                assert cache.is_contiguous()
                entry.input_norm, entry.post_norm = _ptr(layer.input_layernorm), _ptr(layer.post_attention_layernorm)
                entry.q_norm, entry.k_norm = _ptr(layer.q_norm), _ptr(layer.k_norm)
                for name in ("qkv", "o", "gate_up", "down"):
                    lin = getattr(layer, f"{name}_proj")
                    desc = getattr(entry, name)
                    desc.bias = _ptr(lin.bias)
                    parts = lin.native_parts.parts if lin.native_parts is not None else [lin.native_q or lin.native]
                    assert len(parts) <= MAX_PARTS
                    desc.num_parts = len(parts)
                    for part, packed in zip(desc.parts, parts):
                        part.w, part.fn, part.rows = packed.packed.data_ptr(), packed.fn_address, packed.out_features
                        part.fmt = getattr(packed, "fmt", 0)  # a float PackedLinear: 0
                entry.k_cache, entry.v_cache = cache[0].data_ptr(), cache[1].data_ptr()
            self._table, self._caches = table, ptrs
        return self._table

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                 queries: NativeQueries, cos: torch.Tensor, sin: torch.Tensor,
                 kv_caches: list[torch.Tensor]) -> torch.Tensor:
        T = x.shape[0]
        first = self.layers[0]
        x = x.contiguous()
        h = torch.empty(T, self.hidden)
        qkv = torch.empty(T, first.q_size + 2 * first.kv_size)
        attn = torch.empty(T, first.q_size)
        gate_up = torch.empty(T, 2 * self.intermediate)
        act = torch.empty(T, self.intermediate)
        max_k = max(self.hidden, self.intermediate, first.q_size)
        xq = torch.empty(T, max_k, dtype=torch.int8)
        xd, xs32, xs16 = torch.empty(T, max_k // 32), torch.empty(T, max_k // 32), torch.empty(T, max_k // 16)
        self.dims.window, self.dims.block_size = queries.window, queries.block_size
        step = _Step(T=T, positions=positions.data_ptr(), slot_mapping=slot_mapping.data_ptr(),
                     query_token=queries.query_token.data_ptr(), query_pos=queries.query_pos.data_ptr(),
                     query_seq=queries.query_seq.data_ptr(), num_queries=queries.query_token.shape[0],
                     block_tables=queries.block_tables.data_ptr(), max_blocks=queries.block_tables.shape[1],
                     max_context=queries.max_context, cos=cos.data_ptr(), sin=sin.data_ptr(), h=h.data_ptr(),
                     qkv=qkv.data_ptr(), attn=attn.data_ptr(), gate_up=gate_up.data_ptr(), act=act.data_ptr(),
                     xq=xq.data_ptr(), xd=xd.data_ptr(), xs32=xs32.data_ptr(), xs16=xs16.data_ptr())
        self._fn(x.data_ptr(), self._layer_table(kv_caches), len(self.layers), ctypes.byref(self.dims),
                 ctypes.byref(step), torch.get_num_threads())
        return x
