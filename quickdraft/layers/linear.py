"""Linear layer with batch-invariant CPU kernels, on float or block-quantized weights.

On CPU a row's result must not depend on how many other rows share the call (decode vs.
verification of drafted tokens vs. batches): that is what makes greedy speculative decoding
token-identical to plain decoding. Float32 weights use the native kernel (kernels/linear_f32.c),
which guarantees it by construction and reads the weights at close to memory bandwidth for the
few rows of decode and verification; without it, oneDNN's prepacked linear (also
batch-invariant). Block-quantized weights (GGUF blocks as stored, or quantized at load) use the
native integer kernels (kernels/linear_q8.c), or elsewhere (CUDA, no compiler) the torch
reference of the same arithmetic (layers/quantization.py). Otherwise (CUDA, bf16/fp16) it is
F.linear.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from quickdraft.kernels import PackedLinear, PackedParts, PackedQuantLinear, linear_kernel, quant_linear_kernel
from quickdraft.layers.quantization import (FORMAT_NAMES, QuantizedWeight, quantize_weight,
                                            quantized_linear_reference)

logger = logging.getLogger("quickdraft")


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        probe = torch.zeros(1, weight.shape[1])
        torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
        return packed
    except (RuntimeError, AttributeError):
        return None


_FLOAT_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


class Linear(nn.Module):
    """y = x W^T + b with W: [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.packed: torch.Tensor | None = None
        self.native: PackedLinear | None = None
        self.native_q: PackedQuantLinear | None = None
        self.native_parts: PackedParts | None = None  # row blocks stored in different formats
        self.quant_parts: list[QuantizedWeight | torch.Tensor] | None = None  # the same, on the torch path
        self.quant: QuantizedWeight | None = None  # the torch path on quantized weights
        self._parts: dict[int, QuantizedWeight | torch.Tensor] = {}  # row offset -> stored rows, until pack()

    def set_stored(self, row_offset: int, part: QuantizedWeight | torch.Tensor) -> None:
        """Rows [row_offset, row_offset + rows) of the weight in the checkpoint's storage format:
        quantized blocks, or float16/bfloat16 values. The float weight is not filled; pack()
        runs them as stored where it can."""
        rows, cols = part.shape
        if cols != self.in_features or row_offset + rows > self.out_features:
            raise ValueError(f"Weight rows of shape {(rows, cols)} at row {row_offset} do not fit a "
                             f"[{self.out_features}, {self.in_features}] weight.")
        self._parts[row_offset] = part

    def _assemble(self, as_parts: bool) -> QuantizedWeight | torch.Tensor | list[QuantizedWeight | torch.Tensor] | None:
        """The stored parts as one weight: quantized, or 16-bit; or, where they cannot be fused
        (different formats) and ``as_parts``, the list of parts in row order, each to run as
        stored. Otherwise (and with rows loaded as floats beside them) they are written into the
        float weight (returns None)."""
        offsets = sorted(self._parts)
        parts = [self._parts[k] for k in offsets]
        self._parts = {}
        try:
            if sum(p.shape[0] for p in parts) != self.out_features:
                raise ValueError("some rows of the weight are stored otherwise")
            if all(isinstance(p, QuantizedWeight) for p in parts):
                try:
                    return parts[0] if len(parts) == 1 else QuantizedWeight.cat(parts)
                except ValueError:
                    if not as_parts:
                        raise
                    return parts
            if all(isinstance(p, torch.Tensor) for p in parts) and len({p.dtype for p in parts}) == 1:
                return parts[0] if len(parts) == 1 else torch.cat(parts)
            if as_parts and all(isinstance(p, QuantizedWeight) or p.dtype in (torch.float16, torch.bfloat16)
                                for p in parts):
                return parts
            raise ValueError("its parts are stored in different formats")
        except ValueError as e:
            logger.info("Linear [%d, %d]: %s; using it in %s.", self.out_features, self.in_features, e,
                        self.weight.dtype)
            for offset, part in zip(offsets, parts):
                value = part.dequantize() if isinstance(part, QuantizedWeight) else part
                self.weight.data[offset:offset + part.shape[0]] = value.to(self.weight.dtype)
            return None

    def _native_parts_possible(self, parts: list[QuantizedWeight | torch.Tensor]) -> bool:
        """Whether every part can run as stored on a native kernel of its own (CPU, float32
        activations, at most MAX_PARTS parts)."""
        from quickdraft.kernels.decoder import MAX_PARTS

        w = self.weight
        if w.device.type != "cpu" or w.dtype != torch.float32 or len(parts) > MAX_PARTS:
            return False
        return linear_kernel() is not None and quant_linear_kernel() is not None

    def pack(self, keep_weight: bool = False, quantization: str | None = None) -> bool:
        """Choose the kernel: quantized weights (set_stored, or ``quantization`` 'q8_0' / 'q4_0'
        on the float weight) run on the native integer kernels (else the torch reference);
        float32 weights on CPU on the native float kernel, 16-bit ones (set_stored) too, widened
        in registers (else oneDNN's on the float32 weight). The plain weight is freed unless
        ``keep_weight`` (a weight shared with an embedding). Returns whether a CPU kernel was chosen."""
        w = self.weight
        # quantization=... asks for one format: parts that differ are then fused as floats.
        stored = self._assemble(as_parts=quantization is None) if self._parts else None
        if isinstance(stored, list):  # parts in different formats, each as stored
            native = self._native_parts_possible(stored)
            if native:
                self.native_parts = PackedParts([quant_linear_kernel()(p) if isinstance(p, QuantizedWeight)
                                                 else linear_kernel()(p) for p in stored])
            else:
                self.quant_parts = [p.to(w.device) for p in stored]
            if not keep_weight:
                self.weight = nn.Parameter(torch.empty(0, dtype=w.dtype, device=w.device), requires_grad=False)
            return native
        if isinstance(stored, torch.Tensor):  # float16 / bfloat16 rows
            pack_native = linear_kernel() if w.device.type == "cpu" and w.dtype == torch.float32 else None
            if pack_native is not None and quantization is None:
                self.native = pack_native(stored)
                if not keep_weight:
                    self.weight = nn.Parameter(torch.empty(0, dtype=w.dtype), requires_grad=False)
                return True
            w.data.copy_(stored)
            stored = None
        qw = stored
        if qw is None and quantization is not None and w.numel():
            qw = quantize_weight(w, quantization)
        if qw is not None:
            pack_native = quant_linear_kernel() if w.device.type == "cpu" else None
            if pack_native is not None:
                self.native_q = pack_native(qw)
            else:
                self.quant = qw.to(w.device)
            if not keep_weight:
                self.weight = nn.Parameter(torch.empty(0, dtype=w.dtype, device=w.device), requires_grad=False)
            return pack_native is not None
        pack_native = linear_kernel() if w.device.type == "cpu" and w.dtype == torch.float32 else None
        if pack_native is not None:
            self.native = pack_native(w)
        else:
            self.packed = _pack(w)
            if self.packed is None:
                return False
        if not keep_weight:
            self.weight = nn.Parameter(torch.empty(0, dtype=w.dtype), requires_grad=False)
        return True

    @property
    def kernel(self) -> str:
        """Which kernel runs this layer, for logs and tests."""
        if self.native_parts is not None:
            names = [FORMAT_NAMES[p.fmt] if isinstance(p, PackedQuantLinear) else _FLOAT_NAMES[p.packed.dtype]
                     for p in self.native_parts.parts]
            isa = next((p.isa for p in self.native_parts.parts if isinstance(p, PackedQuantLinear)), None)
            return f"native-{'+'.join(names)}" + (f"-{isa}" if isa else "")
        if self.native_q is not None:
            return f"native-{FORMAT_NAMES[self.native_q.fmt]}-{self.native_q.isa}"
        if self.quant_parts is not None:
            return "torch-parts"
        if self.quant is not None:
            return "torch-quantized"
        if self.native is not None:
            return "native-" + _FLOAT_NAMES[self.native.packed.dtype]
        return "onednn" if self.packed is not None else "torch"

    def _forward_parts(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 -> [M, N]: each stored part on its rows (the torch path of PackedParts)."""
        outs, n0 = [], 0
        for part in self.quant_parts:
            n = part.shape[0]
            bias = None if self.bias is None else self.bias[n0:n0 + n].float()
            outs.append(quantized_linear_reference(x, part, bias) if isinstance(part, QuantizedWeight)
                        else F.linear(x, part.float(), bias))
            n0 += n
        return torch.cat(outs, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.native_parts is not None:
            y = self.native_parts(x.reshape(-1, shape[-1]).float(), self.bias)
            return y.view(*shape[:-1], self.out_features).to(x.dtype)
        if self.native_q is not None:
            y = self.native_q(x.reshape(-1, shape[-1]).float(), self.bias)
            return y.view(*shape[:-1], self.out_features).to(x.dtype)
        if self.quant is not None:
            y = quantized_linear_reference(x.reshape(-1, shape[-1]).float(), self.quant,
                                           None if self.bias is None else self.bias.float())
            return y.view(*shape[:-1], self.out_features).to(x.dtype)
        if self.quant_parts is not None:
            return self._forward_parts(x.reshape(-1, shape[-1]).float()).view(*shape[:-1], self.out_features).to(x.dtype)
        if self.native is not None:
            return self.native(x.reshape(-1, shape[-1]), self.bias).view(*shape[:-1], self.out_features)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
