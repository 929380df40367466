"""The int4 formats: each linear layer's weight W [N, K] in groups of `group` consecutive inputs of a row
(along K), 4-bit values packed two per byte, and float16 numbers per group:

- symmetric ("int4", "int4-g32", ...): one scale per group, W ~ (q - 8) * scale, scale = max|W| / 7,
  q in [1, 15] (0, i.e. -8, decodes too: GGUF Q4_0 blocks use it);
- asymmetric ("int4-asym", ...): a scale and a minimum per group, W ~ q * scale + min,
  scale = (max - min) / 15, q in [0, 15] (GGUF Q4_1's arithmetic: its blocks map on exactly).

Stored per weight: "<w>.q4" uint8 [N, Kp / 2] (byte j of a row: input 2j in its low nibble, 2j+1 in its
high one), "<w>.scale" float16 [N, Kp / group] and, asymmetric, "<w>.min" likewise. Kp is K rounded up to
a whole group: a K that is not a multiple of the group is padded (the pads repeat the row's last value, so
they leave the last group's range alone) and the pads are cut off again at `dequantize`, which takes K
from the input's width. Which weights are quantized: as int8 (formats/int8.py `quantizable`).

The torch twin (`dequantize`, `linear`) defines the arithmetic a fused kernel must reproduce: nibbles,
scales and minimums to float32, combined, rounded once to the compute dtype, then the GEMM.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from offbatch.formats.base import register_family, register_format
from offbatch.formats.quantized import KernelFormat
from offbatch.formats.int8 import divided, quantizable, safe

DEFAULT_GROUP = 64


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 values in [0, 15], [N, 2M] -> [N, M], two per byte (even index in the low nibble)."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    """[N, M] uint8 -> [N, 2M] values in [0, 15]."""
    return torch.stack((b & 15, b >> 4), dim=-1).reshape(b.shape[0], -1)


class Int4Format(KernelFormat):
    scale_dtype = torch.float16  # 2 bytes per group of `group` / 2 bytes: ~1/3.8 of bf16 at group 64
    values = ".q4"

    def __init__(self, group: int = DEFAULT_GROUP, asymmetric: bool = False, name: str | None = None):
        if group <= 0 or group % 2:
            raise ValueError(f"an int4 group holds an even number of inputs, not {group}")
        self.group, self.asymmetric = group, asymmetric
        default = "int4" + ("-asym" if asymmetric else "") + ("" if group == DEFAULT_GROUP else f"-g{group}")
        self.name = name or default

    def compresses(self, local, shape):
        return quantizable(local, tuple(shape))

    def groups(self, k: int) -> int:
        return -(-k // self.group)

    def stored(self, local, shape, dtype):
        if not self.compresses(local, shape):
            return super().stored(local, shape, dtype)
        n, k = shape
        g = self.groups(k)
        out = [(f"{local}.q4", (n, g * self.group // 2), torch.uint8), (f"{local}.scale", (n, g), self.scale_dtype)]
        if self.asymmetric:
            out.append((f"{local}.min", (n, g), self.scale_dtype))
        return out

    def encode(self, local, tensor, dtype):
        if not self.compresses(local, tuple(tensor.shape)):
            return super().encode(local, tensor, dtype)
        n, k = tensor.shape
        g = self.groups(k)
        t = tensor.float()
        if g * self.group > k:
            t = torch.cat([t, t[:, -1:].expand(n, g * self.group - k)], dim=1)
        t = t.reshape(n, g, self.group)
        if self.asymmetric:
            lo = t.amin(dim=-1)
            scale, low = divided(t.amax(dim=-1) - lo, 15).to(self.scale_dtype), lo.to(self.scale_dtype)
            q = torch.round((t - low.float()[..., None]) / safe(scale.float())[..., None]).clamp_(0, 15)
        else:
            scale, low = divided(t.abs().amax(dim=-1), 7).to(self.scale_dtype), None
            q = torch.round(t / safe(scale.float())[..., None]).clamp_(-8, 7) + 8
        if not torch.isfinite(scale).all() or (low is not None and not torch.isfinite(low).all()):
            raise ValueError(f"{local}: weights too large (or not finite) for {self.name}'s float16 scales")
        out = {f"{local}.q4": pack_nibbles(q.to(torch.uint8).view(n, -1)), f"{local}.scale": scale}
        if low is not None:
            out[f"{local}.min"] = low
        return out

    def dequantize(self, w: Mapping[str, torch.Tensor], local: str, dtype: torch.dtype,
                   in_features: int | None = None) -> torch.Tensor:
        """The weight `local` ("q.weight") back in `dtype`, its first in_features inputs (default: all,
        pads included): in float32, rounded once."""
        scale = w[f"{local}.scale"].float()
        n, g = scale.shape
        q = unpack_nibbles(w[f"{local}.q4"]).float().view(n, g, self.group)
        if self.asymmetric:
            t = q * scale[..., None] + w[f"{local}.min"].float()[..., None]
        else:
            t = (q - 8) * scale[..., None]
        return t.view(n, g * self.group)[:, :in_features].to(dtype)

    # ---- computing through offbatch.kernels (formats/quantized.py) --------------------------------------
    def weight(self, tensors, weight):
        return tensors[f"{weight}.q4"], tensors[f"{weight}.scale"], tensors.get(f"{weight}.min")

    def fused_linear(self, kernels, x, weight, bias):
        return kernels.int4_linear(x, *weight, self.group, bias)

    def expand(self, kernels, weight, k, dtype):
        return kernels.dequant_int4(*weight, self.group, k, dtype)

    def fused_grouped(self, kernels, x, weights, offsets, slots):
        if len(weights) == 2:
            return kernels.grouped_swiglu_int4(x, *weights, offsets, slots, self.group)
        return kernels.grouped_gemm_int4(x, weights[0], offsets, slots, self.group)


def parse_int4(name: str) -> Int4Format | None:
    """"int4", "int4-asym", "int4-g32", "int4-asym-g128": a group of 32 to 1024 inputs."""
    m = re.fullmatch(r"int4(-asym)?(?:-g(\d+))?", name)
    if m is None or (m.group(2) is not None and not (32 <= int(m.group(2)) <= 1024 and int(m.group(2)) % 32 == 0)):
        return None
    fmt = Int4Format(int(m.group(2) or DEFAULT_GROUP), asymmetric=m.group(1) is not None)
    return fmt if fmt.name == name else None  # one name per format ("int4-g64" is "int4")


register_family(parse_int4)
INT4 = register_format(Int4Format())
INT4_ASYM = register_format(Int4Format(asymmetric=True))
