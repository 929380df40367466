"""Plain-torch twins of the Triton kernels: same signatures, same contract, no Triton.

They are the correctness oracle for the kernels and the path the engine takes on machines without
CUDA. Loops over groups are fine here; clarity beats speed.

Grouped-GEMM contract (shared with offbatch/kernels/grouped_gemm_triton.py):
  x             [T, K]     rows already sorted by group (fp16, bf16 or fp32)
  w             [S, N, K]  a stack of weight slots, nn.Linear layout: group g computes x_g @ w[slot].T
  group_offsets int32 [G+1] rows of group g are group_offsets[g]:group_offsets[g+1] (non-decreasing,
                          within [0, T]; groups may be empty)
  group_slots   int32 [G]  which slot of w group g uses (slots may be shared by several groups)
  out           [T, N]     optional output buffer in x's dtype; rows outside every group are left as
                          they were (and are undefined when `out` is None)
Products accumulate in fp32 and are rounded once to x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GEMM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_grouped_args(
    x: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
    out: torch.Tensor | None,
    check_values: bool = False,
) -> None:
    """Raise TypeError/ValueError when the arguments break the grouped-GEMM contract.

    Shapes, dtypes and devices are always checked. The values of group_offsets/group_slots are
    checked when they live on the CPU or when `check_values` is set: reading them from a GPU costs a
    host sync on the hot path, so there the kernel trusts the caller (the engine builds them from its
    own counts).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [T, K], got {_shape(x)}")
    if x.dtype not in GEMM_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    T, K = x.shape
    first = weights[0]
    for w in weights:
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            raise ValueError(f"weights must be 3-D tensors [S, N, K], got {_shape(w)}")
        if w.shape != first.shape:
            raise ValueError(f"paired weights differ in shape: {tuple(first.shape)} vs {tuple(w.shape)}")
        if w.shape[2] != K:
            raise ValueError(f"weight stack {tuple(w.shape)} does not match x's K={K}")
        if w.dtype != x.dtype:
            raise TypeError(f"weights are {w.dtype} but x is {x.dtype}; convert one of them first")
        if w.device != x.device:
            raise ValueError(f"weights are on {w.device} but x is on {x.device}")
    S, N = first.shape[0], first.shape[1]
    for name, t in (("group_offsets", group_offsets), ("group_slots", group_slots)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor, got {_shape(t)}")
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if group_offsets.numel() != group_slots.numel() + 1:
        raise ValueError(
            f"group_offsets must have one more entry than group_slots, got "
            f"{group_offsets.numel()} and {group_slots.numel()}"
        )
    if out is not None:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (T, N):
            raise ValueError(f"out must have shape {(T, N)}, got {_shape(out)}")
        if out.dtype != x.dtype:
            raise TypeError(f"out must be {x.dtype} like x, got {out.dtype}")
        if out.device != x.device:
            raise ValueError(f"out is on {out.device} but x is on {x.device}")
    if (check_values or group_offsets.device.type == "cpu") and group_slots.numel() > 0:
        offsets = group_offsets.tolist()
        if offsets[0] < 0 or offsets[-1] > T or any(a > b for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"group_offsets must be non-decreasing within [0, {T}], got {offsets}")
        lo, hi = int(group_slots.min()), int(group_slots.max())
        if lo < 0 or hi >= S:
            raise ValueError(f"group_slots must lie in [0, {S}), got values in [{lo}, {hi}]")


def _shape(t: object) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _group_products(x, weights, group_offsets, group_slots):
    """Yield (row range, [fp32 products with each weight]) per non-empty group."""
    offsets = group_offsets.tolist()
    slots = group_slots.tolist()
    for g, slot in enumerate(slots):
        start, end = offsets[g], offsets[g + 1]
        if end > start:
            xg = x[start:end].float()
            yield start, end, [xg @ w[slot].float().T for w in weights]


def grouped_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[rows of g] = x[rows of g] @ w[group_slots[g]].T for every group g."""
    check_grouped_args(x, (w,), group_offsets, group_slots, out, check_values=True)
    y = out if out is not None else x.new_empty(x.shape[0], w.shape[1])
    for start, end, (prod,) in _group_products(x, (w,), group_offsets, group_slots):
        y[start:end] = prod.to(y.dtype)
    return y


def grouped_swiglu(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """h[rows of g] = silu(x_g @ w_gate[s].T) * (x_g @ w_up[s].T), s = group_slots[g].

    The first half of a gated expert (Mixtral w1/w3, Qwen/OLMoE gate_proj/up_proj); the engine then
    runs grouped_gemm(h, w_down, ...). silu and the product are taken in fp32 before one rounding.
    """
    check_grouped_args(x, (w_gate, w_up), group_offsets, group_slots, out, check_values=True)
    h = out if out is not None else x.new_empty(x.shape[0], w_gate.shape[1])
    for start, end, (gate, up) in _group_products(x, (w_gate, w_up), group_offsets, group_slots):
        h[start:end] = (F.silu(gate) * up).to(h.dtype)
    return h


# The quantized-weight twins (quant_reference.py), so that this module stands for every kernel where the
# engine runs the twins (the CPU); imported last: quant_reference reads this module's GEMM_DTYPES.
from offbatch.kernels.quant_reference import (  # noqa: E402,F401
    dequant_int4, dequant_int8, grouped_gemm_int4, grouped_gemm_int8, grouped_swiglu_int4, grouped_swiglu_int8,
    int4_linear, int8_linear)
