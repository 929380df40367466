"""Triton kernels, each with a plain-torch twin of the same signature (offbatch/kernels/reference.py;
quant_reference.py for the quantized-weight kernels of quant_triton.py).

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

from offbatch.kernels import reference  # first: it gathers quant_reference's twins too
from offbatch.kernels import quant_reference
from offbatch.kernels import kv_reference
from offbatch.kernels import bitmap_reference

_HAVE_TRITON = importlib.util.find_spec("triton") is not None


def backend(x: torch.Tensor) -> str:
    """'triton' or 'torch': which implementation a kernel called on `x` runs."""
    if not _HAVE_TRITON:
        return "torch"
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or x.is_cuda:
        return "triton"
    return "torch"


def _impl(module: str, name: str, x: torch.Tensor, twins=reference):
    if backend(x) == "triton":
        return getattr(importlib.import_module(f"offbatch.kernels.{module}"), name)
    return getattr(twins, name)


def _quant(name: str, x: torch.Tensor):
    return _impl("quant_triton", name, x, quant_reference)


def grouped_gemm(x, w, group_offsets, group_slots, out=None):
    """y[rows of g] = x[rows of g] @ w[group_slots[g]].T; see offbatch/kernels/reference.py."""
    return _impl("grouped_gemm_triton", "grouped_gemm", x)(x, w, group_offsets, group_slots, out)


def grouped_swiglu(x, w_gate, w_up, group_offsets, group_slots, out=None):
    """h[rows of g] = silu(x_g @ w_gate[s].T) * (x_g @ w_up[s].T); see offbatch/kernels/reference.py."""
    return _impl("grouped_gemm_triton", "grouped_swiglu", x)(x, w_gate, w_up, group_offsets, group_slots, out)


# ---- quantized weights (offbatch/formats/int4.py, int8.py): see quant_reference.py for the contracts ------
# Micro-batches of at most this many rows (per expert, for grouped experts) multiply through the fused
# dequant-GEMM; larger ones expand the weight into a compute-dtype scratch and call cuBLAS or the dense
# grouped kernel. The crossover measured on the H200 (scripts/bench_quant_kernels.py, BENCHMARKS.md):
# 16-32 rows for the Mixtral and Llama-3-8B shapes. The formats' planner terms use it too.
FUSE_MAX_ROWS = 32


def should_fuse(m: int, n: int, k: int) -> bool:
    return m <= FUSE_MAX_ROWS


def dequant_int4(q4, scale, minimum, group, k, dtype, out=None):
    return _quant("dequant_int4", q4)(q4, scale, minimum, group, k, dtype, out)


def dequant_int8(q8, scale, dtype, out=None, k=None):
    return _quant("dequant_int8", q8)(q8, scale, dtype, out, k)


def int4_linear(x, q4, scale, minimum, group, bias=None):
    return _quant("int4_linear", x)(x, q4, scale, minimum, group, bias)


def int8_linear(x, q8, scale, bias=None):
    return _quant("int8_linear", x)(x, q8, scale, bias)


def grouped_swiglu_int4(x, w_gate, w_up, group_offsets, group_slots, group, out=None):
    return _quant("grouped_swiglu_int4", x)(x, w_gate, w_up, group_offsets, group_slots, group, out)


def grouped_gemm_int4(x, w, group_offsets, group_slots, group, out=None):
    return _quant("grouped_gemm_int4", x)(x, w, group_offsets, group_slots, group, out)


def grouped_swiglu_int8(x, w_gate, w_up, group_offsets, group_slots, out=None):
    return _quant("grouped_swiglu_int8", x)(x, w_gate, w_up, group_offsets, group_slots, out)


def grouped_gemm_int8(x, w, group_offsets, group_slots, out=None):
    return _quant("grouped_gemm_int8", x)(x, w, group_offsets, group_slots, out)


# Bitmap-sparse (pruned) weights: bits + kept values -> dense; see bitmap_reference.py for the layout.
def bitmap_expand(bits, values, k, dtype, out=None):
    return _impl("bitmap_triton", "bitmap_expand", values, bitmap_reference)(bits, values, k, dtype, out)


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


__all__ = ["FUSE_MAX_ROWS", "backend", "bitmap_expand", "gather_rows", "dequant_int4", "dequant_int8", "grouped_gemm",
           "grouped_gemm_int4", "grouped_gemm_int8", "grouped_swiglu", "grouped_swiglu_int4", "grouped_swiglu_int8",
           "int4_linear", "int8_linear", "should_fuse", "warm_up_grouped"]


# ---- compressed KV (offbatch/offload/kv.py's packed formats): see kv_reference.py for the contracts ---------
def kv_encode(x, bits, group):
    return _impl("kv_triton", "kv_encode", x, kv_reference)(x, bits, group)


def kv_decode_attention(q, k, v, k_len, bits=16, group=0, window_start=None):
    return _impl("kv_triton", "kv_decode_attention", q, kv_reference)(q, k, v, k_len, bits, group, window_start)


# ---- rows of a matrix by index (a pinned host src read in place by the GPU): see rows_reference.py ---------
from offbatch.kernels import rows_reference  # noqa: E402


def gather_rows(src, idx, out=None):
    """out[:n] = src[idx]; on a GPU (out/idx on CUDA) the Triton kernel reads a pinned host src over the bus."""
    return _impl("rows_triton", "gather_rows", idx, rows_reference)(src, idx, out)


def scatter_tokens(src, slots, pos, dst):
    """dst[slots[j], :, pos[j]] = src[j]; on a GPU (src on CUDA) the Triton kernel writes a pinned host dst in
    place over the bus."""
    return _impl("rows_triton", "scatter_tokens", src, rows_reference)(src, slots, pos, dst)
