"""Triton kernels for the int4 and int8 weight formats (offbatch/formats/int4.py, int8.py): expand a weight
into a scratch buffer, or multiply by it with the dequantization fused into the GEMM. The torch twins, the
stored layouts and the arithmetic are in offbatch/kernels/quant_reference.py (same signatures).

- `dequant_int4`, `dequant_int8`: packed weight [.., N, ..] -> dense [.., N, k] in the compute dtype,
  bit-exact with the twin; for large micro-batches (then cuBLAS or the dense grouped kernel multiplies).
- `int4_linear`, `int8_linear`: x @ W.T (+ bias) for few rows (decode steps, small waves): the weight
  crosses HBM once, packed; split-K fills the GPU when the output has few tiles.
- `grouped_swiglu_int4`, `grouped_gemm_int4` (and int8): MoE experts as in grouped_gemm_triton.py (one
  launch per chunk of experts, its group offsets / slots contract and tile schedule) with quantized
  [S, N, ..] stacks, e.g. strided views into a bank (`WeightFormat.expert_stacks`).
- `should_fuse(m, n, k)`: whether the fused kernel or dequant-to-scratch + GEMM serves m rows.

How a weight tile is expanded in registers: the packed bytes of a tile of W.T are loaded as they lie
(byte j of a row: inputs 2j, 2j+1), and since x @ W.T = x[:, 0::2] @ Wlo.T + x[:, 1::2] @ Whi.T the low
and high nibbles are two dot operands against x's even and odd columns: no interleaving shuffle. A nibble
becomes a float32 by OR-ing it into the mantissa of 2**23 and subtracting 2**23 (exact, and cheaper than
an integer-to-float conversion); then q * scale (+ minimum) in float32, one rounding to the compute dtype,
the MMA accumulating in float32. BLOCK_K divides the group where a power of two >= 32 does, so a tile's
scales are one vector; other groups gather a scale per input.

Exactness: the dequant kernels equal the twin bit for bit (FMA contraction off). The GEMM kernels let
Triton contract q * scale + minimum into an FMA on the GPU; with float16 scales (what the formats store)
the product is exact in float32, so the FMA rounds exactly like the twin's two operations.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from offbatch.kernels import FUSE_MAX_ROWS, should_fuse  # noqa: F401  (re-exported for the bench)
from offbatch.kernels import quant_reference as ref

# Read once, like @triton.jit itself does.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Fused kernel or dequant + GEMM. The split path writes and rereads a dense copy of the weight: in bf16
# 4 bytes per weight against the fused kernel's ~0.53 packed ones. That pays only once the GEMM itself
# dominates, i.e. once the fused kernel's slower MMA schedule (thin row tiles, the weight re-expanded per
# row tile) costs more than the copy's traffic: 2*m*n*k*(1/(e*R) - 1/R) > 4*n*k/B, m > 2*e*R/((1-e)*B).
# With R ~ 800 TFLOP/s (bf16 GEMM), B ~ 4.8 TB/s (HBM) and the fused kernel at e ~ 0.3-0.5 of cuBLAS's
# rate: m ~ 140-330. The threshold (offbatch.kernels.FUSE_MAX_ROWS) takes the smaller end;
# scripts/bench_quant_kernels.py measures the crossover.
# (imported from the package, which the formats' planner terms read without importing Triton)


# ---------------------------------------------------------------------------------------------- jit parts
# A tile of W.T covers inputs k0 .. k0 + BLOCK_K of BLOCK_N outputs. Its stored values are a
# [BLOCK_K * BITS / 8, BLOCK_N] tile (int4: byte j holds inputs 2j and 2j + 1; int8: one input a byte).

@triton.jit
def _exact_float(i, OFFSET: tl.constexpr):
    """int32 values 0 <= i < 2**23 -> i - OFFSET as float32, exactly (i OR-ed into 2**23's mantissa)."""
    return (i | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def _per_group(base, k0, SG, stride_g, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-group numbers (scales, minimums) of the tile at k0 as float32; base: the [BLOCK_N] pointers of
    the columns' first groups. One [1, BLOCK_N] row when GROUP is 0 (one group a row) or the tile lies in
    one group; else gathered per stored value, [BLOCK_K * BITS / 8, BLOCK_N] (an int4 byte's two inputs
    share a group: groups are even)."""
    if GROUP == 0:
        v = tl.load(base)[None, :]
    elif GROUP % BLOCK_K == 0:
        v = tl.load(base + tl.minimum(k0 // GROUP, SG - 1) * stride_g)[None, :]  # past SG: zeroed inputs only
    else:
        g = (k0 + (8 // BITS) * tl.arange(0, BLOCK_K * BITS // 8)) // GROUP
        v = tl.load(base[None, :] + g[:, None] * stride_g, mask=(g < SG)[:, None], other=0.0)
    return v.to(tl.float32)


@triton.jit
def _expand(q_ptrs, s_base, m_base, k0, KP, SG, stride_sg, stride_mg,
            BITS: tl.constexpr, ASYM: tl.constexpr, GROUP: tl.constexpr, W_MASK: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """The tile at k0 from its stored values at q_ptrs, float32, with the twin's arithmetic. int4: two
    [BLOCK_K / 2, BLOCK_N] tiles, inputs k0 + 2j (low nibbles) and k0 + 2j + 1 (high); int8: the
    [BLOCK_K, BLOCK_N] tile, twice."""
    if W_MASK:  # the tile reaches past the stored row (KP inputs)
        j = k0 * BITS // 8 + tl.arange(0, BLOCK_K * BITS // 8)
        b = tl.load(q_ptrs, mask=(j < KP * BITS // 8)[:, None], other=0)
    else:
        b = tl.load(q_ptrs)
    b = b.to(tl.int32)  # int8 sign-extends, uint8 zero-extends
    scale = _per_group(s_base, k0, SG, stride_sg, BITS, GROUP, BLOCK_K)
    if BITS == 8:
        lo = ((b + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0) * scale  # 2**23 + 128 + q, exact
        hi = lo
    elif ASYM:
        low = _per_group(m_base, k0, SG, stride_mg, BITS, GROUP, BLOCK_K)
        lo = _exact_float(b & 15, 0) * scale + low
        hi = _exact_float(b >> 4, 0) * scale + low
    else:
        lo = _exact_float(b & 15, 8) * scale
        hi = _exact_float(b >> 4, 8) * scale
    return lo, hi


@triton.jit
def _x_tiles(x_ptrs, k0, K, BITS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """x's inputs k0 .. k0 + BLOCK_K (x_ptrs: a [BLOCK_M, BLOCK_K] tile's), zeros past K, loaded whole;
    int4: split into the even inputs and the odd ones; int8: the tile, twice."""
    if EVEN_K:
        a = tl.load(x_ptrs)
    else:
        a = tl.load(x_ptrs, mask=(k0 + tl.arange(0, BLOCK_K) < K)[None, :], other=0.0)
    b = a
    if BITS == 4:
        a, b = tl.split(tl.reshape(a, (a.shape[0], BLOCK_K // 2, 2)))
    return a, b


@triton.jit
def _dot_expanded(acc, xa, xb, q_ptrs, s_base, m_base, k0, KP, SG, stride_sg, stride_mg,
                  BITS: tl.constexpr, ASYM: tl.constexpr, GROUP: tl.constexpr, W_MASK: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + x tile @ W tile.T, W rounded to x's dtype first (int4: the even and the odd inputs' dots)."""
    lo, hi = _expand(q_ptrs, s_base, m_base, k0, KP, SG, stride_sg, stride_mg, BITS, ASYM, GROUP, W_MASK, BLOCK_K)
    acc = tl.dot(xa, lo.to(xa.dtype), acc, input_precision=PRECISION)
    if BITS == 4:
        acc = tl.dot(xb, hi.to(xb.dtype), acc, input_precision=PRECISION)
    return acc


# ------------------------------------------------------------------------------------------ dequant kernel

@triton.jit
def _dequant_kernel(
    q_ptr, s_ptr, m_ptr, y_ptr,
    N, K, KP, SG,
    stride_qs, stride_qn, stride_qk, stride_ss, stride_sn, stride_sg, stride_ms, stride_mn, stride_mg,
    stride_ys, stride_yn, stride_yk,
    BITS: tl.constexpr, ASYM: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y[s, n, k] = W[s, n, k] for a [BLOCK_N, BLOCK_K] tile; grid (N tiles, K tiles, stack rows)."""
    pid_n, pid_k, s = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n % N  # W.T's columns, wrapped so that loads need no N mask
    k0 = pid_k * BLOCK_K
    j = k0 * BITS // 8 + tl.arange(0, BLOCK_K * BITS // 8)
    q_ptrs = q_ptr + s * stride_qs + cols[None, :] * stride_qn + j[:, None] * stride_qk
    lo, hi = _expand(q_ptrs, s_ptr + s * stride_ss + cols * stride_sn, m_ptr + s * stride_ms + cols * stride_mn,
                     k0, KP, SG, stride_sg, stride_mg, BITS, ASYM, GROUP, True, BLOCK_K)
    if BITS == 4:  # pairs of W.T rows -> W's [BLOCK_N, BLOCK_K] rows, inputs 2j and 2j + 1 side by side
        w = tl.reshape(tl.permute(tl.join(lo, hi), (1, 0, 2)), (BLOCK_N, BLOCK_K))
    else:
        w = tl.trans(lo)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    ptrs = y_ptr + s * stride_ys + offs_n[:, None] * stride_yn + offs_k[None, :] * stride_yk
    tl.store(ptrs, w.to(y_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])


# --------------------------------------------------------------------------------------------- GEMM kernel

@triton.jit(do_not_specialize=["M", "NG", "K_SPLIT"])  # a decode step's row count varies: one compile
def _quant_gemm_kernel(
    x_ptr, y_ptr, bias_ptr, offsets_ptr, slots_ptr,
    q_ptr, s_ptr, m_ptr, q2_ptr, s2_ptr, m2_ptr,
    M, N, K, KP, SG, NG, K_SPLIT,
    stride_xm, stride_xk, stride_ys, stride_ym, stride_yn,
    stride_qs, stride_qn, stride_qk, stride_ss, stride_sn, stride_sg, stride_ms, stride_mn, stride_mg,
    stride_q2s, stride_q2n, stride_q2k, stride_s2s, stride_s2n, stride_s2g, stride_m2s, stride_m2n, stride_m2g,
    GROUPED: tl.constexpr, NG_POW2: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BITS: tl.constexpr, ASYM: tl.constexpr, GROUP: tl.constexpr, EVEN_K: tl.constexpr, W_MASK: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y = x @ W.T (+ bias) over all of x's rows, or per expert group (GROUPED: x's rows offsets[g] ..
    offsets[g+1] against stack row slots[g], the schedule of grouped_gemm_triton.py); GATED: silu(x @
    W.T) * (x @ W2.T). Grid: (output tiles, K splits); split s sums inputs s*K_SPLIT .. (s+1)*K_SPLIT
    into y[s] (a float32 workspace when there are several)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)

    # --- which (group, row tile, column tile) this program owns; within a group the row tile varies
    # fastest, so the programs running together share one weight tile in L2.
    n_tiles = tl.cdiv(N, BLOCK_N)
    if GROUPED:
        g_idx = tl.arange(0, NG_POW2)
        g_valid = g_idx < NG
        starts = tl.load(offsets_ptr + g_idx, mask=g_valid, other=0)
        ends = tl.load(offsets_ptr + g_idx + 1, mask=g_valid, other=0)
        rows_per = tl.maximum(ends - starts, 0)
        m_tiles = (rows_per + BLOCK_M - 1) // BLOCK_M
        tiles = m_tiles * n_tiles
        tiles_end = tl.cumsum(tiles, 0)
        total = tl.sum(tiles, 0)
    else:
        total = tl.cdiv(M, BLOCK_M) * n_tiles
    if pid >= total:
        return
    if GROUPED:
        g = tl.sum((tiles_end <= pid).to(tl.int32), 0)  # first group whose tiles end after pid
        mine = g_idx == g
        row_start = tl.sum(tl.where(mine, starts, 0), 0)
        g_rows = tl.sum(tl.where(mine, rows_per, 0), 0)
        g_m_tiles = tl.sum(tl.where(mine, m_tiles, 0), 0)
        local = pid - tl.sum(tl.where(mine, tiles_end - tiles, 0), 0)
        slot = tl.load(slots_ptr + g).to(tl.int64)
    else:
        row_start = 0
        g_rows = M
        g_m_tiles = tl.cdiv(M, BLOCK_M)
        local = pid
        slot = 0
    m_tile = local % g_m_tiles
    n_tile = local // g_m_tiles

    # --- pointers of the first tile. Rows and columns wrap inside the group / matrix so that loads need
    # no M or N masks; the wrapped ones are computed and dropped at the store.
    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (row_start + offs_m % g_rows).to(tl.int64)
    cols = offs_n % N
    k_start = tl.multiple_of(split * K_SPLIT, BLOCK_K)  # K_SPLIT is whole tiles: vectorized, aligned loads
    k_end = tl.minimum(k_start + K_SPLIT, K)
    stored = k_start * BITS // 8 + tl.arange(0, BLOCK_K * BITS // 8)  # stored values of the first tile
    x_ptrs = x_ptr + rows[:, None] * stride_xm + (k_start + tl.arange(0, BLOCK_K))[None, :] * stride_xk
    q_ptrs = q_ptr + slot * stride_qs + cols[None, :] * stride_qn + stored[:, None] * stride_qk
    s_base = s_ptr + slot * stride_ss + cols * stride_sn
    m_base = m_ptr + slot * stride_ms + cols * stride_mn
    q2_ptrs = q2_ptr + slot * stride_q2s + cols[None, :] * stride_q2n + stored[:, None] * stride_q2k
    s2_base = s2_ptr + slot * stride_s2s + cols * stride_s2n
    m2_base = m2_ptr + slot * stride_m2s + cols * stride_m2n

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        xa, xb = _x_tiles(x_ptrs, k0, K, BITS, EVEN_K, BLOCK_K)
        acc = _dot_expanded(acc, xa, xb, q_ptrs, s_base, m_base, k0, KP, SG, stride_sg, stride_mg,
                            BITS, ASYM, GROUP, W_MASK, PRECISION, BLOCK_K)
        if GATED:
            acc2 = _dot_expanded(acc2, xa, xb, q2_ptrs, s2_base, m2_base, k0, KP, SG, stride_s2g, stride_m2g,
                                 BITS, ASYM, GROUP, W_MASK, PRECISION, BLOCK_K)
            q2_ptrs += (BLOCK_K * BITS // 8) * stride_q2k
        x_ptrs += BLOCK_K * stride_xk
        q_ptrs += (BLOCK_K * BITS // 8) * stride_qk

    # --- epilogue in float32, one rounding, masked store
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc2
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    y_rows = (row_start + offs_m).to(tl.int64)
    y_ptrs = y_ptr + split * stride_ys + y_rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_mask = (offs_m < g_rows)[:, None] & (offs_n < N)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _split_sum_kernel(ws_ptr, bias_ptr, y_ptr, SPLITS, M, N, stride_ym, stride_yn,
                      HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y = the sum over s of ws[s] (+ bias), in split order (deterministic), rounded once; ws [S, M, N]."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=ok, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + (offs // N) * stride_ym + n * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=ok)


# ------------------------------------------------------------------------------------------------ tiles

class Tiles(NamedTuple):
    """A launch's BLOCK_M, BLOCK_N, BLOCK_K, num_warps and num_stages."""

    m: int
    n: int
    k: int
    warps: int
    stages: int


# Chosen by reasoning about the H200, to be confirmed by scripts/bench_quant_kernels.py (--sweep): few
# rows stream the packed weight, so the row tile is as thin as tl.dot allows and each program keeps
# several KB of weight bytes in flight (deep pipelines; BLOCK_K * num_stages is kept where a small group
# forces a shorter BLOCK_K). The expanded float32 tiles live in registers (int4: two [BLOCK_K / 2,
# BLOCK_N] tiles), which bounds BLOCK_K * BLOCK_N per warp. Rows per call (linear) or mean rows per group
# (grouped) pick the class: (most rows, tiles).
LINEAR_TILES = [(16, Tiles(16, 64, 128, 4, 4)), (32, Tiles(32, 64, 128, 4, 4)), (64, Tiles(64, 128, 64, 8, 4)),
                (1 << 62, Tiles(128, 128, 64, 8, 3))]
GROUPED_TILES = [(32, Tiles(16, 64, 128, 4, 4)), (128, Tiles(64, 128, 64, 8, 3)), (1 << 62, Tiles(128, 128, 64, 8, 3))]
# The fused gate/up kernel holds two accumulators and expands two weights: tiles half as large.
GATED_TILES = [(32, Tiles(16, 64, 64, 4, 4)), (128, Tiles(64, 64, 64, 4, 3)), (1 << 62, Tiles(128, 64, 64, 8, 3))]
FP32_TILES = Tiles(32, 32, 32, 4, 2)  # the exact-fp32 dot: not an engine path; one small tile (no spills gated)
# Under the interpreter every op is numpy on a tile, whatever its size: few, moderate tiles.
INTERPRETER_TILES = Tiles(16, 32, 64, 1, 1)
DEQUANT_ELEMENTS = 8192  # outputs per dequant program (16 KB of bf16): whole 128-byte lines per row


def _by_rows(table, rows: int) -> Tiles:
    return next(t for limit, t in table if rows <= limit)


def _block_k(block_k: int, group: int, groups: int, bits: int) -> int:
    """BLOCK_K <= block_k dividing the group, so a tile has one scale per column (a dot needs >= 16
    inputs per operand: 32 for int4's two nibble operands); block_k itself where no such one exists
    (the scales are then gathered) or the row is one group."""
    if groups == 1:
        return block_k
    pow2 = group & -group
    return min(block_k, pow2) if pow2 >= (32 if bits == 4 else 16) else block_k


def _kernel_group(group: int, groups: int) -> int:
    """The GROUP constexpr: 0 for one group a row (one scale per output, any K)."""
    return 0 if groups == 1 else group


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(tiles: int, m: int, n: int, k: int, block_k: int, weight_bytes: int, device, split_k) -> int:
    """How many K ranges the linear kernel splits into: enough programs for two per SM when the output
    has few tiles, each range >= 4 tiles of K, the float32 partials' traffic <= 1/4 of the weight's."""
    if split_k is None:
        if device.type != "cuda":
            return 1
        split_k = min(triton.cdiv(2 * _sm_count(device.index or 0), tiles), max(1, k // (4 * block_k)),
                      max(1, weight_bytes // (32 * m * n)))
    return max(1, min(int(split_k), triton.cdiv(k, block_k)))


def _require_device(t: torch.Tensor) -> None:
    if not INTERPRETED and not t.is_cuda:
        raise ValueError("the Triton quantized-weight kernels need CUDA tensors (or TRITON_INTERPRET=1); "
                         "offbatch.kernels dispatches CPU tensors to the torch twins")


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    """(stack, row, column) strides; a 2-D tensor is one stack row."""
    return (0, *t.stride()) if t.dim() == 2 else tuple(t.stride())


def _weight_args(w) -> tuple[tuple, tuple]:
    """A weight (q, scale, minimum or None) -> its three pointers and nine strides (symmetric: the scale
    stands in for the minimum, never read)."""
    q, scale, minimum = w
    low = scale if minimum is None else minimum
    return (q, scale, low), (*_strides3(q), *_strides3(scale), *_strides3(low))


def _cuda_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- dequant

def _launch_dequant(w, y: torch.Tensor, bits: int, group: int, kp: int, k: int) -> torch.Tensor:
    q, scale, minimum = w
    stacks, n, groups = (q.shape[0] if q.dim() == 3 else 1), q.shape[-2], scale.shape[-1]
    if y.numel() == 0:
        return y
    if INTERPRETED:
        block_n, block_k = INTERPRETER_TILES.n, _block_k(INTERPRETER_TILES.k, group, groups, bits)
    else:
        block_k = _block_k(256 if bits == 4 else 128, group, groups, bits)
        block_n = max(16, min(256, DEQUANT_ELEMENTS // block_k))
    ptrs, strides = _weight_args(w)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k), stacks)
    with _cuda_guard(q):
        _dequant_kernel[grid](*ptrs, y, n, k, kp, groups, *strides, *_strides3(y),
                              BITS=bits, ASYM=minimum is not None, GROUP=_kernel_group(group, groups),
                              BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, enable_fp_fusion=False)
    return y


def _check_dims(q: torch.Tensor, allowed: tuple[int, ...]) -> None:
    if q.dim() not in allowed:
        raise ValueError(f"packed weights must be {' or '.join(f'{d}-D' for d in allowed)}, got {tuple(q.shape)}")


def dequant_int4(q4, scale, minimum, group: int, k: int, dtype: torch.dtype, out=None) -> torch.Tensor:
    """int4 weight q4 [N, Kp/2] (or a stack [S, N, Kp/2]), scale / minimum [(S,) N, G] -> W [(S,) N, k]
    in `dtype` (minimum None: symmetric), bit-exact with quant_reference.dequant_int4."""
    kp = ref.int4_width(q4, scale, minimum, group)
    _check_dims(q4, (2, 3))
    ref.check_k(k, kp)
    ref.check_dtype(dtype)
    ref.check_out(out, (*q4.shape[:-1], k), dtype, q4.device)
    _require_device(q4)
    y = out if out is not None else torch.empty(*q4.shape[:-1], k, dtype=dtype, device=q4.device)
    return _launch_dequant((q4, scale, minimum), y, 4, group, kp, k)


def dequant_int8(q8, scale, dtype: torch.dtype, out=None, k: int | None = None) -> torch.Tensor:
    """int8 weight q8 [N, Kp] (or [S, N, Kp]), scale [(S,) N, G] (group = Kp / G; G = 1: per row) ->
    W [(S,) N, k] in `dtype` (k: default Kp), bit-exact with quant_reference.dequant_int8."""
    group = ref.int8_group(q8, scale)
    _check_dims(q8, (2, 3))
    kp = q8.shape[-1]
    k = kp if k is None else k
    ref.check_k(k, kp)
    ref.check_dtype(dtype)
    ref.check_out(out, (*q8.shape[:-1], k), dtype, q8.device)
    _require_device(q8)
    y = out if out is not None else torch.empty(*q8.shape[:-1], k, dtype=dtype, device=q8.device)
    return _launch_dequant((q8, scale, None), y, 8, group, kp, k)


# ------------------------------------------------------------------------------------------------- GEMM

def _gemm_tiles(x: torch.Tensor, rows: int, table) -> Tiles:
    if INTERPRETED:
        return INTERPRETER_TILES
    return FP32_TILES if x.dtype == torch.float32 else _by_rows(table, rows)


def _launch_gemm(x, y, weights, bits: int, group: int, kp: int, bias=None, offsets=None, slots=None,
                 split_k=None) -> torch.Tensor:
    """y = x @ W.T (+ bias) (one weight) or silu(x @ W.T) * (x @ W2.T) (two), over all of x's rows or per
    expert group (offsets / slots given). x [T, K] with K <= kp; y [T, N]."""
    T, K = x.shape
    q, scale, _ = weights[0]
    N, groups = q.shape[-2], scale.shape[-1]
    grouped, gated = offsets is not None, len(weights) == 2
    NG = slots.numel() if grouped else 1
    if T == 0 or N == 0 or NG == 0:
        return y
    table = (GATED_TILES if gated else GROUPED_TILES) if grouped else LINEAR_TILES
    tiles = _gemm_tiles(x, T // NG, table)
    block_k = _block_k(tiles.k, group, groups, bits)
    stages = min(8, tiles.stages * tiles.k // block_k)
    # Grouped: an upper bound on the output tiles, each group adding at most one partial row tile (the
    # host never reads the group sizes); programs past the real count return at once.
    grid_tiles = (triton.cdiv(T, tiles.m) + (NG if grouped else 0)) * triton.cdiv(N, tiles.n)
    weight_bytes = sum(t.numel() * t.element_size() for t in weights[0] if t is not None)
    split = 1 if grouped or gated else _splits(grid_tiles, T, N, K, block_k, weight_bytes, x.device, split_k)
    k_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    split = triton.cdiv(K, k_split)
    target = y if split == 1 else torch.empty(split, T, N, dtype=torch.float32, device=x.device)
    ptrs, strides = _weight_args(weights[0])
    ptrs2, strides2 = _weight_args(weights[-1])
    y_strides = (0, *y.stride()) if split == 1 else target.stride()
    args = (
        x, target, bias if bias is not None and split == 1 else x,  # x: a pointer never read
        offsets if grouped else x, slots if grouped else x,
        *ptrs, *ptrs2,
        T, N, K, kp, groups, NG, k_split,
        *x.stride(), *y_strides, *strides, *strides2,
    )  # fmt: skip
    meta = dict(
        GROUPED=grouped, NG_POW2=max(16, triton.next_power_of_2(NG)), GATED=gated,
        HAS_BIAS=bias is not None and split == 1, BITS=bits, ASYM=weights[0][2] is not None,
        GROUP=_kernel_group(group, groups), EVEN_K=K % block_k == 0,
        W_MASK=triton.cdiv(K, block_k) * block_k > kp,
        # fp32 inputs get true fp32 products (like torch.matmul by default), not TF32.
        PRECISION="ieee" if x.dtype == torch.float32 else None,
        BLOCK_M=tiles.m, BLOCK_N=tiles.n, BLOCK_K=block_k, num_warps=tiles.warps, num_stages=stages,
    )  # fmt: skip
    grid = (grid_tiles, split)
    with _cuda_guard(x):
        # FP fusion (q * scale + minimum as one FMA) is exact with float16 scales: see the module docstring.
        _quant_gemm_kernel[grid](*args, **meta, enable_fp_fusion=True)
        if split > 1:
            block = 1024
            _split_sum_kernel[(triton.cdiv(T * N, block),)](
                target, bias if bias is not None else target, y, split, T, N, *y.stride(),
                HAS_BIAS=bias is not None, BLOCK=block, num_warps=4, enable_fp_fusion=False)
    return y


def _linear(x, weight, bits: int, group: int, kp: int, bias, split_k) -> torch.Tensor:
    _check_dims(weight[0], (2,))
    ref.check_x(x, weight[0], kp)
    ref.check_bias(bias, x, weight[0].shape[0])
    _require_device(x)
    K, N = x.shape[-1], weight[0].shape[0]
    x2 = x.reshape(-1, K)
    y = x.new_empty(x2.shape[0], N)
    _launch_gemm(x2, y, [weight], bits, group, kp, bias=bias, split_k=split_k)
    return y.view(*x.shape[:-1], N)


def int4_linear(x, q4, scale, minimum, group: int, bias=None, split_k: int | None = None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) -> [..., N] in x's dtype, fused: W's packed bytes are expanded in
    registers (quant_reference.int4_linear's arithmetic). K <= Kp (the pads past K are not used).
    split_k: K ranges summed in a second pass (None: enough to fill the GPU when the output is small)."""
    kp = ref.int4_width(q4, scale, minimum, group)
    return _linear(x, (q4, scale, minimum), 4, group, kp, bias, split_k)


def int8_linear(x, q8, scale, bias=None, split_k: int | None = None) -> torch.Tensor:
    """int4_linear for an int8 weight q8 [N, Kp], scale [N, G]."""
    group = ref.int8_group(q8, scale)
    return _linear(x, (q8, scale, None), 8, group, q8.shape[-1], bias, split_k)


# ---------------------------------------------------------------------------------------------- grouped

def _grouped(x, weights, offsets, slots, out, bits: int, group: int | None):
    """Check the grouped contract and the stacks, then launch; group None: int8 (Kp / G)."""
    weights = [ref.unpack_stack(w) for w in weights]
    for q, scale, minimum in weights:
        _check_dims(q, (3,))
        g = ref.int8_group(q, scale) if bits == 8 else group
        kp = ref.int4_width(q, scale, minimum, g) if bits == 4 else q.shape[-1]
        if scale.shape != weights[0][1].shape or (minimum is None) != (weights[0][2] is None):
            raise ValueError("paired quantized stacks differ in their scales' shapes or in having minimums")
    ref.check_grouped(x, weights, offsets, slots, out)
    ref.check_k(x.shape[1], kp)
    _require_device(x)
    y = out if out is not None else x.new_empty(x.shape[0], weights[0][0].shape[1])
    return _launch_gemm(x, y, weights, bits, g, kp, offsets=offsets, slots=slots)


def grouped_gemm_int4(x, w, group_offsets, group_slots, group: int, out=None) -> torch.Tensor:
    """y[rows of g] = x[rows of g] @ W[group_slots[g]].T for every group g, in one launch.

    x [T, K]; w = (q4 [S, N, Kp/2] uint8, scale [S, N, G], minimum [S, N, G] or None), any strides (rows
    of a bank); group_offsets int32 [G+1], group_slots int32 [G] as in grouped_gemm_triton.grouped_gemm
    (trusted on the GPU, checked on the CPU). -> y [T, N] in x's dtype; rows outside every group are left
    as they were in `out`."""
    return _grouped(x, [w], group_offsets, group_slots, out, 4, group)


def grouped_swiglu_int4(x, w_gate, w_up, group_offsets, group_slots, group: int, out=None) -> torch.Tensor:
    """h[rows of g] = silu(x_g @ gate[s].T) * (x_g @ up[s].T), s = group_slots[g], in one launch; gate and
    up int4 stacks as in grouped_gemm_int4 (alike in shape). The engine follows with grouped_gemm_int4."""
    return _grouped(x, [w_gate, w_up], group_offsets, group_slots, out, 4, group)


def grouped_gemm_int8(x, w, group_offsets, group_slots, out=None) -> torch.Tensor:
    """grouped_gemm_int4 for int8 stacks w = (q8 [S, N, Kp], scale [S, N, G][, None])."""
    return _grouped(x, [w], group_offsets, group_slots, out, 8, None)


def grouped_swiglu_int8(x, w_gate, w_up, group_offsets, group_slots, out=None) -> torch.Tensor:
    """grouped_swiglu_int4 for int8 stacks."""
    return _grouped(x, [w_gate, w_up], group_offsets, group_slots, out, 8, None)
