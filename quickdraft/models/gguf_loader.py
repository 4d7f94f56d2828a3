"""Reading a GGUF file: config, weights and tokenizer.

A GGUF file (llama.cpp's format) holds three things that a Hugging Face folder spreads over
several files: the model's hyperparameters as key/value metadata, the tokenizer (vocabulary,
merges, token types, chat template) as more metadata, and the weights, possibly block-quantized.

    config = load_gguf_config(path)              # a config.json-style dict
    for name, tensor in iter_gguf_tensors(path): # HF parameter names, float32, [out, in]
        ...
    tok = load_gguf_tokenizer(path)              # a tokenizers.Tokenizer and its special tokens

The file is parsed here directly (the format is small: a header, the metadata, a table of tensor
descriptors, then aligned tensor data) and memory-mapped; tensors are dequantized one at a time
with vectorised torch code, so peak memory is the mapped file plus one float32 tensor.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from quickdraft.layers.quantization import QuantizedWeight
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

__all__ = [
    "GGUFTokenizerData",
    "dequantize",
    "iter_gguf_tensors",
    "load_gguf_config",
    "load_gguf_tokenizer",
    "unpermute_qk",
]

# ---------------------------------------------------------------------------------------------
# File parsing
# ---------------------------------------------------------------------------------------------

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32

# GGUF metadata value types.
_T_UINT8, _T_INT8, _T_UINT16, _T_INT16, _T_UINT32, _T_INT32, _T_FLOAT32 = 0, 1, 2, 3, 4, 5, 6
_T_BOOL, _T_STRING, _T_ARRAY, _T_UINT64, _T_INT64, _T_FLOAT64 = 7, 8, 9, 10, 11, 12

_SCALAR_STRUCTS = {
    _T_UINT8: struct.Struct("<B"),
    _T_INT8: struct.Struct("<b"),
    _T_UINT16: struct.Struct("<H"),
    _T_INT16: struct.Struct("<h"),
    _T_UINT32: struct.Struct("<I"),
    _T_INT32: struct.Struct("<i"),
    _T_FLOAT32: struct.Struct("<f"),
    _T_BOOL: struct.Struct("<?"),
    _T_UINT64: struct.Struct("<Q"),
    _T_INT64: struct.Struct("<q"),
    _T_FLOAT64: struct.Struct("<d"),
}
_ARRAY_DTYPES = {
    _T_UINT8: np.dtype("<u1"),
    _T_INT8: np.dtype("<i1"),
    _T_UINT16: np.dtype("<u2"),
    _T_INT16: np.dtype("<i2"),
    _T_UINT32: np.dtype("<u4"),
    _T_INT32: np.dtype("<i4"),
    _T_FLOAT32: np.dtype("<f4"),
    _T_BOOL: np.dtype("?"),
    _T_UINT64: np.dtype("<u8"),
    _T_INT64: np.dtype("<i8"),
    _T_FLOAT64: np.dtype("<f8"),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# ggml tensor types: id -> (name, elements per block, bytes per block).
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q4_1, GGML_Q5_0, GGML_Q5_1, GGML_Q8_0 = 0, 1, 2, 3, 6, 7, 8
GGML_Q4_K, GGML_Q5_K, GGML_Q6_K, GGML_BF16 = 12, 13, 14, 30
_QK_K = 256
_GGML_TYPES: dict[int, tuple[str, int, int]] = {
    GGML_F32: ("F32", 1, 4),
    GGML_F16: ("F16", 1, 2),
    GGML_Q4_0: ("Q4_0", 32, 2 + 16),
    GGML_Q4_1: ("Q4_1", 32, 2 + 2 + 16),
    GGML_Q5_0: ("Q5_0", 32, 2 + 4 + 16),
    GGML_Q5_1: ("Q5_1", 32, 2 + 2 + 4 + 16),
    GGML_Q8_0: ("Q8_0", 32, 2 + 32),
    GGML_Q4_K: ("Q4_K", _QK_K, 2 + 2 + 12 + _QK_K // 2),
    GGML_Q5_K: ("Q5_K", _QK_K, 2 + 2 + 12 + _QK_K // 8 + _QK_K // 2),
    GGML_Q6_K: ("Q6_K", _QK_K, _QK_K // 2 + _QK_K // 4 + _QK_K // 16 + 2),
    GGML_BF16: ("BF16", 1, 2),
}
# Names of the types this module cannot dequantize, for error messages only.
_OTHER_GGML_TYPE_NAMES = {
    9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
    26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}


def _ggml_type_name(ggml_type: int) -> str:
    if ggml_type in _GGML_TYPES:
        return _GGML_TYPES[ggml_type][0]
    return _OTHER_GGML_TYPE_NAMES.get(ggml_type, f"type {ggml_type}")


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the contiguous (innermost) dimension
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """Row-major shape: GGUF lists the innermost dimension first, torch lists it last."""
        return tuple(reversed(self.dims))


class _GGUFFile:
    """The parsed header of a GGUF file and a read-only memory map of its tensor data."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = memoryview(self._mm)
        try:
            self.metadata, self.tensors = self._parse(buf)
        finally:
            buf.release()

    def _parse(self, buf: memoryview) -> tuple[dict[str, Any], dict[str, _TensorInfo]]:
        if bytes(buf[:4]) != _MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
        version = _U32.unpack_from(buf, 4)[0]
        if version not in (2, 3):
            if version & 0xFFFF == 0 and version != 0:
                raise ValueError(f"{self.path}: big-endian GGUF files are not supported")
            raise ValueError(f"{self.path}: unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        pos = 24

        def read_str(pos: int) -> tuple[str, int]:
            (n,) = _U64.unpack_from(buf, pos)
            pos += 8
            return str(buf[pos : pos + n], "utf-8", "replace"), pos + n

        def read_value(vtype: int, pos: int) -> tuple[Any, int]:
            if vtype == _T_STRING:
                return read_str(pos)
            if vtype == _T_ARRAY:
                etype, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if etype == _T_STRING:
                    out = []
                    for _ in range(count):
                        (n,) = _U64.unpack_from(buf, pos)
                        pos += 8
                        out.append(str(buf[pos : pos + n], "utf-8", "replace"))
                        pos += n
                    return out, pos
                if etype in _ARRAY_DTYPES:
                    dtype = _ARRAY_DTYPES[etype]
                    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=pos).copy()
                    return arr, pos + count * dtype.itemsize
                if etype == _T_ARRAY:
                    out = []
                    for _ in range(count):  # each element is a whole array value
                        value, pos = read_value(_T_ARRAY, pos)
                        out.append(value)
                    return out, pos
                raise ValueError(f"{self.path}: unknown GGUF array element type {etype}")
            st = _SCALAR_STRUCTS.get(vtype)
            if st is None:
                raise ValueError(f"{self.path}: unknown GGUF value type {vtype}")
            (value,) = st.unpack_from(buf, pos)
            if vtype == _T_FLOAT32:
                # The shortest decimal that round-trips in float32: 1e-05, not 9.999999747378752e-06.
                value = float(str(np.float32(value)))
            return value, pos + st.size

        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = read_str(pos)
            (vtype,) = _U32.unpack_from(buf, pos)
            metadata[key], pos = read_value(vtype, pos + 4)

        infos = []
        for _ in range(n_tensors):
            name, pos = read_str(pos)
            (n_dims,) = _U32.unpack_from(buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            pos += 4 + 8 * n_dims
            ggml_type, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            infos.append((name, tuple(int(d) for d in dims), ggml_type, offset))

        alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = (pos + alignment - 1) // alignment * alignment
        tensors: dict[str, _TensorInfo] = {}
        for name, dims, ggml_type, offset in infos:
            n_elements = math.prod(dims)
            if ggml_type in _GGML_TYPES:
                _, block, block_bytes = _GGML_TYPES[ggml_type]
                if dims[0] % block:
                    raise ValueError(f"{self.path}: tensor {name} row length {dims[0]} is not a multiple of {block}")
                nbytes = n_elements // block * block_bytes
                if data_start + offset + nbytes > len(buf):
                    raise ValueError(f"{self.path}: tensor {name} runs past the end of the file (truncated?)")
            else:
                nbytes = -1  # unknown type: reported when the tensor is read
            tensors[name] = _TensorInfo(name, dims, ggml_type, data_start + offset, nbytes)
        return metadata, tensors

    def raw(self, info: _TensorInfo) -> torch.Tensor:
        """The tensor's bytes as a uint8 tensor viewing the memory map (no copy)."""
        if info.ggml_type not in _GGML_TYPES:
            raise ValueError(
                f"{self.path}: tensor {info.name} has type {_ggml_type_name(info.ggml_type)}, which is not "
                f"supported (supported: {', '.join(t[0] for t in _GGML_TYPES.values())})"
            )
        with warnings.catch_warnings():
            # The map is read-only; nothing here writes to it.
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(self._mm, dtype=torch.uint8, count=info.nbytes, offset=info.offset)

    def read(self, info: _TensorInfo) -> torch.Tensor:
        """The tensor dequantized to float32, in row-major (torch) shape, owning its memory."""
        raw = self.raw(info)
        out = dequantize(raw.view(-1, _GGML_TYPES[info.ggml_type][2]), info.ggml_type)
        return out.reshape(info.torch_shape)


# ---------------------------------------------------------------------------------------------
# Dequantization (vectorised torch; bit-identical to ggml's reference dequantizers)
# ---------------------------------------------------------------------------------------------


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The little-endian float16 at byte `start` of each block, as float32 [n_blocks, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, m] packed bytes -> [n, 2m]: the m low nibbles, then the m high nibbles."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _bits(qh: torch.Tensor, n_bits: int) -> torch.Tensor:
    """[n, m] bytes -> [n, n_bits, m]: bit b of every byte in row b."""
    shifts = torch.arange(n_bits, dtype=torch.uint8)
    return (qh.unsqueeze(-2) >> shifts.view(n_bits, 1)) & 1


def _k_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes per block -> eight 6-bit scales and eight 6-bit mins, as float32."""
    s = scales.view(-1, 3, 4)
    a, b, c = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((a & 63, (c & 0x0F) | ((a >> 6) << 4)), dim=-1)
    mn = torch.cat((b & 63, (c >> 4) | ((b >> 6) << 4)), dim=-1)
    return sc.to(torch.float32), mn.to(torch.float32)


# Each quantized block type splits exactly into small integers q, a scale d per sub-block and
# either an offset m per sub-block or a zero point z (see layers/quantization.py):
# [n, block] q, [n, sub-blocks] d and m. Dequantizing computes ggml's own formulas from them
# (q * d, (q - z) * d, q * d + m, q * d - m'), so the values are ggml's bit for bit.
_Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]


def _split_q8_0(b: torch.Tensor) -> _Split:
    return b[:, 2:].contiguous().view(torch.int8), _f16(b, 0), None, 0


def _split_q4_0(b: torch.Tensor) -> _Split:
    return _nibbles(b[:, 2:]), _f16(b, 0), None, 8


def _split_q4_1(b: torch.Tensor) -> _Split:
    return _nibbles(b[:, 4:]), _f16(b, 0), _f16(b, 2), 0


def _q5_high_bits(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1: a 32-bit little-endian mask per block -> [n, 32] bits, element j = bit j."""
    return _bits(qh, 8).transpose(1, 2).reshape(-1, 32)


def _split_q5_0(b: torch.Tensor) -> _Split:
    return _nibbles(b[:, 6:]) | (_q5_high_bits(b[:, 2:6]) << 4), _f16(b, 0), None, 16


def _split_q5_1(b: torch.Tensor) -> _Split:
    return _nibbles(b[:, 8:]) | (_q5_high_bits(b[:, 4:8]) << 4), _f16(b, 0), _f16(b, 2), 0


def _split_q4_k(b: torch.Tensor) -> _Split:
    n = b.shape[0]
    sc, mn = _k_scales_mins(b[:, 4:16])
    # 4 chunks of 32 bytes: sub-block 2c is chunk c's low nibbles, sub-block 2c+1 its high nibbles.
    q = _nibbles(b[:, 16:].reshape(n, 4, 32)).reshape(n, _QK_K)
    return q, _f16(b, 0) * sc, -(_f16(b, 2) * mn), 0


def _split_q5_k(b: torch.Tensor) -> _Split:
    n = b.shape[0]
    sc, mn = _k_scales_mins(b[:, 4:16])
    low = _nibbles(b[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    high = _bits(b[:, 16:48], 8)  # sub-block j takes bit j of the 32 qh bytes
    return (low | (high << 4)).reshape(n, _QK_K), _f16(b, 0) * sc, -(_f16(b, 2) * mn), 0


def _split_q6_k(b: torch.Tensor) -> _Split:
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 64)  # per half of 128 values
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    d = _f16(b, 208) * b[:, 192:208].view(torch.int8).to(torch.float32)  # [n, 16] sub-blocks of 16
    low = _nibbles(ql).reshape(n, 2, 4, 32)  # value 32*s + l of a half: nibble of ql[l + 32*(s&1)]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    high = (qh >> shifts) & 3  # value 32*s + l of a half: bits 2s, 2s+1 of qh[l]
    return (low | (high << 4)).reshape(n, _QK_K), d, None, 32


_SPLITTERS = {
    GGML_Q8_0: _split_q8_0,
    GGML_Q4_0: _split_q4_0,
    GGML_Q4_1: _split_q4_1,
    GGML_Q5_0: _split_q5_0,
    GGML_Q5_1: _split_q5_1,
    GGML_Q4_K: _split_q4_k,
    GGML_Q5_K: _split_q5_k,
    GGML_Q6_K: _split_q6_k,
}
QUANTIZED_TYPES = frozenset(_SPLITTERS)


def split_blocks(data: torch.Tensor, ggml_type: int, source: str = "") -> QuantizedWeight:
    """Raw blocks [rows, row bytes] of a quantized type -> the exact QuantizedWeight [rows, K]."""
    name, block, block_bytes = _GGML_TYPES[ggml_type]
    rows = data.shape[0]
    blocks = data.contiguous().view(-1, block_bytes)
    q, d, m, zero = _SPLITTERS[ggml_type](blocks)
    K = data.shape[1] // block_bytes * block
    d = d.reshape(rows, -1)
    return QuantizedWeight(q.reshape(rows, K), d, None if m is None else m.reshape(rows, -1), K // d.shape[1],
                           source or name, zero)


def _deq_f32(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.float32).clone()


def _deq_f16(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.float16).to(torch.float32)


def _deq_bf16(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.bfloat16).to(torch.float32)


_DEQUANTIZERS = {
    GGML_F32: _deq_f32,
    GGML_F16: _deq_f16,
    GGML_BF16: _deq_bf16,
}


def dequantize(data: torch.Tensor | np.ndarray, ggml_type: int) -> torch.Tensor:
    """Dequantize raw ggml bytes to float32.

    `data` is uint8 with the last axis holding whole blocks (e.g. one row of a weight per row of
    `data`); the result has the same leading shape and a last axis of the decoded elements. The
    values are bit-identical to ggml's (and the `gguf` package's) reference dequantization.
    """
    ggml_type = int(ggml_type)
    if ggml_type not in _DEQUANTIZERS and ggml_type not in _SPLITTERS:
        raise ValueError(
            f"GGML tensor type {_ggml_type_name(ggml_type)} is not supported "
            f"(supported: {', '.join(t[0] for t in _GGML_TYPES.values())})"
        )
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8))
    if data.dtype != torch.uint8:
        raise TypeError(f"dequantize expects uint8 bytes, got {data.dtype}")
    _, block, block_bytes = _GGML_TYPES[ggml_type]
    lead = tuple(data.shape[:-1])
    if data.ndim == 0 or data.shape[-1] % block_bytes:
        raise ValueError(f"{_ggml_type_name(ggml_type)} data must end in whole {block_bytes}-byte blocks")
    n_blocks_per_row = data.shape[-1] // block_bytes
    blocks = data.contiguous().view(-1, block_bytes)
    if ggml_type in _SPLITTERS:
        out = split_blocks(blocks, ggml_type).dequantize()
    else:
        out = _DEQUANTIZERS[ggml_type](blocks)
    return out.reshape(*lead, n_blocks_per_row * block)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
# llama.cpp's converter permutes Q/K rows for these (interleaved RoPE); not for qwen2/qwen3.
_PERMUTED_QK_ARCHITECTURES = frozenset({"llama", "mistral"})


def _architecture(gguf: _GGUFFile) -> str:
    arch = gguf.metadata.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"{gguf.path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(sorted(_ARCHITECTURES))})"
        )
    return arch


def _scalar(value: Any) -> Any:
    """A per-layer array (some files store head counts per layer) -> one value, if uniform."""
    if isinstance(value, np.ndarray):
        values = set(value.tolist())
        if len(values) != 1:
            raise ValueError(f"per-layer values {sorted(values)} differ; only uniform layers are supported")
        return values.pop()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _llama3_rope_scaling(freqs: np.ndarray, rope_theta: float, head_dim: int, original: int) -> dict:
    """Recover Llama 3's rope_scaling from llama.cpp's `rope_freqs` tensor of per-frequency divisors.

    Llama 3 divides each inverse frequency by 1 (short wavelengths), by `factor` (long ones) or,
    between, by 1 / ((1 - s) / factor + s) with s linear in 1 / wavelength. The file keeps only
    those divisors, so `factor` is their maximum and the smooth band gives the other two factors
    once the original context length is known (llama.cpp does not store it: Llama 3.x used 8192).
    """
    freqs = np.asarray(freqs, dtype=np.float64)
    factor = float(freqs.max())
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    mid = (freqs > 1.0 + 1e-4) & (freqs < factor * (1 - 1e-4))
    low_ff, high_ff = 1.0, 4.0
    if mid.sum() >= 2 and factor > 1:
        smooth = (1.0 / freqs[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
        slope, intercept = np.polyfit(original / wavelen[mid], smooth, 1)  # s = slope*x + intercept
        span = 1.0 / slope  # high_freq_factor - low_freq_factor
        low_ff = float(np.round(-intercept * span, 4))
        high_ff = float(np.round(low_ff + span, 4))
    # Check the reconstruction against the file, the way transformers computes it.
    rebuilt = np.where(
        wavelen < original / high_ff,
        1.0,
        np.where(
            wavelen > original / low_ff,
            factor,
            1.0 / ((1 - (original / wavelen - low_ff) / (high_ff - low_ff)) / factor
                   + (original / wavelen - low_ff) / (high_ff - low_ff)),
        ),
    )
    if not np.allclose(rebuilt, freqs, rtol=1e-3, atol=1e-3):
        raise ValueError("rope_freqs.weight does not match Llama 3 rope scaling; it is not supported")
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low_ff,
        "high_freq_factor": high_ff,
        "original_max_position_embeddings": original,
    }


def _config_from(gguf: _GGUFFile) -> dict:
    arch = _architecture(gguf)
    md = gguf.metadata

    def key(name: str, default: Any = None) -> Any:
        value = md.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{gguf.path}: GGUF metadata lacks {arch}.{name}")
        return _scalar(value)

    hidden = int(key("embedding_length"))
    n_heads = int(key("attention.head_count"))
    n_kv_heads = int(key("attention.head_count_kv", n_heads))
    head_dim = int(key("attention.key_length", hidden // n_heads))
    embed = gguf.tensors.get("token_embd.weight")
    if embed is not None:
        vocab_size = embed.dims[1]
    elif "tokenizer.ggml.tokens" in md:
        vocab_size = len(md["tokenizer.ggml.tokens"])
    else:
        vocab_size = int(key("vocab_size"))
    rope_theta = float(key("rope.freq_base", 10000.0))
    context = int(key("context_length"))
    hf_arch, model_type = _ARCHITECTURES[arch]
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "max_position_embeddings": context,
        "vocab_size": int(vocab_size),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "attention_bias": "blk.0.attn_q.bias" in gguf.tensors,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if md.get("tokenizer.ggml.padding_token_id") is not None:
        config["pad_token_id"] = md["tokenizer.ggml.padding_token_id"]

    rope_dims = md.get(f"{arch}.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ValueError(f"{gguf.path}: partial rotary embeddings ({rope_dims} of {head_dim}) are not supported")

    scaling_type = md.get(f"{arch}.rope.scaling.type")
    original = md.get(f"{arch}.rope.scaling.original_context_length")
    if scaling_type == "llama3" or "rope_freqs.weight" in gguf.tensors:
        freqs_info = gguf.tensors.get("rope_freqs.weight")
        if freqs_info is None:
            raise ValueError(f"{gguf.path}: llama3 rope scaling without a rope_freqs.weight tensor")
        freqs = gguf.read(freqs_info).numpy()
        config["rope_scaling"] = _llama3_rope_scaling(freqs, rope_theta, head_dim, int(original or 8192))
    elif scaling_type not in (None, "none"):
        scaling: dict[str, Any] = {"rope_type": scaling_type, "factor": float(key("rope.scaling.factor"))}
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        config["rope_scaling"] = scaling
    return config


def load_gguf_config(path: str | os.PathLike) -> dict:
    """An HF-style `config.json` dict built from the GGUF file's metadata."""
    return _config_from(_GGUFFile(path))


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors that are not model parameters (rope factors are read into the config instead).
_SKIPPED_TENSORS = frozenset({"rope_freqs.weight"})


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    if name in _SKIPPED_TENSORS:
        return None
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        if parts[2].endswith("attn_rot_embd"):
            return None
        target = _LAYER_TENSORS.get(parts[2])
        if target is not None:
            return f"model.layers.{int(parts[1])}.{target}"
    raise ValueError(f"GGUF tensor {name!r} has no counterpart in the supported architectures")


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (its RoPE rotates adjacent pairs; HF's rotates halves).

    llama.cpp's converter stores `w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2)`
    flattened back to `rows` rows; this is its inverse. Works for weights ([rows, cols]) and biases.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot unpermute {rows} rows over {n_head} heads")
    rest = tuple(w.shape[1:])
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest).contiguous()


def iter_gguf_tensors(path: str | os.PathLike,
                      keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """Yield (HF parameter name, tensor) pairs, one tensor at a time.

    Weights come in HF layout ([out_features, in_features]); Q and K rows are un-permuted for the
    architectures whose converter permutes them, so they suit the usual rotate-half RoPE. Tensors
    are float32 CPU tensors, except that with ``keep_quantized`` the 2-D tensors of a quantized
    block type come as the exact QuantizedWeight of their blocks and float16/bfloat16 ones as
    such (no float32 copy).
    """
    gguf = _GGUFFile(path)
    arch = _architecture(gguf)
    n_heads = int(_scalar(gguf.metadata[f"{arch}.attention.head_count"]))
    n_kv_heads = int(_scalar(gguf.metadata.get(f"{arch}.attention.head_count_kv", n_heads)))
    permuted = arch in _PERMUTED_QK_ARCHITECTURES
    for info in gguf.tensors.values():
        hf_name = _hf_name(info.name)
        if hf_name is None:
            continue
        tensor: torch.Tensor | QuantizedWeight
        if keep_quantized and info.ggml_type in QUANTIZED_TYPES and len(info.dims) == 2:
            rows = info.torch_shape[0]
            tensor = split_blocks(gguf.raw(info).view(rows, -1), info.ggml_type)
        elif keep_quantized and info.ggml_type in (GGML_F16, GGML_BF16) and len(info.dims) == 2:
            dtype = torch.float16 if info.ggml_type == GGML_F16 else torch.bfloat16
            tensor = gguf.raw(info).view(dtype).view(info.torch_shape)  # a view of the file
        else:
            tensor = gguf.read(info)
        if permuted and (".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name):
            heads = n_heads if ".q_proj." in hf_name else n_kv_heads
            if isinstance(tensor, QuantizedWeight):
                tensor = tensor.select_rows(unpermute_qk(torch.arange(tensor.shape[0]), heads))
            else:
                tensor = unpermute_qk(tensor, heads)
        yield hf_name, tensor


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

# llama.cpp token types.
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED, _TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split patterns, by `tokenizer.ggml.pre` (the regexes llama.cpp uses for them).
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {
    # GPT-2's byte-level regex alone.
    "default": "gpt2", "gpt-2": "gpt2", "gpt2": "gpt2", "mpt": "gpt2", "olmo": "gpt2",
    # Each digit on its own, then GPT-2's regex (HF: Digits(individual_digits) + ByteLevel).
    "smollm": "digits+gpt2", "starcoder": "digits+gpt2", "refact": "digits+gpt2",
    "codeshell": "digits+gpt2",
    "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3", "smaug-bpe": "llama3",
    "falcon3": "llama3",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2",
}


@dataclass(frozen=True)
class GGUFTokenizerData:
    backend: Tokenizer
    bos_token_id: int | None
    eos_token_id: int | None
    bos_token: str | None
    eos_token: str | None
    add_bos_token: bool
    chat_template: str | None


def _byte_level_pre_tokenizer(pre: str | None):
    kind = _PRE_TOKENIZERS.get(pre or "default")
    if kind is None:
        raise ValueError(
            f"GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(sorted(_PRE_TOKENIZERS))})"
        )
    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "digits+gpt2":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    pattern = _LLAMA3_PATTERN if kind == "llama3" else _QWEN2_PATTERN
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the rest move to 256+."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _build_byte_level(md: dict, path: str) -> Tokenizer:
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    types = md.get("tokenizer.ggml.token_type")
    types = [_TOKEN_NORMAL] * len(tokens) if types is None else np.asarray(types).tolist()
    merges_raw = md.get("tokenizer.ggml.merges")
    if merges_raw is None:
        raise ValueError(f"{path}: byte-level GGUF tokenizer without tokenizer.ggml.merges")

    byte_chars = _bytes_to_unicode()
    alphabet = set(byte_chars.values())
    vocab: dict[str, int] = {}
    for i, (tok, ttype) in enumerate(zip(tokens, types)):
        if ttype not in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED) and not set(tok) <= alphabet:
            # A plain token not spelled in the byte alphabet: spell it so the BPE can produce it.
            tok = "".join(byte_chars[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)  # a duplicate keeps its first id
    merges = []
    for merge in merges_raw:
        left, sep, right = merge.partition(" ")
        if sep:
            merges.append((left, right))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(md.get("tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()
    _add_special_tokens(tokenizer, tokens, types, vocab)
    return tokenizer


def _add_special_tokens(tokenizer, tokens, types, vocab) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens: either way
    they are matched whole in the input text. Only those that kept their own id are added."""
    control, user = [], []
    for i, (tok, ttype) in enumerate(zip(tokens, types)):
        if ttype == _TOKEN_CONTROL and vocab.get(tok) == i:
            control.append(AddedToken(tok, special=True, normalized=False))
        elif ttype == _TOKEN_USER_DEFINED and vocab.get(tok) == i:
            user.append(AddedToken(tok, special=False, normalized=False))
    if control:
        tokenizer.add_special_tokens(control)
    if user:
        tokenizer.add_tokens(user)


def _attach_post_processor(tokenizer: Tokenizer, bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> None:
    """Prepend BOS / append EOS on `encode(..., add_special_tokens=True)`, as the file asks."""
    if bos is None and eos is None:
        return
    specials = [t for t in (bos, eos) if t is not None]
    pre = f"{bos[0]} " if bos else ""
    post = f" {eos[0]}" if eos else ""
    pair_b = (f"{bos[0]}:1 " if bos else "") + "$B:1" + (f" {eos[0]}:1" if eos else "")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{pre}$A{post}", pair=f"{pre}$A{post} {pair_b}", special_tokens=list(dict.fromkeys(specials))
    )


def load_gguf_tokenizer(path: str | os.PathLike) -> GGUFTokenizerData:
    """The tokenizer described by the GGUF metadata, as a `tokenizers.Tokenizer` plus its specials."""
    gguf = _GGUFFile(path)
    md = gguf.metadata
    model = md.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in md:
        raise ValueError(f"{gguf.path}: the GGUF file holds no tokenizer (no tokenizer.ggml.tokens)")
    if model == "gpt2":
        backend = _build_byte_level(md, gguf.path)
        default_add_bos = False
    else:
        raise ValueError(
            f"{gguf.path}: GGUF tokenizer model {model!r} is not supported (supported: 'gpt2', "
            "i.e. byte-level BPE); use the model's Hugging Face tokenizer folder instead"
        )
    tokens = md["tokenizer.ggml.tokens"]

    def special(key: str) -> tuple[int | None, str | None]:
        idx = md.get(f"tokenizer.ggml.{key}")
        if idx is None or not 0 <= int(idx) < len(tokens):
            return None, None
        return int(idx), tokens[int(idx)]

    bos_id, bos_tok = special("bos_token_id")
    eos_id, eos_tok = special("eos_token_id")
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", default_add_bos)) and bos_id is not None
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False)) and eos_id is not None
    _attach_post_processor(
        backend, (bos_tok, bos_id) if add_bos else None, (eos_tok, eos_id) if add_eos else None
    )
    return GGUFTokenizerData(
        backend=backend,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        bos_token=bos_tok,
        eos_token=eos_tok,
        add_bos_token=add_bos,
        chat_template=md.get("tokenizer.chat_template"),
    )
