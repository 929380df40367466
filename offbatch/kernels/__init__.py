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


__all__ = ["backend", "grouped_gemm", "grouped_swiglu"]
