"""Triton kernels moving rows by index between the device and pinned host memory (contracts and torch twins:
offbatch/kernels/rows_reference.py).

gather_rows: its point is a `src` in pinned host memory: the GPU's programs read the chosen rows over the bus
in place (pinned memory is mapped into the device's address space), so a sparse set of rows - the cold FFN
neurons a step's tokens need (offbatch/ffn/hybrid.py) - crosses without the host threads gathering them first
and without a round trip through the host. One program copies one BLOCK-wide stretch of one row; rows are
long (a neuron's row is the hidden size), so each program's reads are contiguous.

scatter_tokens: the other direction: a decode step's new K/V rows written by the GPU into host KV's pinned
pages (offbatch/attention/wave.py), one program per row and head.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from offbatch.kernels.rows_reference import check_rows_args, check_scatter_args

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


@triton.jit
def _scatter_tokens_kernel(src_ptr, slots_ptr, pos_ptr, dst_ptr, C, stride_sn, stride_sh,
                           stride_ds, stride_dh, stride_dp, BLOCK: tl.constexpr):
    """dst[slots[j], h, pos[j], cols] = src[j, h, cols] for one row j, head h and stretch of columns.
    Grid: (rows, heads, stretches)."""
    j = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < C
    slot = tl.load(slots_ptr + j).to(tl.int64)
    p = tl.load(pos_ptr + j).to(tl.int64)
    v = tl.load(src_ptr + j * stride_sn + h * stride_sh + cols, mask=ok)
    tl.store(dst_ptr + slot * stride_ds + h * stride_dh + p * stride_dp + cols, v, mask=ok)


def scatter_tokens(src: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Row j of src into dst[slots[j], :, pos[j]]; a pinned host dst is written in place by the GPU."""
    check_scatter_args(src, slots, pos, dst)
    n, H, C = src.shape
    if n == 0:
        return dst
    if not INTERPRETED and dst.device.type == "cpu" and not dst.is_pinned():
        raise ValueError("scatter_tokens: a host dst must be pinned for the GPU to write it")
    block = min(1024, triton.next_power_of_2(C))
    grid = (n, H, triton.cdiv(C, block))
    _scatter_tokens_kernel[grid](src, slots, pos, dst, C, src.stride(0), src.stride(1), dst.stride(0), dst.stride(1),
                                 dst.stride(2), BLOCK=block, num_warps=1 if block <= 128 else 4)
    return dst
