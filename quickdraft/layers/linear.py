"""Linear layer with batch-invariant CPU kernels.

On CPU in float32 a row's result must not depend on how many other rows share the call (decode
vs. verification of drafted tokens vs. batches): that is what makes greedy speculative decoding
token-identical to plain decoding. The native kernel (kernels/linear_f32.c) guarantees it by
construction and reads the weights at close to memory bandwidth for the few rows of decode and
verification; without it, oneDNN's prepacked linear (also batch-invariant) is used. Elsewhere
(CUDA, bf16/fp16) it is F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quickdraft.kernels import PackedLinear, linear_kernel


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


class Linear(nn.Module):
    """y = x W^T + b with W: [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.packed: torch.Tensor | None = None
        self.native: PackedLinear | None = None

    def pack(self, keep_weight: bool = False) -> bool:
        """Switch to a batch-invariant CPU kernel when available (the native one, else oneDNN's)
        and free the plain weight unless ``keep_weight`` (a weight shared with an embedding).
        Returns whether a CPU kernel was chosen."""
        w = self.weight
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            shape = x.shape
            return self.native(x.reshape(-1, shape[-1]), self.bias).view(*shape[:-1], self.native.out_features)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
