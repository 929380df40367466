"""The bitmap formats (Endor's sparse layout): a pruned linear weight W [N, K] stored as one bit per
element saying whether it is kept, and the kept values packed in column order.

- "bitmap-50" (a sparsity in whole percent, 1 to 99): "<w>.bits" uint8 [N, ceil(K / 8)] (bit j % 8 of
  byte j // 8, least significant first: column j kept) and "<w>.nz" [N, C] in bfloat16, each row's kept
  values in column order, C = K - round(K * sparsity). bfloat16 whatever the model's dtype: a stored
  tensor's dtype must follow from the format alone (a folder runs in any compute dtype, its stored bytes
  streamed as they are), and bfloat16 holds any weight's range (an fp16 model's kept values lose 3 bits);
- "bitmap-50-int8": the kept values as int8, symmetric, one float32 scale per row ("<w>.scale" [N, 1]: the
  row's largest kept |W| / 127), formats/int8.py's arithmetic: the bytes multiply down (0.31 of bf16's at 50%);
- "bitmap-50-int4": the kept values [N, C] as formats/int4.py's int4-asym-g32 stores a weight ("<w>.nz.q4",
  "<w>.nz.scale", "<w>.nz.min": groups of 32 consecutive kept values of a row): 0.22 of bf16's at 50%.

Every row keeps the same number of values. A module is placed, streamed and held in slots whose size is
known from its shapes alone (formats/base.py's packing rule), so the count cannot depend on the data;
per-row pruning (Wanda's own rule, and magnitude pruning done per row) gives that count exactly. Which
values a row keeps is decided when the weight is encoded: the C largest in magnitude. A weight pruned
beforehand (tools/prune.py: Wanda's scores, zeros where pruned) keeps exactly its non-zeros that way.

Which weights are stored sparse: the bulk linear layers, as int8/int4 (formats/int8.py `quantizable`).
On a GPU the weight is expanded into a compute-dtype scratch by a Triton kernel (kernels/bitmap_triton.py)
before the dense GEMM; the torch twin (`dequantize`) is the same copy in plain torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from offbatch.formats.base import WeightFormat, register_family
from offbatch.formats.int4 import Int4Format
from offbatch.formats.int8 import divided, quantizable, safe


VALUES_DTYPE = torch.bfloat16
# Rows encoded at once. Every step of the encoding is row by row (a row's kept values, its bitmap, its int8
# scale, its int4 groups), so a weight is encoded in row blocks: its transient index and count tensors (int64,
# 8 bytes an element) then stay within a block's, not a whole Llama-3-70B FFN weight's 2 GB each.
ENCODE_ROWS = 4096


class _Int4Values(Int4Format):
    """int4-asym-g32 over a row's kept values (any [N, C] tensor, not only a linear layer's weight)."""

    def compresses(self, local, shape):
        return len(shape) == 2


INT4_VALUES = _Int4Values(group=32, asymmetric=True, name="int4-asym-g32 (bitmap values)")


def kept_per_row(k: int, sparsity: float) -> int:
    """Values a row of k inputs keeps at `sparsity`."""
    return k - int(round(k * sparsity))


class BitmapFormat(WeightFormat):
    expands = True
    fused_rows = 0  # no fused sparse GEMM: every use expands first
    # The expansion kernel (kernels/bitmap_triton.py) streams at 0.18-0.20 of HBM on the H200, about twice the
    # int4 formats' whole cost around their dequantization (BENCHMARKS.md has the runs it was checked on).
    expand_efficiency = 0.2
    expert_expand_efficiency = 0.2  # the same kernel for experts (not measured on experts apart)

    def __init__(self, percent: int, values: str = "bf16"):
        if not 1 <= percent <= 99:
            raise ValueError(f"a bitmap format prunes 1 to 99 percent of the weights, not {percent}")
        if values not in ("bf16", "int8", "int4"):
            raise ValueError(f"bitmap values are bf16, int8 or int4, not {values!r}")
        self.percent, self.values_kind = percent, values
        self.int8_values = values == "int8"
        self.sparsity = percent / 100
        self.name = f"bitmap-{percent}" + ("" if values == "bf16" else f"-{values}")

    def compresses(self, local, shape):
        return quantizable(local, tuple(shape))

    def kept_values(self, k: int) -> int:
        """Values a row of k inputs keeps."""
        return kept_per_row(k, self.sparsity)

    def stored(self, local, shape, dtype):
        if not self.compresses(local, shape):
            return super().stored(local, shape, dtype)
        n, k = shape
        bits = (f"{local}.bits", (n, -(-k // 8)), torch.uint8)
        c = self.kept_values(k)
        if self.int8_values:
            return [bits, (f"{local}.nz", (n, c), torch.int8), (f"{local}.scale", (n, 1), torch.float32)]
        if self.values_kind == "int4":
            return [bits, *INT4_VALUES.stored(f"{local}.nz", (n, c), dtype)]
        return [bits, (f"{local}.nz", (n, c), VALUES_DTYPE)]

    def encode(self, local, tensor, dtype):
        if not self.compresses(local, tuple(tensor.shape)):
            return super().encode(local, tensor, dtype)
        n = tensor.shape[0]
        if n <= ENCODE_ROWS:
            return self._encode_rows(local, tensor, dtype)
        parts = [self._encode_rows(local, tensor[a : a + ENCODE_ROWS], dtype) for a in range(0, n, ENCODE_ROWS)]
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}

    def _encode_rows(self, local, tensor, dtype):
        from offbatch.kernels.bitmap_reference import bitmap_pack

        n, k = tensor.shape
        c = self.kept_values(k)
        t = tensor.float()
        keep = torch.zeros(n, k, dtype=torch.bool, device=t.device)
        if c:
            # The c largest in magnitude per row, chosen on the weight as given.
            idx = t.abs().topk(c, dim=1, sorted=False).indices
            keep.scatter_(1, idx, True)
        bits, values = bitmap_pack(t, keep, c)
        if self.values_kind == "int4":
            return {f"{local}.bits": bits, **INT4_VALUES.encode(f"{local}.nz", values, dtype)}
        if not self.int8_values:
            return {f"{local}.bits": bits, f"{local}.nz": values.to(VALUES_DTYPE)}
        v = values.float()
        scale = divided(v.abs().amax(dim=1, keepdim=True), 127)
        if not torch.isfinite(scale).all():
            raise ValueError(f"{local}: weights too large (or not finite) for {self.name} scales")
        q = torch.round(v / safe(scale)).clamp_(-127, 127).to(torch.int8)
        return {f"{local}.bits": bits, f"{local}.nz": q, f"{local}.scale": scale}

    def values(self, w: Mapping[str, torch.Tensor], local: str, dtype: torch.dtype) -> torch.Tensor:
        """The kept values [N, C] in `dtype` (int8 values: times their row's scale in float32, rounded once)."""
        if self.values_kind == "int4":
            q4 = w[f"{local}.nz.q4"]
            if q4.is_cuda:
                from offbatch import kernels

                weight = INT4_VALUES.weight(w, f"{local}.nz")
                return kernels.dequant_int4(*weight, INT4_VALUES.group, q4.shape[1] * 2, dtype)
            return INT4_VALUES.dequantize(w, f"{local}.nz", dtype)
        v = w[f"{local}.nz"]
        if not self.int8_values:
            return v  # bfloat16: the expansion converts each value once
        return (v.float() * w[f"{local}.scale"]).to(dtype)

    def dequantize(self, w: Mapping[str, torch.Tensor], local: str, dtype: torch.dtype,
                   in_features: int | None = None) -> torch.Tensor:
        from offbatch.kernels.bitmap_reference import bitmap_expand

        bits = w[f"{local}.bits"]
        k = in_features if in_features is not None else bits.shape[1] * 8
        return bitmap_expand(bits, self.values(w, local, dtype), k, dtype)

    def linear(self, x, w, name):
        bits = w.get(f"{name}.weight.bits")
        if bits is None:
            return super().linear(x, w, name)
        if x.is_cuda:
            from offbatch import kernels

            dense = kernels.bitmap_expand(bits, self.values(w, f"{name}.weight", x.dtype), x.shape[-1], x.dtype)
        else:
            dense = self.dequantize(w, f"{name}.weight", x.dtype, x.shape[-1])
        return F.linear(x, dense, w.get(f"{name}.bias"))


def parse_bitmap(name: str) -> BitmapFormat | None:
    """"bitmap-50": half of each bulk weight's values pruned; "bitmap-50-int8" / "-int4": the kept ones in
    int8 / int4."""
    m = re.fullmatch(r"bitmap-(\d{1,2})(?:-(int8|int4))?", name)
    if m is None or not 1 <= int(m.group(1)) <= 99:
        return None
    return BitmapFormat(int(m.group(1)), m.group(2) or "bf16")


register_family(parse_bitmap)
