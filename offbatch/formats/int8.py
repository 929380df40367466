"""The int8 formats: each linear layer's weight W [N, K] as int8 values q, symmetric (no zero point):
W ~ q * scale, scale = max|W| / 127 over the scale's inputs, q in [-127, 127] (-128 decodes too: GGUF Q8_0
blocks may hold it).

- "int8": one float32 scale per output row, "<w>.q8" int8 [N, K], "<w>.scale" float32 [N, 1];
- "int8-g32" (a group of 32 to 1024): one float16 scale per group of `group` consecutive inputs of a row,
  "<w>.q8" int8 [N, Kp], "<w>.scale" float16 [N, Kp / group] (GGUF Q8_0's arithmetic: its blocks map on
  exactly); Kp is K rounded up to whole groups, the pads repeat the row's last value and are cut off at
  `dequantize` (as int4's).

Only the linear layers' 2-D weights that carry the model's bulk are quantized: attention q/k/v/o, the
FFN's gate/up/down, every routed expert's and the shared expert's. The router and the shared-expert gate
(tiny, and a rounding error there changes which experts a token goes to), the norms, the biases, the
embedding and the output head (`lm_head` - the head reads it directly, not through `linear`) stay dense
in the compute dtype.

The torch twin (`dequantize`, `linear`) defines the arithmetic a fused kernel must reproduce: values and
scales to float32, multiplied, rounded once to the compute dtype, then the GEMM.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from offbatch.formats.base import register_family, register_format
from offbatch.formats.quantized import KernelFormat

KEEP_DENSE = ("router", "shared_gate")  # linear layers whose weights are never quantized


def quantizable(local: str, shape: tuple[int, ...]) -> bool:
    """A bulk linear layer's weight ("q.weight", "experts.3.up.weight", "shared.down.weight", ...)."""
    if not local.endswith(".weight") or len(shape) != 2:
        return False
    return local[: -len(".weight")].rsplit(".", 1)[-1] not in KEEP_DENSE


def divided(t: torch.Tensor, d: float) -> torch.Tensor:
    """t / d, rounded as IEEE division on every device. CUDA turns a division by a Python number into a
    multiplication by its reciprocal, which rounds differently: scales (and so codes) encoded on a GPU differed
    from the CPU's; divided by a tensor on t's device, both divide."""
    return t / torch.full((), d, dtype=t.dtype, device=t.device)


def safe(scale: torch.Tensor) -> torch.Tensor:
    """The scale to divide by: 1 where it is 0 (an all-zero row or group quantizes to zeros)."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


class Int8Format(KernelFormat):
    qmax = 127
    values = ".q8"

    def __init__(self, group: int | None = None):
        """group None: a float32 scale per row (4 bytes per row of K bytes: free, and no rounding of the
        scale); else float16 scales per group of `group` inputs."""
        if group is not None and (group <= 0):
            raise ValueError(f"an int8 group holds a positive number of inputs, not {group}")
        self.group = group
        self.scale_dtype = torch.float32 if group is None else torch.float16
        self.name = "int8" if group is None else f"int8-g{group}"

    def compresses(self, local, shape):
        return quantizable(local, tuple(shape))

    def width(self, k: int) -> int:
        """Stored inputs per row: K, or K rounded up to whole groups."""
        return k if self.group is None else -(-k // self.group) * self.group

    def stored(self, local, shape, dtype):
        if not self.compresses(local, shape):
            return super().stored(local, shape, dtype)
        n, k = shape
        kp = self.width(k)
        groups = 1 if self.group is None else kp // self.group
        return [(f"{local}.q8", (n, kp), torch.int8), (f"{local}.scale", (n, groups), self.scale_dtype)]

    def encode(self, local, tensor, dtype):
        if not self.compresses(local, tuple(tensor.shape)):
            return super().encode(local, tensor, dtype)
        n, k = tensor.shape
        t = tensor.float()
        kp = self.width(k)
        if kp > k:
            t = torch.cat([t, t[:, -1:].expand(n, kp - k)], dim=1)
        t = t.reshape(n, -1, kp if self.group is None else self.group)
        scale = divided(t.abs().amax(dim=-1), self.qmax).to(self.scale_dtype)
        if not torch.isfinite(scale).all():
            raise ValueError(f"{local}: weights too large (or not finite) for {self.name} scales")
        q = torch.round(t / safe(scale.float())[..., None]).clamp_(-self.qmax, self.qmax)
        return {f"{local}.q8": q.to(torch.int8).view(n, kp), f"{local}.scale": scale}

    def dequantize(self, w: Mapping[str, torch.Tensor], local: str, dtype: torch.dtype,
                   in_features: int | None = None) -> torch.Tensor:
        """The weight `local` ("q.weight") back in `dtype`, its first in_features inputs (default: all):
        q * scale in float32, rounded once."""
        q, scale = w[f"{local}.q8"], w[f"{local}.scale"].float()
        n, kp = q.shape
        t = q.float().view(n, scale.shape[1], -1) * scale[..., None]
        return t.view(n, kp)[:, :in_features].to(dtype)

    # ---- computing through offbatch.kernels (formats/quantized.py) --------------------------------------
    def weight(self, tensors, weight):
        return tensors[f"{weight}.q8"], tensors[f"{weight}.scale"], None

    def fused_linear(self, kernels, x, weight, bias):
        return kernels.int8_linear(x, *weight[:2], bias)

    def expand(self, kernels, weight, k, dtype):
        return kernels.dequant_int8(*weight[:2], dtype, k=k)

    def fused_grouped(self, kernels, x, weights, offsets, slots):
        if len(weights) == 2:
            return kernels.grouped_swiglu_int8(x, *weights, offsets, slots)
        return kernels.grouped_gemm_int8(x, weights[0], offsets, slots)


def parse_int8(name: str) -> Int8Format | None:
    """"int8-g32" ... "int8-g1024" (groups of a multiple of 32 inputs)."""
    m = re.fullmatch(r"int8-g(\d+)", name)
    if m is None or not (32 <= int(m.group(1)) <= 1024 and int(m.group(1)) % 32 == 0):
        return None
    return Int8Format(int(m.group(1)))


register_family(parse_int8)
INT8 = register_format(Int8Format())
