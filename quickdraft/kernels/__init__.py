"""Native CPU kernels, compiled on first use with the system C compiler and cached.

The kernels are plain C (no Python or torch headers), built into one library in a few seconds
and called through ctypes on torch tensors' memory. OpenMP comes from the ``libgomp.so.1`` that
torch has already loaded, so the kernels and torch share one thread pool. When no compiler is
found, the CPU lacks AVX2/FMA, or ``QUICKDRAFT_NATIVE_KERNELS=0`` is set, the accessors below
return None and callers use torch's own kernels instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

logger = logging.getLogger("quickdraft")

_SOURCE_DIR = Path(__file__).parent
_SOURCES = ("linear_f32.c", "attention_f32.c", "ops_f32.c", "decoder_f32.c")
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]


def _cache_dir() -> Path:
    root = os.environ.get("QUICKDRAFT_CACHE", Path.home() / ".cache" / "quickdraft")
    return Path(root) / "kernels"


def _cpu_supported() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return False
    return "avx2" in flags and "fma" in flags


def _build() -> Path | None:
    """Compile the C sources into one library in the cache (once per sources and flags)."""
    sources = [_SOURCE_DIR / name for name in _SOURCES]
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        logger.info("No C compiler found; using torch's CPU kernels.")
        return None
    headers = sorted(_SOURCE_DIR.glob("*.h"))
    digest = hashlib.sha256(b"".join(src.read_bytes() for src in [*sources, *headers])
                            + " ".join([compiler, *_CFLAGS]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"quickdraft_cpu-{digest}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: concurrent processes never see a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    result = subprocess.run([compiler, *_CFLAGS, *map(str, sources), "-o", tmp, "-lm"], capture_output=True,
                            text=True)
    if result.returncode != 0:
        os.unlink(tmp)
        logger.warning("Could not compile the native kernels (%s); using torch's CPU kernels.",
                       result.stderr.strip()[-500:])
        return None
    os.replace(tmp, target)
    return target


@lru_cache(maxsize=None)
def native_library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they are unavailable."""
    if os.environ.get("QUICKDRAFT_NATIVE_KERNELS", "1") == "0" or not _cpu_supported():
        return None
    try:
        path = _build()
        return None if path is None else ctypes.CDLL(str(path))
    except OSError as e:  # unwritable cache, unloadable library
        logger.warning("Native kernels unavailable (%s); using torch's CPU kernels.", e)
        return None


class PackedLinear:
    """A float32 weight [N, K] repacked for the native kernel of ``linear_f32.c`` (panels of 16
    output features, [ceil(N / 16), K, 16]), and the batch-invariant product with it."""

    def __init__(self, lib: ctypes.CDLL, weight: torch.Tensor) -> None:
        self._fn = lib.qd_linear_f32
        self.out_features, self.in_features = weight.shape
        w = weight.detach().contiguous()
        self.packed = torch.empty(-(-self.out_features // 16), self.in_features, 16, dtype=torch.float32)
        lib.qd_pack_f32(w.data_ptr(), self.out_features, self.in_features, self.packed.data_ptr())

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: [M, K] float32 -> x W^T + bias [M, N]; with ``residual`` ([M, N], contiguous rows)
        the result is residual + (x W^T + bias), written into ``residual`` and returned."""
        if x.stride(-1) != 1:
            x = x.contiguous()
        M = x.shape[0]
        if residual is not None:
            assert residual.shape == (M, self.out_features) and residual.stride(-1) == 1
            y = residual
        else:
            y = torch.empty(M, self.out_features, dtype=torch.float32)
        self._fn(x.data_ptr(), M, x.stride(0), self.packed.data_ptr(), self.out_features, self.in_features,
                 None if bias is None else bias.data_ptr(), None if residual is None else residual.data_ptr(),
                 y.stride(0), y.data_ptr(), y.stride(0), torch.get_num_threads())
        return y

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows of the original weight, [len(index), K]: an embedding lookup on a tied matrix."""
        return self.packed[index // 16, :, index % 16]


@lru_cache(maxsize=None)
def linear_kernel() -> Callable[[torch.Tensor], PackedLinear] | None:
    """``pack(weight [N, K]) -> PackedLinear`` for the native float32 linear, or None where it is
    unavailable."""
    lib = native_library()
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.qd_linear_f32.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ptr, i64, ptr, i64, ctypes.c_int]
    lib.qd_linear_f32.restype = None
    lib.qd_pack_f32.argtypes = [ptr, i64, i64, ptr]
    lib.qd_pack_f32.restype = None
    return lambda weight: PackedLinear(lib, weight)


PagedAttentionKernel = Callable[..., None]


@lru_cache(maxsize=None)
def paged_attention_kernel() -> PagedAttentionKernel | None:
    """The batch-invariant float32 paged attention of ``attention_f32.c`` on tensors (arguments as
    in the C signature), or None where it is unavailable. The engine reaches the C function
    through the decoder stack; this binding lets the kernel be checked on its own."""
    lib = native_library()
    if lib is None:
        return None
    fn = lib.qd_paged_attention_f32
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, ctypes.c_float,
                   i64, i64, ptr, i64, ctypes.c_int]
    fn.restype = None

    def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, query_token: torch.Tensor,
                  query_pos: torch.Tensor, query_seq: torch.Tensor, block_tables: torch.Tensor,
                  block_size: int, scale: float, window: int, max_context: int, out: torch.Tensor) -> None:
        """q: [T, H, D] (rows may be strided), k_cache/v_cache: [slots, Hkv, D] contiguous,
        query_*: [Nq] int64, block_tables: [B, max_blocks] int64, out: [T, H * D]."""
        _, H, D = q.shape
        Hkv = k_cache.shape[1]
        assert q.stride(2) == 1 and q.stride(1) == D and k_cache.is_contiguous() and v_cache.is_contiguous()
        fn(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), query_token.data_ptr(),
           query_pos.data_ptr(), query_seq.data_ptr(), query_token.shape[0], block_tables.data_ptr(),
           block_tables.shape[1], block_size, H, Hkv, D, scale, window, max_context, out.data_ptr(),
           out.stride(0), torch.get_num_threads())

    return attention


class LayerOps:
    """The fused small operations of ``ops_f32.c`` on float32 CPU tensors (the final norm; the
    others run inside the decoder stack and are bound here to be checked on their own)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.qd_rms_norm_f32.argtypes = [ptr, i64, i64, i64, ptr, ctypes.c_float, ptr, i64, c_int]
        lib.qd_rope_cache_f32.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, c_int]
        lib.qd_silu_mul_f32.argtypes = [ptr, i64, i64, ptr, c_int]
        for fn in (lib.qd_rms_norm_f32, lib.qd_rope_cache_f32, lib.qd_silu_mul_f32):
            fn.restype = None
        self._lib = lib

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x: [M, H] (unit stride within rows) -> weight * x / sqrt(mean(x^2) + eps), [M, H]."""
        M, H = x.shape
        assert x.stride(1) == 1
        out = torch.empty(M, H, dtype=torch.float32)
        self._lib.qd_rms_norm_f32(x.data_ptr(), M, x.stride(0), H, weight.data_ptr(), eps, out.data_ptr(), H,
                                  torch.get_num_threads())
        return out

    def rope_cache(self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                   cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                   kv_cache: torch.Tensor) -> None:
        """Rotary embedding in place on the query and key heads of qkv [T, (H + 2 Hkv) D], then
        keys and values into their slots of kv_cache [2, slots, Hkv, D]; cos/sin [positions, D]."""
        T = qkv.shape[0]
        assert qkv.is_contiguous() and kv_cache.is_contiguous() and head_dim <= 512
        self._lib.qd_rope_cache_f32(qkv.data_ptr(), T, qkv.stride(0), num_heads, num_kv_heads, head_dim,
                                    cos.data_ptr(), sin.data_ptr(), positions.data_ptr(), slot_mapping.data_ptr(),
                                    kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), torch.get_num_threads())

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up: [M, 2I] contiguous -> silu(gate) * up, [M, I]."""
        M, two_i = gate_up.shape
        assert gate_up.is_contiguous()
        out = torch.empty(M, two_i // 2, dtype=torch.float32)
        self._lib.qd_silu_mul_f32(gate_up.data_ptr(), M, two_i // 2, out.data_ptr(), torch.get_num_threads())
        return out


@lru_cache(maxsize=None)
def layer_ops() -> LayerOps | None:
    """The fused float32 layer operations, or None where native kernels are unavailable."""
    lib = native_library()
    return None if lib is None else LayerOps(lib)
