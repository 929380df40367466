"""Triton kernel expanding a bitmap-sparse weight (bits uint8 [N, KB], values [N, C]) into a dense
[N, k] matrix; the layout and the torch twin are in offbatch/kernels/bitmap_reference.py (same signature,
bit-exact results: the expansion is a copy).

Design: a kept column's value index is the number of kept columns before it in its row, a prefix count,
so a program owns whole rows (BLOCK_N of them) and walks their columns left to right in chunks of BLOCK_K,
carrying each row's running count across chunks: per chunk it loads the bit bytes, unpacks them,
`tl.cumsum`s them along the chunk (count + cumsum - 1 is each kept column's index), gathers those values
and stores the dense chunk. Only the count crosses chunks, so the walk is one pass over bits and values.
To fill the GPU when rows are few, a row's columns can be split into SPLITS segments walked by separate
programs; each segment's starting count is the popcount of the bytes before it (bits are 1/16 of the
dense bf16 bytes, so re-reading them is cheap, and mostly from L2).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from offbatch.kernels import bitmap_reference as ref

# Read once, like @triton.jit itself does.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _bitmap_expand_kernel(
    bits_ptr, values_ptr, y_ptr,
    N, K, C, SEG,
    stride_bn, stride_bk, stride_vn, stride_vc, stride_yn, stride_yk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFIX_BYTES: tl.constexpr,
):  # fmt: skip
    """y[rows, start:end] of BLOCK_N rows, columns start = split * SEG .. min(start + SEG, K) (SEG a
    multiple of 8). Grid: (row blocks, splits)."""
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    r64 = rows.to(tl.int64)
    b_row = bits_ptr + r64 * stride_bn
    v_row = values_ptr + r64 * stride_vn
    y_row = y_ptr + r64 * stride_yn
    start = split * SEG
    end = tl.minimum(start + SEG, K)

    # Values the rows keep before this segment: popcount of their first start / 8 bytes (SWAR, per byte).
    count = tl.zeros([BLOCK_N], dtype=tl.int32)
    pre = start // 8
    for j0 in range(0, pre, PREFIX_BYTES):
        j = j0 + tl.arange(0, PREFIX_BYTES)
        b = tl.load(b_row[:, None] + j[None, :] * stride_bk, mask=row_ok[:, None] & (j < pre)[None, :], other=0)
        b = b.to(tl.int32)
        b = b - ((b >> 1) & 0x55)
        b = (b & 0x33) + ((b >> 2) & 0x33)
        b = (b + (b >> 4)) & 0x0F
        count += tl.sum(b, axis=1)

    offs = tl.arange(0, BLOCK_K)
    for c0 in range(start, end, BLOCK_K):
        c = c0 + offs
        m = row_ok[:, None] & (c < end)[None, :]
        # The 8 columns of a byte load the same address (one transaction): simpler than a reshape.
        byte = tl.load(b_row[:, None] + (c // 8)[None, :] * stride_bk, mask=m, other=0).to(tl.int32)
        kept = (byte >> (c % 8)[None, :]) & 1  # 0 past `end`: masked loads
        idx = count[:, None] + tl.cumsum(kept, axis=1) - 1
        take = m & (kept != 0) & (idx < C)  # idx < C: a malformed bitmap reads no further than values
        v = tl.load(v_row[:, None] + idx.to(tl.int64) * stride_vc, mask=take, other=0.0)
        tl.store(y_row[:, None] + c[None, :].to(tl.int64) * stride_yk, v.to(y_ptr.dtype.element_ty), mask=m)
        count += tl.sum(kept, axis=1)


# Under the interpreter every op costs about the same whatever its tile's size: large tiles, few steps.
INTERPRETER_BLOCKS = dict(block_n=16, block_k=64)
# Compiled: 8 rows x 256 columns a step (2048 outputs, 16 a thread at 4 warps; a bf16 row chunk is one
# 512-byte run), to be confirmed by scripts/bench_bitmap_kernel.py (--block-n / --block-k / --splits).
GPU_BLOCKS = dict(block_n=8, block_k=256)
PROGRAMS_PER_SM = 16  # splits are added until the grid has this many programs per SM ...
MIN_CHUNKS_PER_SPLIT = 4  # ... each segment walking at least this many chunks
PREFIX_BYTES = 256  # bytes per row a step of the prefix popcount


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _require_device(t: torch.Tensor) -> None:
    if not INTERPRETED and not t.is_cuda:
        raise ValueError("the Triton bitmap kernel needs CUDA tensors (or TRITON_INTERPRET=1); "
                         "offbatch.kernels dispatches CPU tensors to the torch twin")


def _cuda_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _splits(n_blocks: int, k: int, block_k: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    chunks = triton.cdiv(k, block_k)
    want = triton.cdiv(PROGRAMS_PER_SM * _sm_count(device.index or 0), n_blocks)
    return max(1, min(want, chunks // MIN_CHUNKS_PER_SPLIT))


def launch(bits, values, k: int, y: torch.Tensor, block_n: int, block_k: int, splits: int | None = None,
           num_warps: int = 4) -> torch.Tensor:
    """Run the kernel into y [N, k] with explicit tiles (the bench and the tests pick them; arguments
    already checked). splits: segments per row (None: enough to fill the GPU)."""
    if block_k % 8 or block_k & (block_k - 1) or block_n & (block_n - 1):
        raise ValueError(f"block_n {block_n} and block_k {block_k} must be powers of two, block_k >= 8")
    n = bits.shape[0]
    if y.numel() == 0:
        return y
    if values.shape[1] == 0:  # nothing kept anywhere (and no values to point at)
        return y.zero_()
    n_blocks = triton.cdiv(n, block_n)
    if splits is None:
        splits = _splits(n_blocks, k, block_k, bits.device)
    seg = triton.cdiv(triton.cdiv(k, max(1, splits)), block_k) * block_k  # whole chunks: a multiple of 8
    grid = (n_blocks, triton.cdiv(k, seg))  # every segment non-empty
    with _cuda_guard(bits):
        _bitmap_expand_kernel[grid](bits, values, y, n, k, values.shape[1], seg,
                                    *bits.stride(), *values.stride(), *y.stride(),
                                    BLOCK_N=block_n, BLOCK_K=block_k, PREFIX_BYTES=PREFIX_BYTES,
                                    num_warps=num_warps)
    return y


def bitmap_expand(bits, values, k: int, dtype: torch.dtype, out=None) -> torch.Tensor:
    """bits uint8 [N, KB], values [N, C] -> W [N, k] in `dtype`, bit-exact with
    bitmap_reference.bitmap_expand."""
    ref.check_args(bits, values, k, dtype, out)
    _require_device(bits)
    y = out if out is not None else torch.empty(bits.shape[0], k, dtype=dtype, device=bits.device)
    return launch(bits, values, k, y, **(INTERPRETER_BLOCKS if INTERPRETED else GPU_BLOCKS))


__all__ = ["GPU_BLOCKS", "INTERPRETED", "INTERPRETER_BLOCKS", "bitmap_expand", "launch"]
