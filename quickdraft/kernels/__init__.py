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
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from quickdraft.layers.quantization import QuantizedWeight

logger = logging.getLogger("quickdraft")

_SOURCE_DIR = Path(__file__).parent
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-fPIC"]
# Compilation units: (source, extra flags). The quantized linear is compiled once per integer
# dot-product instruction set; the VNNI units are optional (an older compiler may lack them) and
# are used only where the CPU has the instructions (see quant_isas).
_UNITS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("linear_f32.c", ()), ("linear_f32.c", ("-DQD_W16=1",)), ("linear_f32.c", ("-DQD_W16=2",)),
    ("attention_f32.c", ()), ("ops_f32.c", ()), ("decoder.c", ()),
    ("linear_q8.c", ("-DQD_ISA=avx2", "-DQD_QUANTIZE_ROWS")),
)
_OPTIONAL_UNITS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("linear_q8.c", ("-DQD_ISA=avxvnni", "-DQD_DOT_VNNI", "-mavxvnni")),
    ("linear_q8.c", ("-DQD_ISA=avx512vnni", "-DQD_DOT_VNNI512", "-mavx512vnni", "-mavx512vl")),
    # For the tests: the VNNI code path with dpbusd emulated exactly by AVX2 (never chosen).
    ("linear_q8.c", ("-DQD_ISA=vnniemu", "-DQD_DOT_VNNI", "-DQD_EMULATE_DPBUSD")),
)


def _cache_dir() -> Path:
    root = os.environ.get("QUICKDRAFT_CACHE", Path.home() / ".cache" / "quickdraft")
    return Path(root) / "kernels"


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty off x86-64 Linux)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return frozenset()
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split(":", 1)[-1].split())
    except (OSError, IndexError):
        return frozenset()


def _cpu_supported() -> bool:
    return {"avx2", "fma", "f16c"} <= cpu_flags()


def _build() -> Path | None:
    """Compile the C sources into one library in the cache (once per sources and flags)."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        logger.info("No C compiler found; using torch's CPU kernels.")
        return None
    files = sorted({_SOURCE_DIR / src for src, _ in _UNITS} | set(_SOURCE_DIR.glob("*.h")))
    units = [*_UNITS, *_OPTIONAL_UNITS]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)
                            + repr([compiler, _CFLAGS, units]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"quickdraft_cpu-{digest}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmpdir:
        objects = []
        for i, (src, flags) in enumerate(units):
            obj = os.path.join(tmpdir, f"{i}.o")
            result = subprocess.run([compiler, *_CFLAGS, *flags, "-c", str(_SOURCE_DIR / src), "-o", obj],
                                    capture_output=True, text=True)
            if result.returncode == 0:
                objects.append(obj)
            elif (src, flags) in _UNITS:
                logger.warning("Could not compile the native kernels (%s); using torch's CPU kernels.",
                               result.stderr.strip()[-500:])
                return None
            else:
                logger.info("Optional kernel %s %s not built: %s", src, " ".join(flags), result.stderr.strip()[-200:])
        # Link under a temporary name and rename: concurrent processes never see a partial file.
        tmp = os.path.join(tmpdir, "lib.so")
        result = subprocess.run([compiler, "-shared", "-fopenmp", *objects, "-o", tmp, "-lm"], capture_output=True,
                                text=True)
        if result.returncode != 0:
            logger.warning("Could not link the native kernels (%s); using torch's CPU kernels.",
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
    """A float32, float16 or bfloat16 weight [N, K] repacked for the native kernel of
    ``linear_f32.c`` (panels of 16 output features, [ceil(N / 16), K, 16], in the weight's dtype;
    16-bit values are widened exactly in registers), and the batch-invariant product with it."""

    _KERNELS = {torch.float32: "qd_linear_f32", torch.float16: "qd_linear_f16", torch.bfloat16: "qd_linear_bf16"}

    def __init__(self, lib: ctypes.CDLL, weight: torch.Tensor) -> None:
        self._fn = getattr(lib, self._KERNELS[weight.dtype])
        self.fn_address = ctypes.cast(self._fn, ctypes.c_void_p).value
        self.out_features, self.in_features = weight.shape
        w = weight.detach().contiguous()
        panels = -(-self.out_features // 16)
        if w.dtype == torch.float32:
            self.packed = torch.empty(panels, self.in_features, 16, dtype=torch.float32)
            lib.qd_pack_f32(w.data_ptr(), self.out_features, self.in_features, self.packed.data_ptr())
        else:
            pad = torch.zeros(panels * 16 - self.out_features, self.in_features, dtype=w.dtype)
            self.packed = torch.cat([w, pad]).view(panels, 16, self.in_features).transpose(1, 2).contiguous()

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
        """Rows of the original weight as float32, [len(index), K]: an embedding lookup on a tied
        matrix."""
        return self.packed[index // 16, :, index % 16].float()


class PackedParts:
    """One weight as blocks of output rows, each packed in its own format (PackedLinear or
    PackedQuantLinear): a fused Q/K/V or gate/up whose parts are stored in different block
    types (Q4_K_M files keep V in Q6_K in half of the layers, Q and K in Q4_K). Each output
    element is computed by its part's kernel alone, so the result is the parts' side by side,
    bit for bit, and the bytes read are the parts' own."""

    def __init__(self, parts: list[PackedLinear | PackedQuantLinear]) -> None:
        self.parts = parts
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x: [M, K] float32 -> x W^T + bias [M, N]."""
        outs, n0 = [], 0
        for p in self.parts:
            outs.append(p(x, None if bias is None else bias[n0:n0 + p.out_features]))
            n0 += p.out_features
        return torch.cat(outs, dim=1)


@lru_cache(maxsize=None)
def linear_kernel() -> Callable[[torch.Tensor], PackedLinear] | None:
    """``pack(weight [N, K]) -> PackedLinear`` for the native float linear (float32, float16 or
    bfloat16 weights), or None where it is unavailable."""
    lib = native_library()
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for name in PackedLinear._KERNELS.values():
        getattr(lib, name).argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ptr, i64, ptr, i64, ctypes.c_int]
        getattr(lib, name).restype = None
    lib.qd_pack_f32.argtypes = [ptr, i64, i64, ptr]
    lib.qd_pack_f32.restype = None
    return lambda weight: PackedLinear(lib, weight)


# Instruction sets of the quantized linear, fastest first, with the CPU flags each needs.
_QUANT_ISAS = (("avx512vnni", {"avx512_vnni", "avx512vl"}), ("avxvnni", {"avx_vnni"}), ("avx2", set()))


def quant_isas() -> list[str]:
    """The instruction-set variants of the quantized linear that this CPU can run, fastest first.
    They give identical bits (integer sums are exact; the float operations are the same)."""
    lib = native_library()
    if lib is None:
        return []
    return [name for name, needs in _QUANT_ISAS if needs <= cpu_flags() and hasattr(lib, f"qd_linear_q8_{name}")]


def default_quant_isa() -> str | None:
    """The variant 'auto' uses: QUICKDRAFT_QUANT_ISA if set (and available), else the fastest."""
    isas = quant_isas()
    forced = os.environ.get("QUICKDRAFT_QUANT_ISA")
    if forced:
        if forced not in isas:
            raise ValueError(f"QUICKDRAFT_QUANT_ISA={forced!r} is not available on this CPU (available: {isas}).")
        return forced
    return isas[0] if isas else None


class PackedQuantLinear:
    """A QuantizedWeight [N, K] in the native kernel's panel layout (``linear_q8.c``), and the
    batch-invariant product with it, on one instruction-set variant."""

    def __init__(self, lib: ctypes.CDLL, weight: "QuantizedWeight", isa: str) -> None:
        from quickdraft.layers.quantization import kernel_format, pack
        self._fn = getattr(lib, f"qd_linear_q8_{isa}")
        self.fn_address = ctypes.cast(self._fn, ctypes.c_void_p).value
        self._quantize, self._rows = lib.qd_quantize_q8, lib.qd_rows_q8
        self.isa = isa
        self.out_features, self.in_features = weight.shape
        self.fmt = kernel_format(weight)
        self.packed = pack(weight, self.fmt)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [M, K] float32 (unit stride in rows) -> xq, dx, sx32, sx16 as quantize_activations."""
        M, K = x.shape
        xq = torch.empty(M, K, dtype=torch.int8)
        xd, xs32 = torch.empty(M, K // 32), torch.empty(M, K // 32)
        xs16 = torch.empty(M, K // 16)
        self._quantize(x.data_ptr(), M, x.stride(0), K, xq.data_ptr(), xd.data_ptr(), xs32.data_ptr(),
                       xs16.data_ptr(), torch.get_num_threads())
        return xq, xd, xs32, xs16

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: [M, K] float32 -> x W^T + bias [M, N] (plus ``residual``, written in place)."""
        if x.stride(-1) != 1:
            x = x.contiguous()
        M = x.shape[0]
        xq, xd, xs32, xs16 = self.quantize(x)
        if residual is not None:
            assert residual.shape == (M, self.out_features) and residual.stride(-1) == 1
            y = residual
        else:
            y = torch.empty(M, self.out_features, dtype=torch.float32)
        self._fn(self.fmt, xq.data_ptr(), xd.data_ptr(), xs32.data_ptr(), xs16.data_ptr(), M,
                 self.packed.data_ptr(), self.out_features, self.in_features,
                 None if bias is None else bias.data_ptr(), None if residual is None else residual.data_ptr(),
                 y.stride(0), y.data_ptr(), y.stride(0), torch.get_num_threads())
        return y

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows of the weight dequantized, [len(index), K] (embedding lookups on a tied head)."""
        index = index.to(torch.int64).contiguous()
        out = torch.empty(index.shape[0], self.in_features)
        self._rows(self.fmt, self.packed.data_ptr(), self.in_features, index.data_ptr(), index.shape[0],
                   out.data_ptr())
        return out


def quant_linear_kernel(isa: str | None = None) -> Callable[["QuantizedWeight"], PackedQuantLinear] | None:
    """``pack(weight) -> PackedQuantLinear`` on ``isa`` (default: default_quant_isa()), or None
    where the native kernels are unavailable. ``isa="vnniemu"`` (tests only) is the VNNI code
    path with the dpbusd instruction emulated exactly on AVX2."""
    isa = isa or default_quant_isa()
    lib = native_library()
    if lib is None or isa is None:
        return None
    if isa not in quant_isas() and not (isa == "vnniemu" and hasattr(lib, "qd_linear_q8_vnniemu")):
        raise ValueError(f"Quantized kernel variant {isa!r} is not available here (available: {quant_isas()}).")
    _bind_quant(lib, isa)
    return lambda weight: PackedQuantLinear(lib, weight, isa)


@lru_cache(maxsize=None)
def _bind_quant(lib: ctypes.CDLL, isa: str) -> None:
    """The ctypes signatures of the quantized kernels, set once per variant."""
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    fn = getattr(lib, f"qd_linear_q8_{isa}")
    fn.argtypes = [c_int, ptr, ptr, ptr, ptr, i64, ptr, i64, i64, ptr, ptr, i64, ptr, i64, c_int]
    lib.qd_quantize_q8.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, ptr, c_int]
    lib.qd_rows_q8.argtypes = [c_int, ptr, i64, ptr, i64, ptr]
    for f in (fn, lib.qd_quantize_q8, lib.qd_rows_q8):
        f.restype = None


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
