"""Triton kernel gathering rows of a matrix by index (contract and torch twin: offbatch/kernels/rows_reference.py).

Its point is a `src` in pinned host memory: the GPU's programs read the chosen rows over the bus in place
(pinned memory is mapped into the device's address space), so a sparse set of rows - the cold FFN neurons
a step's tokens need (offbatch/ffn/hybrid.py) - crosses without the host threads gathering them first and
without a round trip through the host. One program copies one BLOCK-wide stretch of one row; rows are
long (a neuron's row is the hidden size), so each program's reads are contiguous.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from offbatch.kernels.rows_reference import check_rows_args

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _gather_rows_kernel(src_ptr, idx_ptr, out_ptr, C, stride_s, stride_o, BLOCK: tl.constexpr):
    """out[r, cols] = src[idx[r], cols] for one row r and one stretch of columns. Grid: (rows, stretches)."""
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < C
    row = tl.load(idx_ptr + r).to(tl.int64)
    v = tl.load(src_ptr + row * stride_s + cols, mask=ok)
    tl.store(out_ptr + r.to(tl.int64) * stride_o + cols, v, mask=ok)


def gather_rows(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    check_rows_args(src, idx, out)
    n, C = idx.numel(), src.shape[1]
    if out is None:
        out = torch.empty(n, C, dtype=src.dtype, device=idx.device)
    if n == 0:
        return out[:0]
    if not INTERPRETED and src.device.type == "cpu" and not src.is_pinned():
        raise ValueError("gather_rows: a host src must be pinned for the GPU to read it")
    block = min(2048, triton.next_power_of_2(C))
    grid = (n, triton.cdiv(C, block))
    _gather_rows_kernel[grid](src, idx, out, C, src.stride(0), out.stride(0), BLOCK=block,
                              num_warps=8 if block >= 1024 else 4)
    return out[:n]
