"""The dense format: every tensor stored as it is computed with, in the compute dtype (bf16, fp16 or
fp32); `linear` is F.linear, and the
experts of a MoE layer run through the grouped kernels on strided views of their bank."""

from __future__ import annotations

from offbatch.formats.base import WeightFormat, register_format


class DenseFormat(WeightFormat):
    name = "dense"
    grouped_experts = True

    def grouped_swiglu(self, kernels, x, stacks, offsets, slots):
        return kernels.grouped_swiglu(x, stacks["gate.weight"], stacks["up.weight"], offsets, slots)

    def grouped_gemm(self, kernels, a, stacks, offsets, slots):
        return kernels.grouped_gemm(a, stacks["down.weight"], offsets, slots)


DENSE = register_format(DenseFormat())
