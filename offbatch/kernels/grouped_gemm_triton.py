"""Grouped GEMM for MoE experts (module-based batching): every expert over all of its tokens, one launch.

The engine routes a whole micro-batch, sorts the token rows by expert and runs each expert that got
tokens once. Groups are ragged (some empty, some with thousands of rows) and several groups may share
one weight slot. The contract is in offbatch/kernels/reference.py, whose torch twins have the same
signatures.

Tile schedule, on the device: the grid is an upper bound on the number of output tiles,
(cdiv(T, BLOCK_M) + G) * cdiv(N, BLOCK_N), since each group adds at most one partial row tile. Each
program loads all G+1 offsets as one vector, counts the tiles per group, and finds its group with a
cumulative sum, so the host never reads the group sizes (no sync) and autotuning may vary BLOCK_M.
Programs past the real tile count return at once. Within a group the row tile varies fastest, so the
programs running together share one weight tile in L2: weights are the big operand in MoE layers.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from offbatch.kernels.reference import check_grouped_args

# Read once, like @triton.jit itself does: decides between autotuned and fixed small blocks.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Under the interpreter every program is numpy: keep tiles at the tl.dot minimum.
_INTERPRETER_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=warps, num_stages=stages)


# Measured on an H200 (Mixtral shapes, bf16): few rows per group stream weights at the HBM rate with
# a thin M tile and deep K pipelining; from ~256 rows per group 128x256 tiles win (~500 TFLOP/s).
_SMALL = [_config(16, 64, 256, 4, 4), _config(16, 128, 128, 4, 4), _config(16, 64, 128, 4, 6), _config(32, 128, 128, 4, 4)]
_MEDIUM = [_config(64, 128, 64, 4, 4), _config(128, 128, 64, 8, 4), _config(128, 256, 64, 8, 4), _config(64, 256, 64, 8, 4)]
_LARGE = [_config(128, 256, 64, 8, 3), _config(128, 256, 64, 8, 4), _config(128, 128, 128, 8, 3), _config(256, 128, 64, 8, 3)]
# The fused gate/up kernel holds two accumulators: tiles half as wide.
_SMALL_GATED = [_config(16, 64, 128, 4, 4), _config(16, 64, 256, 4, 3), _config(16, 32, 256, 4, 4), _config(32, 64, 128, 4, 4)]
_MEDIUM_GATED = [_config(64, 128, 64, 4, 4), _config(128, 128, 64, 8, 3), _config(64, 128, 64, 8, 4), _config(64, 64, 64, 4, 4)]
_LARGE_GATED = [_config(128, 128, 64, 8, 3), _config(128, 128, 64, 8, 4), _config(128, 128, 32, 8, 5), _config(64, 256, 64, 8, 3)]
# fp32 takes the slow exact-fp32 dot: not an engine path, so one modest tile (large ones spill).
_FP32 = [_config(64, 64, 32, 4, 3)]


def _rows_hint(T: int, G: int) -> int:
    """Mean rows per group as a power of two in [16, 1024]: the autotune key's size bucket."""
    mean = max(1, T // max(G, 1))
    return min(1024, max(16, triton.next_power_of_2(mean)))


def _size_class(rows_hint: int, small, medium, large):
    """The tiles for a mean group size: thin for few rows per expert, wide for many."""
    return small if rows_hint <= 32 else medium if rows_hint <= 128 else large


def _pick_configs(small, medium, large):
    def prune(configs, named_args, **kwargs):
        if named_args["x_ptr"].dtype == torch.float32:
            wanted = _FP32
        else:
            wanted = _size_class(named_args["ROWS_HINT"], small, medium, large)
        kept = [c for c in configs if c in wanted]
        return kept or configs

    return prune


@triton.jit(do_not_specialize=["G", "ROWS_HINT"])
def _grouped_gemm_kernel(
    x_ptr, w_ptr, w2_ptr, y_ptr, offsets_ptr, slots_ptr,
    N, K, G, ROWS_HINT,
    stride_xm, stride_xk,
    stride_ws, stride_wn, stride_wk,
    stride_w2s, stride_w2n, stride_w2k,
    stride_ym, stride_yn,
    G_POW2: tl.constexpr, GATED: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)

    # --- which (group, row tile, column tile) this program owns
    g_idx = tl.arange(0, G_POW2)
    g_valid = g_idx < G
    starts = tl.load(offsets_ptr + g_idx, mask=g_valid, other=0)
    ends = tl.load(offsets_ptr + g_idx + 1, mask=g_valid, other=0)
    rows = tl.maximum(ends - starts, 0)
    m_tiles = (rows + BLOCK_M - 1) // BLOCK_M
    tiles = m_tiles * tl.cdiv(N, BLOCK_N)
    tiles_end = tl.cumsum(tiles, 0)
    if pid >= tl.sum(tiles, 0):
        return
    g = tl.sum((tiles_end <= pid).to(tl.int32), 0)  # first group whose tiles end after pid
    mine = g_idx == g
    row_start = tl.sum(tl.where(mine, starts, 0), 0)
    g_rows = tl.sum(tl.where(mine, rows, 0), 0)
    g_m_tiles = tl.sum(tl.where(mine, m_tiles, 0), 0)
    local = pid - tl.sum(tl.where(mine, tiles_end - tiles, 0), 0)
    m_tile = local % g_m_tiles
    n_tile = local // g_m_tiles
    slot = tl.load(slots_ptr + g).to(tl.int64)

    # --- main loop. Row and column indices wrap inside the group / matrix so that loads need no
    # M or N masks; the wrapped rows and columns are computed and dropped at the store.
    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = (row_start + offs_m % g_rows).to(tl.int64)
    w_cols = offs_n % N
    x_ptrs = x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + slot * stride_ws + w_cols[None, :] * stride_wn + offs_k[:, None] * stride_wk
    w2_ptrs = w2_ptr + slot * stride_w2s + w_cols[None, :] * stride_w2n + offs_k[:, None] * stride_w2k
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if GATED:
            if EVEN_K:
                b2 = tl.load(w2_ptrs)
            else:
                b2 = tl.load(w2_ptrs, mask=k_ok[:, None], other=0.0)
            acc2 = tl.dot(a, b2, acc2, input_precision=PRECISION)
            w2_ptrs += BLOCK_K * stride_w2k
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # --- epilogue: silu(gate) * up in fp32 for the gated variant, one rounding, masked store
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc2
    y_rows = (row_start + offs_m).to(tl.int64)
    y_ptrs = y_ptr + y_rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_mask = (offs_m < g_rows)[:, None] & (offs_n < N)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def _bench_in_place(fn, quantiles=None, reps: int = 5):
    """Autotuning's timer, without triton.testing.do_bench's 256 MiB L2-flush buffer: that buffer is an
    allocation the plan does not know of, and under a tight --gpu-memory cap it fails."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end) / reps
    return [ms] * len(quantiles) if quantiles else ms


# By default each size class runs its first (measured best) tile: no tuning in the middle of a job
# (each tuning compiles and times four variants per shape bucket, seconds of a run's first steps).
# OFFBATCH_AUTOTUNE=1 tunes among the class's tiles instead (kernel benchmarks).
AUTOTUNE = os.environ.get("OFFBATCH_AUTOTUNE", "0") == "1"
_even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
_AUTOTUNE_KEY = ["N", "K", "ROWS_HINT", "G_POW2"]


def _tuned(small, medium, large):
    """The kernel autotuned among one size-class table's tiles (and the fp32 ones)."""
    return triton.autotune(configs=small + medium + large + _FP32, key=_AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": _pick_configs(small, medium, large)},
                           do_bench=_bench_in_place)(_even_k(_grouped_gemm_kernel))


_plain_kernel = _tuned(_SMALL, _MEDIUM, _LARGE)
_gated_kernel = _tuned(_SMALL_GATED, _MEDIUM_GATED, _LARGE_GATED)
_fixed_kernel = _even_k(_grouped_gemm_kernel)


def _fixed_config(gated: bool, rows_hint: int, dtype: torch.dtype) -> triton.Config:
    if dtype == torch.float32:
        return _FP32[0]
    classes = (_SMALL_GATED, _MEDIUM_GATED, _LARGE_GATED) if gated else (_SMALL, _MEDIUM, _LARGE)
    return _size_class(rows_hint, *classes)[0]


def _launch(x, w, w2, group_offsets, group_slots, out):
    T, K = x.shape
    N = w.shape[1]
    G = group_slots.numel()
    if not INTERPRETED and not x.is_cuda:
        raise ValueError("the Triton grouped GEMM needs CUDA tensors (or TRITON_INTERPRET=1); "
                         "offbatch.kernels dispatches CPU tensors to the torch twin")
    y = out if out is not None else x.new_empty(T, N)
    if T == 0 or N == 0 or G == 0:
        return y
    gated = w2 is not None
    w2 = w if w2 is None else w2
    args = (
        x, w, w2, y, group_offsets, group_slots,
        N, K, G, _rows_hint(T, G),
        x.stride(0), x.stride(1),
        w.stride(0), w.stride(1), w.stride(2),
        w2.stride(0), w2.stride(1), w2.stride(2),
        y.stride(0), y.stride(1),
    )  # fmt: skip
    meta = dict(
        G_POW2=max(16, triton.next_power_of_2(G)),
        GATED=gated,
        # fp32 inputs get true fp32 products (like torch.matmul by default), not TF32.
        PRECISION="ieee" if x.dtype == torch.float32 else None,
    )

    def grid(m):
        return ((triton.cdiv(T, m["BLOCK_M"]) + G) * triton.cdiv(N, m["BLOCK_N"]),)

    if INTERPRETED:
        _fixed_kernel[grid](*args, **meta, **_INTERPRETER_BLOCKS)
    elif AUTOTUNE:
        kernel = _gated_kernel if gated else _plain_kernel
        with torch.cuda.device(x.device):
            kernel[grid](*args, **meta)
    else:
        cfg = _fixed_config(gated, args[9], x.dtype)
        with torch.cuda.device(x.device):
            _fixed_kernel[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def grouped_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[rows of g] = x[rows of g] @ w[group_slots[g]].T for every group g, in one launch.

    x [T, K], w [S, N, K], group_offsets int32 [G+1], group_slots int32 [G] -> y [T, N] in x's
    dtype with fp32 accumulation. Any strides are accepted (e.g. gate/up halves of one stacked
    tensor). Offsets and slots on the GPU are trusted, not read back (see check_grouped_args).
    """
    check_grouped_args(x, (w,), group_offsets, group_slots, out)
    return _launch(x, w, None, group_offsets, group_slots, out)


def grouped_swiglu(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """h[rows of g] = silu(x_g @ w_gate[s].T) * (x_g @ w_up[s].T), s = group_slots[g], in one launch.

    Both products share each loaded x tile and the [T, 2N] intermediate never reaches memory;
    the engine follows with grouped_gemm(h, w_down, ...).
    """
    check_grouped_args(x, (w_gate, w_up), group_offsets, group_slots, out)
    return _launch(x, w_gate, w_up, group_offsets, group_slots, out)
