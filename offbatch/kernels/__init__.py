"""Triton kernels, each with a plain-torch twin of the same signature (offbatch/kernels/reference.py).

Call the kernels through this module: it runs the Triton version when the tensors are on CUDA (or when
TRITON_INTERPRET=1, so tests can run Triton on the CPU) and the torch twin otherwise. The Triton
modules are imported lazily: importing offbatch.kernels never compiles or decorates anything, so a
later TRITON_INTERPRET setting still takes effect, and machines without Triton keep working.

Triton modules are named NAME_triton.py, never after a function exported here: importing a submodule
sets the package attribute of the same name, which would replace the dispatching function.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os

import torch

from offbatch.kernels import reference

_HAVE_TRITON = importlib.util.find_spec("triton") is not None


def backend(x: torch.Tensor) -> str:
    """'triton' or 'torch': which implementation a kernel called on `x` runs."""
    if not _HAVE_TRITON:
        return "torch"
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or x.is_cuda:
        return "triton"
    return "torch"


def _impl(module: str, name: str, x: torch.Tensor):
    if backend(x) == "triton":
        return getattr(importlib.import_module(f"offbatch.kernels.{module}"), name)
    return getattr(reference, name)


def grouped_gemm(x, w, group_offsets, group_slots, out=None):
    """y[rows of g] = x[rows of g] @ w[group_slots[g]].T; see offbatch/kernels/reference.py."""
    return _impl("grouped_gemm_triton", "grouped_gemm", x)(x, w, group_offsets, group_slots, out)


def grouped_swiglu(x, w_gate, w_up, group_offsets, group_slots, out=None):
    """h[rows of g] = silu(x_g @ w_gate[s].T) * (x_g @ w_up[s].T); see offbatch/kernels/reference.py."""
    return _impl("grouped_gemm_triton", "grouped_swiglu", x)(x, w_gate, w_up, group_offsets, group_slots, out)


def warm_up_grouped(hidden: int, inter: int, dtype: torch.dtype, device, groups: int = 2) -> int:
    """Run both grouped kernels once per tile class (few, some and many rows per group) and row-count
    parity (Triton specializes integer arguments that are multiples of 16), with an expert's shapes,
    so that a timed run does not compile them in its first steps (seconds each on a fresh process).
    Returns the number of launches."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    gate, up = (torch.randn(groups, inter, hidden, device=device, generator=g).to(dtype) / hidden ** 0.5 for _ in "gu")
    down = torch.randn(groups, hidden, inter, device=device, generator=g).to(dtype) / inter ** 0.5
    slots = torch.arange(groups, dtype=torch.int32, device=device)
    launches = 0
    for rows in (16, 64, 512):  # the small, medium and large tile classes (rows per group)
        for extra in (0, 1):
            sizes = [rows] * groups
            sizes[-1] += extra
            offsets = torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.int32, device=device)
            x = torch.randn(sum(sizes), hidden, device=device, generator=g).to(dtype)
            h = grouped_swiglu(x, gate, up, offsets, slots)
            grouped_gemm(h, down, offsets, slots)
            launches += 2
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return launches


__all__ = ["backend", "grouped_gemm", "grouped_swiglu", "warm_up_grouped"]
