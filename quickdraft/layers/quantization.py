"""Block-quantized weights and the linear layer on them, as llama.cpp computes it: activations
quantized per row to int8 blocks of 32, integer dot products per block, float scales after.

A weight is held as a ``QuantizedWeight``: small integers q [N, K] with a scale d and optionally
an offset m per sub-block of ``bs`` (32 or 16) consecutive values of a row,

    w[n, k] = d[n, k // bs] * q[n, k] + m[n, k // bs],

where a zero point z stands for the offset m = -z * d (exact in float32).

Every GGUF block type maps onto this exactly (gguf_loader.split_blocks), and ``quantize_weight``
makes Q8_0 / Q4_0 from a float checkpoint with ggml's reference quantizers. The product is

    y[m, n] = sum over sub-blocks j, in order:  acc = acc + float(isum_j) * (d_nj * dx_mb)
                                                acc = acc + m_nj * sx_mj          (offset formats)

with isum_j = sum q * xq (exact integers), dx the activation block's scale and sx = dx * sum(xq)
over the sub-block (see ``quantize_activations``); then bias, then residual. Each output element
is a fixed sequence of float32 operations on exact integers, so it does not depend on the batch,
the tiling or the instruction set: ``quantized_linear_reference`` (torch, any device) and the
native kernels (kernels/linear_q8.c) give the same bits, which the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUANT_BLOCK = 32  # activation block, and the column block of every weight format
QUANTIZATION_METHODS = ("q8_0", "q4_0")  # for float checkpoints, quantized at load

# Formats of the native kernel (linear_q8.c, QD_Q_*).
FMT_S8H, FMT_U4H, FMT_U4F, FMT_U8F, FMT_U8F16 = 1, 2, 3, 4, 5
FORMAT_NAMES = {FMT_S8H: "S8H", FMT_U4H: "U4H", FMT_U4F: "U4F", FMT_U8F: "U8F", FMT_U8F16: "U8F16"}
PANEL_ROWS = 8


@dataclass
class QuantizedWeight:
    """w = d * q + m per sub-block of ``bs`` values of a row, or (q - zero) * d (module docstring)."""

    q: torch.Tensor  # [N, K] int8 (signed quants) or uint8 (unsigned quants, at most 63)
    d: torch.Tensor  # [N, K // bs] float32
    m: torch.Tensor | None  # [N, K // bs] float32, or None
    bs: int
    source: str  # the GGUF type or method it came from, for logs and errors
    zero: int = 0  # zero point (only without m)

    def __post_init__(self) -> None:
        N, K = self.q.shape
        if self.bs not in (16, 32) or K % QUANT_BLOCK:
            raise ValueError(f"{self.source}: need sub-blocks of 16 or 32 and K a multiple of 32, got bs={self.bs}, K={K}")
        if tuple(self.d.shape) != (N, K // self.bs) or (self.m is not None and self.m.shape != self.d.shape):
            raise ValueError(f"{self.source}: scales of shape {tuple(self.d.shape)} do not fit quants {(N, K)}")
        if self.q.dtype == torch.uint8 and int(self.q.max()) > 63:
            raise ValueError(f"{self.source}: unsigned quants above 63 are not supported")
        if self.zero and self.m is not None:
            raise ValueError(f"{self.source}: a zero point and an offset together")

    @property
    def offset(self) -> torch.Tensor | None:
        """m as the kernels use it: the offset, or -zero * d."""
        return self.m if self.m is not None else (self.d * float(-self.zero) if self.zero else None)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    def dequantize(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 rows ([N, K], or [len(index), K]): q * d + m or (q - zero) * d, ggml's formulas."""
        q, d, m = (self.q, self.d, self.m) if index is None else (
            self.q[index], self.d[index], None if self.m is None else self.m[index])
        R, K = q.shape
        qf = q.view(R, K // self.bs, self.bs).to(torch.float32)
        if self.zero:
            qf = qf - float(self.zero)
        w = qf * d.unsqueeze(-1)
        if m is not None:
            w = w + m.unsqueeze(-1)
        return w.reshape(R, K)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(self.q.to(device), self.d.to(device), None if self.m is None else self.m.to(device),
                               self.bs, self.source, self.zero)

    def select_rows(self, index: torch.Tensor) -> QuantizedWeight:
        return QuantizedWeight(self.q[index], self.d[index], None if self.m is None else self.m[index], self.bs,
                               self.source, self.zero)

    @staticmethod
    def cat(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Rows of several weights stacked (fused Q/K/V or gate/up); they must share bs and sign."""
        first = parts[0]
        if any(p.bs != first.bs or p.q.dtype != first.q.dtype or (p.m is None) != (first.m is None)
               or p.zero != first.zero for p in parts):
            raise ValueError("cannot fuse weights of different quantization layouts: "
                             + ", ".join(p.source for p in parts))
        return QuantizedWeight(torch.cat([p.q for p in parts]), torch.cat([p.d for p in parts]),
                               None if first.m is None else torch.cat([p.m for p in parts]), first.bs,
                               "+".join(sorted({p.source for p in parts})), first.zero)


def _f16_exact(t: torch.Tensor | None) -> bool:
    return t is None or bool((t.half().float() == t).all())


def kernel_format(w: QuantizedWeight) -> int:
    """The native kernel format that holds ``w`` exactly (linear_q8.c)."""
    if w.q.dtype == torch.int8:
        if w.bs != 32 or w.offset is not None or not _f16_exact(w.d):
            raise ValueError(f"{w.source}: signed quants need bs=32, no offset and float16 scales")
        return FMT_S8H
    if w.bs == 16:
        return FMT_U8F16
    if int(w.q.max()) <= 15:
        return FMT_U4H if _f16_exact(w.d) and _f16_exact(w.offset) else FMT_U4F
    return FMT_U8F


def _panels(t: torch.Tensor, P: int) -> torch.Tensor:
    """[N, nb, ...] -> [P, nb, 8, ...], rows padded with zeros to P * 8."""
    N = t.shape[0]
    if N < P * PANEL_ROWS:
        t = torch.cat([t, t.new_zeros(P * PANEL_ROWS - N, *t.shape[1:])])
    return t.reshape(P, PANEL_ROWS, *t.shape[1:]).transpose(1, 2)


def pack(w: QuantizedWeight, fmt: int) -> torch.Tensor:
    """The native kernel's layout: [ceil(N / 8), K / 32, block bytes] uint8, each block holding the
    panel's 8 scales (and offsets) then its 8 rows of quants (see linear_q8.c)."""
    N, K = w.shape
    nb, P = K // QUANT_BLOCK, -(-N // PANEL_ROWS)
    # Quants interleaved by groups of 4 values: [P, nb, group g, row r, 4] (g = 0..7).
    q = _panels(w.q.view(torch.uint8).reshape(N, nb, 8, 4), P).transpose(2, 3)
    if fmt in (FMT_U4H, FMT_U4F):
        q = q[:, :, :4] | (q[:, :, 4:] << 4)  # 4 vectors: groups i (low nibbles) and i + 4 (high)
    parts: list[torch.Tensor] = []
    scale_dtype = torch.float16 if fmt in (FMT_S8H, FMT_U4H) else torch.float32
    m = w.offset if w.offset is not None else (None if fmt == FMT_S8H else torch.zeros_like(w.d))
    for s in (w.d, m):
        if s is None:
            continue
        s = s.reshape(N, nb, -1)  # [N, nb, sub-blocks per block]
        for j in range(s.shape[-1]):  # U8F16: the first halves' scales, then the second halves'
            parts.append(_panels(s[..., j].to(scale_dtype), P).contiguous().view(torch.uint8).reshape(P, nb, -1))
    parts.append(q.reshape(P, nb, -1))
    return torch.cat(parts, dim=-1).contiguous()


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] float32 -> xq [M, K] int8, dx [M, K/32], sx32 [M, K/32], sx16 [M, K/16]:
    dx = max|x| / 127 per block of 32, xq = round_half_even(x * (1 / dx)) (0 where dx = 0),
    sx = dx * float(sum xq) over each block (sx32) and each half block (sx16)."""
    M, K = x.shape
    xb = x.reshape(M, K // QUANT_BLOCK, QUANT_BLOCK)
    dx = xb.abs().amax(dim=-1) / 127.0
    inv = torch.where(dx != 0, torch.ones_like(dx) / dx, torch.zeros_like(dx))
    xq = torch.round(xb * inv.unsqueeze(-1))  # float32 integers in [-127, 127]
    halves = xq.reshape(M, K // 16, 16).sum(dim=-1)  # exact
    sx16 = dx.repeat_interleave(2, dim=1) * halves
    sx32 = dx * (halves[:, 0::2] + halves[:, 1::2])
    return xq.reshape(M, K).to(torch.int8), dx, sx32, sx16


def quantized_linear_reference(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None,
                               residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 -> [M, N]: the module docstring's expression in torch, on any device
    (rows in chunks, so that the per-sub-block sums [rows, N, K / bs] stay small)."""
    M, K = x.shape
    N = w.shape[0]
    chunk = max(1, (1 << 24) // max(1, N * (K // w.bs)))
    if M > chunk:
        return torch.cat([quantized_linear_reference(x[i:i + chunk], w, bias,
                                                     None if residual is None else residual[i:i + chunk])
                          for i in range(0, M, chunk)])
    xq, dx, sx32, sx16 = quantize_activations(x.float())
    bs, nsub = w.bs, K // w.bs
    # Integer sums per sub-block, exact in float32 (|sum| <= 32 * 128 * 127 < 2^24).
    isum = torch.einsum("mjb,njb->mnj", xq.reshape(M, nsub, bs).float(),
                        w.q.reshape(N, nsub, bs).to(device=x.device, dtype=torch.float32))  # [M, N, nsub]
    per_block = QUANT_BLOCK // bs
    sx = sx32 if bs == QUANT_BLOCK else sx16
    offset = w.offset
    d, m = w.d.to(x.device), None if offset is None else offset.to(x.device)
    acc = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    for j in range(nsub):
        acc = acc + isum[:, :, j] * (d[None, :, j] * dx[:, None, j // per_block])
        if m is not None:
            acc = acc + m[None, :, j] * sx[:, None, j]
    if bias is not None:
        acc = acc + bias
    if residual is not None:
        acc = residual + acc
    return acc


def _round_half_away(t: torch.Tensor) -> torch.Tensor:
    """C's roundf."""
    return torch.sign(t) * torch.floor(t.abs() + 0.5)


def quantize_weight(w: torch.Tensor, method: str) -> QuantizedWeight:
    """A float weight [N, K] quantized as ggml's reference quantizers do (K a multiple of 32):
    q8_0: d = max|w| / 127 (stored as float16), q = roundf(w / d);
    q4_0: d = w_maxabs / -8 (the signed value of largest magnitude; float16), q = min(15, (int)(w / d + 8.5)),
    held with zero point 8."""
    N, K = w.shape
    if K % QUANT_BLOCK:
        raise ValueError(f"quantization={method!r} needs in_features divisible by 32, got {K}")
    wb = w.detach().float().reshape(N, K // QUANT_BLOCK, QUANT_BLOCK)
    if method == "q8_0":
        d = wb.abs().amax(dim=-1) / 127.0
        inv = torch.where(d != 0, torch.ones_like(d) / d, torch.zeros_like(d))
        q = _round_half_away(wb * inv.unsqueeze(-1)).to(torch.int8)
        return QuantizedWeight(q.reshape(N, K), d.half().float(), None, QUANT_BLOCK, "q8_0")
    if method == "q4_0":
        idx = wb.abs().argmax(dim=-1, keepdim=True)
        d = torch.gather(wb, -1, idx).squeeze(-1) / -8.0
        inv = torch.where(d != 0, torch.ones_like(d) / d, torch.zeros_like(d))
        q = torch.clamp(torch.trunc(wb * inv.unsqueeze(-1) + 8.5), max=15).to(torch.uint8)
        return QuantizedWeight(q.reshape(N, K), d.half().float(), None, QUANT_BLOCK, "q4_0", zero=8)
    raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, got {method!r}")
