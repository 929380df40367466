"""The int8 format: each linear layer's weight W [N, K] as int8 values q [N, K] and one float32 scale per
output row [N, 1], symmetric (no zero point): W ~ q * scale, scale = max|W[n]| / 127, q in [-127, 127].

Only the linear layers' 2-D weights that carry the model's bulk are quantized: attention q/k/v/o, the
FFN's gate/up/down, every routed expert's and the shared expert's. The router and the shared-expert gate
(tiny, and a rounding error there changes which experts a token goes to), the norms, the biases, the
embedding and the output head (`lm_head` - the head reads it directly, not through `linear`) stay dense
in the compute dtype.

The torch twin (`dequantize`, `linear`) defines the arithmetic a fused kernel must reproduce: values and
scales to float32, multiplied, rounded once to the compute dtype, then the GEMM.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from offbatch.formats.base import WeightFormat, register_format

KEEP_DENSE = ("router", "shared_gate")  # linear layers whose weights are never quantized


def quantizable(local: str, shape: tuple[int, ...]) -> bool:
    """A bulk linear layer's weight ("q.weight", "experts.3.up.weight", "shared.down.weight", ...)."""
    if not local.endswith(".weight") or len(shape) != 2:
        return False
    return local[: -len(".weight")].rsplit(".", 1)[-1] not in KEEP_DENSE


def safe(scale: torch.Tensor) -> torch.Tensor:
    """The scale to divide by: 1 where it is 0 (an all-zero row or group quantizes to zeros)."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


class Int8Format(WeightFormat):
    name = "int8"
    qmax = 127
    scale_dtype = torch.float32  # 4 bytes per row of K bytes: free, and no rounding of the scale

    def compresses(self, local, shape):
        return quantizable(local, tuple(shape))

    def stored(self, local, shape, dtype):
        if not self.compresses(local, shape):
            return super().stored(local, shape, dtype)
        n, k = shape
        return [(f"{local}.q8", (n, k), torch.int8), (f"{local}.scale", (n, 1), self.scale_dtype)]

    def encode(self, local, tensor, dtype):
        if not self.compresses(local, tuple(tensor.shape)):
            return super().encode(local, tensor, dtype)
        t = tensor.float()
        scale = (t.abs().amax(dim=1, keepdim=True) / self.qmax).to(self.scale_dtype)
        if not torch.isfinite(scale).all():
            raise ValueError(f"{local}: weights too large (or not finite) for {self.name} scales")
        q = torch.round(t / safe(scale.float())).clamp_(-self.qmax, self.qmax)
        return {f"{local}.q8": q.to(torch.int8), f"{local}.scale": scale}

    def dequantize(self, w: Mapping[str, torch.Tensor], local: str, dtype: torch.dtype) -> torch.Tensor:
        """The weight `local` ("q.weight") back in `dtype`: q * scale in float32, rounded once."""
        return (w[f"{local}.q8"].float() * w[f"{local}.scale"].float()).to(dtype)

    def linear(self, x, w, name):
        if f"{name}.weight.q8" not in w:
            return super().linear(x, w, name)
        return F.linear(x, self.dequantize(w, f"{name}.weight", x.dtype), w.get(f"{name}.bias"))


INT8 = register_format(Int8Format())
