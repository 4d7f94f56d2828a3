"""Engine-wide settings, resolved and validated once when `LLM(...)` is built."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from quickdraft.layers.quantization import QUANTIZATION_METHODS

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
}
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@lru_cache(maxsize=1)
def cpu_bf16_batch_invariant() -> bool:
    """Whether torch's CPU bfloat16 kernels are known batch-invariant here: on x86 CPUs with AVX2
    and none of AVX-512, AMX or AVX-NE-CONVERT (on those torch takes other bf16 code paths,
    oneDNN's among them). Greedy speculation in bfloat16 was seen to differ from plain decoding
    on an AVX512-BF16 CPU, and was verified identical on an AVX2-only one."""
    from quickdraft.kernels import cpu_flags

    flags = cpu_flags()
    return "avx2" in flags and not {"avx512f", "amx_bf16", "avx_ne_convert"} & flags


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available.")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on CUDA with bf16 support (float16 on older GPUs) and float32 on every
    CPU. On CPU, float32 runs the native batch-invariant kernels (kernels/), which keep greedy
    speculation token-identical to plain decoding on every CPU; bfloat16 runs torch's kernels,
    which were slower than those on the CPUs measured (AVX2 and AVX512-BF16 EPYCs) and on an
    AVX512-BF16 CPU broke that identity (see cpu_bf16_batch_invariant), so 'auto' does not
    choose it."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}.")
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of 'auto', 'float32', 'bfloat16', 'float16', got {dtype!r}.")
    return _DTYPES[dtype]


QUANTIZATIONS = ("auto", "gguf", *QUANTIZATION_METHODS, "none")


def resolve_quantization(quantization: str | None, model_path, device: torch.device, dtype: torch.dtype) -> str | None:
    """How a model's linear weights are held: 'gguf' (a GGUF file's blocks as stored), 'q8_0' /
    'q4_0' (a float checkpoint quantized at load), or None (float weights in ``dtype``; a GGUF file
    is dequantized). 'auto' is 'gguf' for GGUF files where the native integer kernels run (CPU,
    float32 activations) and None otherwise (on CUDA the dequantized weights run on cuBLAS)."""
    from quickdraft.kernels import quant_isas

    if quantization is None or quantization == "none":
        return None
    if not isinstance(quantization, str) or quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, got {quantization!r}.")
    is_gguf = str(model_path).lower().endswith(".gguf")
    if quantization == "auto":
        native = device.type == "cpu" and dtype == torch.float32 and bool(quant_isas())
        return "gguf" if is_gguf and native else None
    if quantization == "gguf" and not is_gguf:
        raise ValueError(f"quantization='gguf' needs a .gguf model file, got {str(model_path)!r}; "
                         f"quantize a float checkpoint with quantization='q8_0' or 'q4_0'.")
    if quantization != "gguf" and is_gguf:
        raise ValueError(f"quantization={quantization!r} quantizes a float checkpoint; the GGUF file "
                         f"{str(model_path)!r} runs as stored (quantization='gguf' or 'auto') or dequantized "
                         f"(quantization=None).")
    if device.type == "cpu" and dtype != torch.float32:
        raise ValueError(f"quantization={quantization!r} on CPU computes with float32 activations, but "
                         f"dtype={str(dtype).removeprefix('torch.')} was requested; use dtype='float32' (or 'auto'), "
                         f"or quantization=None to run the weights dequantized.")
    return quantization


def parse_memory_size(value: int | float | str) -> int:
    """Bytes from an int or a string such as '512MiB' or '2GB'."""
    if isinstance(value, bool):
        raise ValueError(f"kv_cache_memory must be a number of bytes or a size like '2GiB', got {value!r}.")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {value!r}.")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"kv_cache_memory must be a number of bytes or a size like '2GiB', got {value!r}.")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class EngineConfig:
    """Resolved engine settings (no 'auto' left)."""

    device: torch.device
    dtype: torch.dtype
    seed: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    num_kv_blocks: int
    disable_log_stats: bool
    quantization: str | None = None
    enable_prefix_caching: bool = True
    structured_outputs_backend: str = "auto"  # "auto" | "xgrammar" | "guidance"
    max_logprobs: int = 20  # most logprobs / prompt_logprobs a request may ask for; -1: the vocabulary
