"""What the integer formats (int4.py, int8.py) share: computing through offbatch.kernels. A linear layer with
few rows runs the fused dequant-GEMM, more rows expand the weight into a compute-dtype scratch for cuBLAS;
MoE experts likewise, through the fused grouped kernels or expanded into the dense grouped ones. On the
CPU the torch twin (`dequantize` + F.linear). A subclass says how its stored tensors form a weight and which
kernels take them."""

from __future__ import annotations

import torch.nn.functional as F

from offbatch.formats.base import WeightFormat
from offbatch.kernels import FUSE_MAX_ROWS


class KernelFormat(WeightFormat):
    values = ""  # the suffix of a compressed weight's values tensor (".q4")
    expands = True
    fused_rows = FUSE_MAX_ROWS  # few rows: the fused dequant-GEMM; more: expanded + the dense GEMM
    grouped_experts = True  # the grouped kernels take each weight's stored tensors as [experts, ...] stacks

    # ---- what a subclass provides ------------------------------------------------------------------------
    def weight(self, tensors, weight: str) -> tuple:
        """(values, scale, minimum or None) of the weight `weight` ("q.weight") among stored tensors."""
        raise NotImplementedError

    def fused_linear(self, kernels, x, weight: tuple, bias):
        raise NotImplementedError

    def expand(self, kernels, weight: tuple, k: int, dtype):
        """The weight (or a stack of them) in `dtype`, its first k inputs."""
        raise NotImplementedError

    def fused_grouped(self, kernels, x, weights: tuple, offsets, slots):
        """SwiGLU over (gate, up) or the plain GEMM over (down,) through the fused grouped kernels."""
        raise NotImplementedError

    # ---- shared -----------------------------------------------------------------------------------------
    def linear(self, x, w, name):
        if f"{name}.weight{self.values}" not in w:
            return super().linear(x, w, name)
        if x.is_cuda:
            return self.kernel_linear(x, w, name)
        return F.linear(x, self.dequantize(w, f"{name}.weight", x.dtype, x.shape[-1]), w.get(f"{name}.bias"))

    def kernel_linear(self, x, w, name):
        """linear through offbatch.kernels (Triton on the GPU; the interpreter or the twins elsewhere)."""
        from offbatch import kernels

        weight, bias = self.weight(w, f"{name}.weight"), w.get(f"{name}.bias")
        if kernels.should_fuse(x.numel() // x.shape[-1], weight[0].shape[0], x.shape[-1]):
            return self.fused_linear(kernels, x, weight, bias)
        return F.linear(x, self.expand(kernels, weight, x.shape[-1], x.dtype), bias)

    def grouped_swiglu(self, kernels, x, stacks, offsets, slots):
        return self._grouped(kernels, x, stacks, offsets, slots, ("gate.weight", "up.weight"))

    def grouped_gemm(self, kernels, a, stacks, offsets, slots):
        return self._grouped(kernels, a, stacks, offsets, slots, ("down.weight",))

    def _grouped(self, kernels, x, stacks, offsets, slots, names):
        if x.shape[0] > FUSE_MAX_ROWS * slots.numel():  # rows per expert, on average
            return self.grouped_expanded(kernels, x, stacks, offsets, slots, names)
        return self.fused_grouped(kernels, x, tuple(self.weight(stacks, n) for n in names), offsets, slots)

    def expand_stack(self, kernels, stacks, weight, rows, k, dtype):
        picked = tuple(None if t is None else t[rows] for t in self.weight(stacks, weight))
        return self.expand(kernels, picked, k, dtype)
