"""Triton kernels for compressed KV (offbatch/offload/kv.py's packed formats). The torch twins, the packed
row layout and its arithmetic are in offbatch/kernels/kv_reference.py (same signatures, same results).

- `kv_encode(x, bits, group)`: K or V rows [..., head_dim] (any strides) -> packed rows uint8 [...,
  row_bytes], bit for bit the twin's bytes. One program per block of rows.
- `kv_decode_attention(q, k, v, k_len, bits, group, window_start)`: one query token per slot against
  that slot's stored keys, k / v dense (bits 16) or packed rows, both views of a KV store (strided slots
  and heads, contiguous rows). Flash-decoding: a program per (split of the keys, KV head, slot) runs an
  online softmax in float32 for all query heads of its KV head; a second kernel merges the splits by
  their log-sum-exps.

How a tile of stored rows becomes values: the row's value i = g * GROUP + c lies in group g at position
c. A tile of BLOCK_L rows is loaded as [BLOCK_L, groups, codes per group] (both padded to powers of two),
so a group's float16 scale and minimum are loaded once per row ([BLOCK_L, groups, 1]) and broadcast
along the codes; then it is reshaped to [BLOCK_L, groups * codes] for the dot products. The query and
the output use the same padded column order. int4: a byte holds values 2i (low nibble) and 2i + 1 (high),
and q . k = q_even . k_low + q_odd . k_high: two tiles and no interleaving shuffle (as quant_triton.py).
A code becomes a float32 through the mantissa of 2**23 (exact); code * scale + minimum in float32 is the
twin's arithmetic (the product of an 8-bit code and a float16 scale is exact, so an FMA rounds alike).

The score and output products: tl.dot with the query heads of a KV head padded to 16 rows (GQA), or a
broadcast multiply-sum for one query head per KV head (MHA: a 16-row tile would be 15/16 padding).
Dequantized K / V and the softmax weights enter the dot in the compute dtype (float32 inputs: exact
float32 products), like flash attention's; the softmax statistics and accumulators are float32.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from offbatch.kernels import kv_reference as ref

# Read once, like @triton.jit itself does.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # the kernels keep log2 units inside, natural log outside


# --------------------------------------------------------------------------------------------- jit parts

@triton.jit
def _half_from_bytes(byte_ptrs, mask):
    """The float16 stored little-endian at byte_ptrs (any alignment), as float32; masked: 0."""
    lo = tl.load(byte_ptrs, mask=mask, other=0).to(tl.int32)
    hi = tl.load(byte_ptrs + 1, mask=mask, other=0).to(tl.int32)
    return (lo | (hi << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _row_values(row_ptrs, row_ok, D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                NG_P2: tl.constexpr, CG_P2: tl.constexpr, HALF_PARAMS: tl.constexpr):
    """The values of stored rows (row_ptrs [BLOCK_L]: each row's first byte, or first value for BITS 16;
    rows not row_ok read as zeros) as [BLOCK_L, NG_P2 * CG_P2] tiles in the padded column order: float32
    (packed) or the stored dtype (BITS 16). Returns (even values, odd values) for BITS 4, else the values
    twice."""
    BLOCK_L: tl.constexpr = row_ptrs.shape[0]
    CODES: tl.constexpr = GROUP * BITS // 8 if BITS != 16 else GROUP  # stored codes (bytes) per group
    g = tl.arange(0, NG_P2)[None, :, None]
    c = tl.arange(0, CG_P2)[None, None, :]
    ok = row_ok[:, None, None] & (g < D // GROUP) & (c < CODES)
    stored = tl.load(row_ptrs[:, None, None] + g * CODES + c, mask=ok, other=0)
    if BITS == 16:
        even = tl.reshape(stored, (BLOCK_L, NG_P2 * CG_P2))
        odd = even
    else:
        params = row_ptrs[:, None, None] + D * BITS // 8 + 4 * g  # [BLOCK_L, NG_P2, 1]: (scale, minimum)
        params_ok = row_ok[:, None, None] & (g < D // GROUP)
        if HALF_PARAMS:  # even addresses: float16 loads
            halves = params.to(tl.pointer_type(tl.float16))
            scale = tl.load(halves, mask=params_ok, other=0.0).to(tl.float32)
            minimum = tl.load(halves + 1, mask=params_ok, other=0.0).to(tl.float32)
        else:
            scale, minimum = _half_from_bytes(params, params_ok), _half_from_bytes(params + 2, params_ok)
        # A code becomes a float32 exactly: OR-ed into the mantissa of 2**23, minus 2**23. (Written out,
        # not a jit helper: under the interpreter a helper call costs more than its arithmetic.)
        b = stored.to(tl.int32)
        if BITS == 8:
            even = tl.reshape(((b | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0) * scale + minimum,
                              (BLOCK_L, NG_P2 * CG_P2))
            odd = even
        else:
            even = ((b & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            odd = ((b >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            even = tl.reshape(even * scale + minimum, (BLOCK_L, NG_P2 * CG_P2))
            odd = tl.reshape(odd * scale + minimum, (BLOCK_L, NG_P2 * CG_P2))
    return even, odd  # one return: a jit function's returns must agree in type


@triton.jit
def _columns(D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, NG_P2: tl.constexpr,
             CG_P2: tl.constexpr, ODD: tl.constexpr):
    """Head-dimension index of each padded column (the order of _row_values' tiles) and whether it is
    real; ODD: the high nibbles' values (BITS 4)."""
    CODES: tl.constexpr = GROUP * BITS // 8 if BITS != 16 else GROUP
    PER_CODE: tl.constexpr = 2 if BITS == 4 else 1
    col = tl.arange(0, NG_P2 * CG_P2)
    g, c = col // CG_P2, col % CG_P2
    return g * GROUP + PER_CODE * c + ODD, (g < D // GROUP) & (c < CODES)


@triton.jit
def _scores(acc, q, k, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + q [R, C] . k [BLOCK_L, C] over C -> [R, BLOCK_L], float32."""
    if USE_DOT:
        acc = tl.dot(q, tl.trans(k.to(q.dtype)), acc, input_precision=PRECISION)
    else:
        acc += tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], 2)
    return acc


@triton.jit
def _weighted(acc, p, v, dtype: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + p [R, BLOCK_L] @ v [BLOCK_L, C] -> [R, C], float32 (dot inputs in `dtype`)."""
    if USE_DOT:
        acc = tl.dot(p.to(dtype), v.to(dtype), acc, input_precision=PRECISION)
    else:
        acc += tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)
    return acc


# ---------------------------------------------------------------------------------------- encode kernel

@triton.jit
def _encode_kernel(
    x_ptr, out_ptr, ROWS, INNER, stride_xo, stride_xi, stride_xd,
    D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, NG_P2: tl.constexpr, CG_P2: tl.constexpr,
    HALF_PARAMS: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Packed rows of BLOCK_R rows of x; row r is x[r // INNER, r % INNER, :] (two strided leading dims).
    HALF_PARAMS: rows of an even byte count, the parameters stored as float16s (else byte by byte).
    (No jit helpers: under the interpreter each call costs more than this kernel's arithmetic.)"""
    ROW_BYTES: tl.constexpr = D * BITS // 8 + 4 * (D // GROUP)
    CODES: tl.constexpr = GROUP * BITS // 8  # bytes of codes per group
    PER_CODE: tl.constexpr = 8 // BITS  # values per byte
    QMAX: tl.constexpr = (1 << BITS) - 1
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < ROWS
    x_rows = x_ptr + (rows // INNER) * stride_xo + (rows % INNER) * stride_xi
    g = tl.arange(0, NG_P2)[None, :, None]
    c = tl.arange(0, CG_P2)[None, None, :]
    in_group = c < CODES
    ok = row_ok[:, None, None] & (g < D // GROUP) & in_group
    # The values of byte c of group g: g * GROUP + PER_CODE * c (+ 1, the high nibble). Padded positions
    # read 0 and are left out of the minimum and maximum (padded groups are all zeros, never stored).
    ptrs = x_rows[:, None, None] + (g * GROUP + PER_CODE * c) * stride_xd
    a = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    low, high = a, a
    if BITS == 4:
        b = tl.load(ptrs + stride_xd, mask=ok, other=0.0).to(tl.float32)
        low, high = tl.minimum(a, b), tl.maximum(a, b)
    lo = tl.min(tl.where(in_group, low, float("inf")), 2)
    hi = tl.max(tl.where(in_group, high, float("-inf")), 2)
    # The twin's arithmetic: float16 scale and minimum, then clamp(floor((x - minimum) / scale + 0.5))
    # in float32 with IEEE division (Triton's `/` is approximate on the GPU).
    scale = tl.math.div_rn(hi - lo, QMAX * 1.0).to(tl.float16)  # [BLOCK_R, NG_P2]
    scale = tl.where(scale == 0, tl.full(scale.shape, 1.0, tl.float16), scale)
    minimum = lo.to(tl.float16)
    scale32, minimum32 = scale.to(tl.float32)[:, :, None], minimum.to(tl.float32)[:, :, None]
    codes = tl.floor(tl.math.div_rn(a - minimum32, scale32) + 0.5)
    codes = tl.minimum(tl.maximum(codes, 0.0), QMAX).to(tl.int32)
    if BITS == 4:
        odd = tl.floor(tl.math.div_rn(b - minimum32, scale32) + 0.5)
        codes = codes | (tl.minimum(tl.maximum(odd, 0.0), QMAX).to(tl.int32) << 4)
    out_rows = out_ptr + rows * ROW_BYTES
    tl.store(out_rows[:, None, None] + g * CODES + c, codes.to(tl.uint8), mask=ok)
    gp = tl.arange(0, NG_P2)[None, :]
    params = out_rows[:, None] + D * BITS // 8 + 4 * gp
    params_ok = row_ok[:, None] & (gp < D // GROUP)
    if HALF_PARAMS:
        halves = params.to(tl.pointer_type(tl.float16))
        tl.store(halves, scale, mask=params_ok)
        tl.store(halves + 1, minimum, mask=params_ok)
    else:  # little-endian bytes
        scale_bits = scale.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        minimum_bits = minimum.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        tl.store(params, (scale_bits & 0xFF).to(tl.uint8), mask=params_ok)
        tl.store(params + 1, (scale_bits >> 8).to(tl.uint8), mask=params_ok)
        tl.store(params + 2, (minimum_bits & 0xFF).to(tl.uint8), mask=params_ok)
        tl.store(params + 3, (minimum_bits >> 8).to(tl.uint8), mask=params_ok)


# ------------------------------------------------------------------------------------ attention kernels

@triton.jit(do_not_specialize=["L", "CHUNK"])  # a decode step's length varies: one compile
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, k_len_ptr, window_ptr, out_ptr, lse_ptr,
    L, CHUNK, qk_scale,
    stride_qs, stride_qh, stride_qd, stride_ks, stride_kh, stride_vs, stride_vh,
    stride_os, stride_oh, stride_op, stride_ls, stride_lh, stride_lp,
    UNIT: tl.constexpr, STRIDE_KL: tl.constexpr, STRIDE_VL: tl.constexpr,
    D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, NG_P2: tl.constexpr, CG_P2: tl.constexpr,
    REP: tl.constexpr, REP_P2: tl.constexpr, HAS_WINDOW: tl.constexpr, PARTIAL: tl.constexpr,
    HALF_PARAMS: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """Attention of the REP query heads of KV head h of slot s over keys split * CHUNK .. + CHUNK (those
    before k_len and from window_start on). PARTIAL: store the normalized output in float32 and the
    log2-sum-exp2 of the split (-inf: no keys) for _merge_splits_kernel; else the final output in q's
    dtype and the natural-log LSE. Outputs have unit column stride. Grid: (splits, KV heads, slots)."""
    split, h, s = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    begin = split * CHUNK
    end = tl.minimum(tl.minimum(begin + CHUNK, tl.load(k_len_ptr + s).to(tl.int32)), L)
    first = begin
    if HAS_WINDOW:
        first = tl.maximum(begin, tl.load(window_ptr + s).to(tl.int32))
    r = tl.arange(0, REP_P2)
    heads = h * REP + r
    lse_ptrs = lse_ptr + s * stride_ls + heads * stride_lh + split * stride_lp
    if PARTIAL:
        if first >= end:  # nothing to read: the merge gives this split no weight
            tl.store(lse_ptrs, tl.full((REP_P2,), float("-inf"), tl.float32), mask=r < REP)
            return

    # --- the queries in the padded column order (int4: even and odd values apart)
    q_rows = q_ptr + s * stride_qs + heads[:, None] * stride_qh
    col_a, ok_a = _columns(D, BITS, GROUP, NG_P2, CG_P2, 0)
    q_a = tl.load(q_rows + col_a[None, :] * stride_qd, mask=(r < REP)[:, None] & ok_a[None, :], other=0.0)
    q_b = q_a
    if BITS == 4:
        col_b, ok_b = _columns(D, BITS, GROUP, NG_P2, CG_P2, 1)
        q_b = tl.load(q_rows + col_b[None, :] * stride_qd, mask=(r < REP)[:, None] & ok_b[None, :], other=0.0)

    # --- online softmax over the split's tiles; each tile holds a valid key (it starts at or after the
    # window, before `end`), so the running maximum is finite after the first. Slot and head strides
    # come in UNITs (their common factor with the token strides, e.g. row_bytes): the compiler then
    # knows how rows align (vector loads) whatever the store's max_len.
    k_base = k_ptr + (s * stride_ks + h * stride_kh) * UNIT
    v_base = v_ptr + (s * stride_vs + h * stride_vh) * UNIT
    m_i = tl.full((REP_P2,), float("-inf"), tl.float32)
    l_i = tl.zeros((REP_P2,), tl.float32)
    acc_a = tl.zeros((REP_P2, NG_P2 * CG_P2), tl.float32)
    acc_b = tl.zeros((REP_P2, NG_P2 * CG_P2), tl.float32)
    start = begin + (first - begin) // BLOCK_L * BLOCK_L
    stop = tl.where(first < end, end, start)  # no keys: no tile (one would hold no valid key)
    for t in range(start, stop, BLOCK_L):
        pos = t + tl.arange(0, BLOCK_L)
        valid = (pos >= first) & (pos < end)
        k_a, k_b = _row_values(k_base + pos * STRIDE_KL, valid, D, BITS, GROUP, NG_P2, CG_P2, HALF_PARAMS)
        sc = _scores(tl.zeros((REP_P2, BLOCK_L), tl.float32), q_a, k_a, USE_DOT, PRECISION)
        if BITS == 4:
            sc = _scores(sc, q_b, k_b, USE_DOT, PRECISION)
        sc = tl.where(valid[None, :], sc * qk_scale, float("-inf"))  # log2 units
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_a, v_b = _row_values(v_base + pos * STRIDE_VL, valid, D, BITS, GROUP, NG_P2, CG_P2, HALF_PARAMS)
        acc_a = _weighted(acc_a * alpha[:, None], p, v_a, q_a.dtype, USE_DOT, PRECISION)
        if BITS == 4:
            acc_b = _weighted(acc_b * alpha[:, None], p, v_b, q_a.dtype, USE_DOT, PRECISION)
        m_i = m_new

    # --- epilogue (no keys at all, e.g. a window past k_len: out 0/0 = NaN and LSE -inf, as the twin)
    lse2 = m_i + tl.math.log2(l_i)
    o_rows = out_ptr + s * stride_os + heads[:, None] * stride_oh + split * stride_op
    o_a = (acc_a / l_i[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(o_rows + col_a[None, :], o_a, mask=(r < REP)[:, None] & ok_a[None, :])
    if BITS == 4:
        o_b = (acc_b / l_i[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(o_rows + col_b[None, :], o_b, mask=(r < REP)[:, None] & ok_b[None, :])
    if PARTIAL:
        tl.store(lse_ptrs, lse2, mask=r < REP)
    else:
        tl.store(lse_ptrs, lse2 * LN2, mask=r < REP)


@triton.jit
def _merge_splits_kernel(part_ptr, part_lse_ptr, out_ptr, lse_ptr, SPLITS, stride_os, stride_oh,
                         D: tl.constexpr, D_P2: tl.constexpr, SPLITS_P2: tl.constexpr):
    """out[s, h] = sum over splits of out_split * 2**(lse2_split - lse2); grid (slots, query heads).
    part [S, nh, SPLITS, D] and part_lse [S, nh, SPLITS] contiguous; splits with no keys (-inf) and
    their never-written outputs are left out."""
    s, h, nh = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.num_programs(1)
    row = s * nh + h
    sp = tl.arange(0, SPLITS_P2)
    col = tl.arange(0, D_P2)
    part_lse = tl.load(part_lse_ptr + row * SPLITS + sp, mask=sp < SPLITS, other=float("-inf"))
    used = part_lse > float("-inf")
    top = tl.max(part_lse, 0)
    w = tl.where(used, tl.math.exp2(part_lse - top), 0.0)
    total = tl.sum(w, 0)
    part = tl.load(part_ptr + (row * SPLITS + sp[:, None]) * D + col[None, :],
                   mask=used[:, None] & (col < D)[None, :], other=0.0)
    out = tl.sum(w[:, None] * part, 0) / total
    tl.store(out_ptr + s * stride_os + h * stride_oh + col, out.to(out_ptr.dtype.element_ty), mask=col < D)
    tl.store(lse_ptr + row, (top + tl.math.log2(total)) * LN2)


# ----------------------------------------------------------------------------------------------- launches

class Tiles(NamedTuple):
    """BLOCK_L (keys per step), num_warps and num_stages of the attention kernel."""

    l: int  # noqa: E741
    warps: int
    stages: int


# Chosen by reasoning about the H200, to be confirmed by scripts/bench_kv_kernels.py (--sweep): a program
# reads 64 rows of K and of V per step (32 KB of bf16 K+V at head_dim 128, 10-17 KB packed), the next
# step's tiles copied asynchronously into shared memory while this one computes (2 stages). Compiled for
# sm_90 at head_dim 128 that takes ~92 (bf16), ~160 (int8) and ~140 (int4) registers a thread at 4 warps
# and 22-39 KB of shared memory: 3-5 resident programs per SM, enough bytes in flight for HBM. Per bits.
ATTENTION_TILES = {16: Tiles(64, 4, 2), 8: Tiles(64, 4, 2), 4: Tiles(64, 4, 2)}
FP32_TILES = Tiles(16, 4, 2)  # exact-fp32 dots (not an engine path): smaller tiles, no spills
BROADCAST_ELEMENTS = 4096  # the multiply-sum path's [rep, BLOCK_L, columns] product: bounds BLOCK_L
# Under the interpreter every op (and every call of a jit helper) costs ~0.1-1 ms whatever its tile's
# size: large tiles, few steps (engine tests on the CPU run these kernels interpreted).
INTERPRETER_TILES = Tiles(64, 1, 1)
PROGRAMS_PER_SM = 4  # splits are added until the grid has this many programs per SM ...
MIN_TILES_PER_SPLIT = 2  # ... each split reading at least this many tiles of keys
MAX_SPLITS = 64  # the merge kernel holds [splits, head_dim] partial outputs in registers
ENCODE_ELEMENTS = 4096  # values per encode program


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _require_device(t: torch.Tensor) -> None:
    if not INTERPRETED and not t.is_cuda:
        raise ValueError("the Triton KV kernels need CUDA tensors (or TRITON_INTERPRET=1); "
                         "offbatch.kernels dispatches CPU tensors to the torch twins")


def _cuda_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _layout(head_dim: int, bits: int, group: int) -> tuple[int, int, int]:
    """(GROUP, NG_P2, CG_P2): the group the kernels see (the whole row for bits 16), and the padded
    groups and stored codes per group of a tile."""
    if bits == 16:
        group = head_dim
    codes = group if bits == 16 else group * bits // 8
    return group, triton.next_power_of_2(head_dim // group), triton.next_power_of_2(codes)


def _two_row_dims(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """x [..., d] -> (x, inner, stride_outer, stride_inner) such that row r of x.reshape(-1, d) lies at
    (r // inner) * stride_outer + (r % inner) * stride_inner: the leading dims merged where their strides
    allow (a [T, nkv, d] slice of a fused QKV output stays two dims, read in place); more than two left
    (rare): a contiguous copy."""
    dims = [(n, st) for n, st in zip(x.shape[:-1], x.stride()[:-1]) if n != 1]
    merged: list[list[int]] = []
    for n, st in dims:
        if merged and merged[-1][1] == n * st:
            merged[-1] = [merged[-1][0] * n, st]
        else:
            merged.append([n, st])
    if len(merged) > 2:
        x = x.contiguous()
        merged = [[x.numel() // max(x.shape[-1], 1), x.shape[-1]]]
    while len(merged) < 2:
        merged.insert(0, [1, 0])
    (_, stride_outer), (inner, stride_inner) = merged
    return x, inner, stride_outer, stride_inner


def kv_encode(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """x [..., head_dim] (float32 / float16 / bfloat16, any strides) -> packed rows uint8 [..., row_bytes],
    equal to kv_reference.kv_encode bit for bit."""
    d = x.shape[-1]
    rb = ref.row_bytes(d, bits, group)
    if not x.is_floating_point():
        raise ValueError(f"kv_encode takes floating-point values, not {x.dtype}")
    _require_device(x)
    out = torch.empty(*x.shape[:-1], rb, dtype=torch.uint8, device=x.device)
    rows = out.numel() // rb
    if rows == 0:
        return out
    x, inner, stride_outer, stride_inner = _two_row_dims(x)
    group, ng_p2, cg_p2 = _layout(d, bits, group)
    block_r = max(1, min(64, ENCODE_ELEMENTS // (ng_p2 * cg_p2 * 8 // bits)))  # a power of two
    with _cuda_guard(x):
        _encode_kernel[(triton.cdiv(rows, block_r),)](
            x, out, rows, inner, stride_outer, stride_inner, x.stride(-1),
            D=d, BITS=bits, GROUP=group, NG_P2=ng_p2, CG_P2=cg_p2, HALF_PARAMS=rb % 2 == 0, BLOCK_R=block_r,
            num_warps=4, enable_fp_fusion=False)
    return out


def _splits(programs: int, L: int, block_l: int, device: torch.device, splits: int | None) -> tuple[int, int]:
    """(splits, keys per split): enough splits for PROGRAMS_PER_SM programs per SM, each at least
    MIN_TILES_PER_SPLIT tiles long; `splits` given: that many (at most one per tile)."""
    tiles = triton.cdiv(L, block_l)
    if splits is None:
        sms = _sm_count(device.index or 0) if device.type == "cuda" else 4
        splits = min(triton.cdiv(PROGRAMS_PER_SM * sms, programs), triton.cdiv(tiles, MIN_TILES_PER_SPLIT),
                     MAX_SPLITS)
    splits = max(1, min(int(splits), tiles))
    chunk = triton.cdiv(tiles, splits) * block_l
    return triton.cdiv(L, chunk), chunk


def _half_params(t: torch.Tensor) -> bool:
    """Whether every packed row's float16 parameters lie at even addresses (loaded as float16s)."""
    return t.data_ptr() % 2 == 0 and all(st % 2 == 0 for st in t.stride()[:-1]) and t.shape[-1] % 2 == 0


def _check_attention(q, k, v, k_len, bits: int, group: int, window_start) -> None:
    if q.dim() != 3 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q [S, nh, d] and k, v [S, nkv, L, row] expected, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    S, nh, d = q.shape
    if k.shape[0] != S or nh % k.shape[1]:
        raise ValueError(f"{nh} query heads over {k.shape[1]} KV heads, or {k.shape[0]} KV slots for {S} queries")
    if bits == 16:
        if k.shape[-1] != d or not k.is_floating_point():
            raise ValueError(f"dense K/V rows of {d} floating-point values expected, got {k.shape[-1]} {k.dtype}")
    else:
        rb = ref.row_bytes(d, bits, group)
        if k.dtype != torch.uint8 or v.dtype != torch.uint8 or k.shape[-1] != rb:
            raise ValueError(f"packed K/V rows of {rb} uint8 bytes expected, got {k.shape[-1]} {k.dtype}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("K/V rows must be contiguous (views of a store keep them so)")
    for name, t in (("k_len", k_len), ("window_start", window_start)):
        if t is not None and (t.shape != (S,) or t.device != q.device or t.is_floating_point()):
            raise ValueError(f"{name} must be [{S}] integers on {q.device}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")


def kv_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_len: torch.Tensor,
                        bits: int = 16, group: int = 0, window_start: torch.Tensor | None = None,
                        splits: int | None = None, use_dot: bool | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_reference.kv_decode_attention on the GPU: q [S, nh, d]; k, v [S, nkv, L, d] (bits 16) or packed
    rows [S, nkv, L, row_bytes] (bits 8 / 4), any slot / head / token strides with contiguous rows (views
    of a store are read in place); k_len, window_start [S] integers on q's device (never read by the
    host). -> (out [S, nh, d] in q's dtype, lse [S, nh] float32, natural log).
    splits: key ranges per (slot, KV head) merged by a second kernel (None: enough to fill the GPU);
    use_dot: tensor-core dots with the query heads padded to 16 (None: when several share a KV head)."""
    _check_attention(q, k, v, k_len, bits, group, window_start)
    _require_device(q)
    S, nh, d = q.shape
    nkv, L = k.shape[1], k.shape[2]
    rep = nh // nkv
    out = torch.empty(S, nh, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(S, nh, dtype=torch.float32, device=q.device)
    if S == 0 or nh == 0:
        return out, lse
    if L == 0:
        return out.fill_(float("nan")), lse.fill_(float("-inf"))  # no keys, as the twin
    kgroup, ng_p2, cg_p2 = _layout(d, bits, group)
    columns = ng_p2 * cg_p2
    if use_dot is None:
        use_dot = rep > 1
    use_dot = use_dot and columns >= 16  # a dot needs 16 inputs
    rep_p2 = max(16, triton.next_power_of_2(rep)) if use_dot else triton.next_power_of_2(rep)
    if INTERPRETED:
        tiles = INTERPRETER_TILES
    else:
        tiles = FP32_TILES if q.dtype == torch.float32 else ATTENTION_TILES[bits]
    block_l = tiles.l
    if not use_dot:
        block_l = max(16, min(block_l, triton.next_power_of_2(max(1, BROADCAST_ELEMENTS // (rep_p2 * columns)))))
    n_splits, chunk = _splits(S * nkv, L, block_l, q.device, splits)
    if n_splits > 1:
        part = torch.empty(S, nh, n_splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(S, nh, n_splits, dtype=torch.float32, device=q.device)
        target, target_lse = part, part_lse
        o_strides, l_strides = part.stride()[:3], part_lse.stride()
    else:
        target, target_lse = out, lse
        o_strides, l_strides = (*out.stride()[:2], 0), (*lse.stride(), 0)
    window = window_start if window_start is not None else k_len  # a pointer never read
    unit = max(1, math.gcd(*k.stride()[:3], *v.stride()[:3]))
    meta = dict(
        UNIT=unit, STRIDE_KL=k.stride(2), STRIDE_VL=v.stride(2),
        D=d, BITS=bits, GROUP=kgroup, NG_P2=ng_p2, CG_P2=cg_p2,
        REP=rep, REP_P2=rep_p2, HAS_WINDOW=window_start is not None, PARTIAL=n_splits > 1,
        HALF_PARAMS=bits != 16 and _half_params(k) and _half_params(v), USE_DOT=use_dot,
        # fp32 inputs get true fp32 products (the twin's), not TF32.
        PRECISION="ieee" if q.dtype == torch.float32 else None,
        BLOCK_L=block_l, num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    with _cuda_guard(q):
        _decode_attention_kernel[(n_splits, nkv, S)](
            q, k, v, k_len, window, target, target_lse,
            L, chunk, d ** -0.5 * LOG2E,
            *q.stride(), *(st // unit for st in (*k.stride()[:2], *v.stride()[:2])), *o_strides, *l_strides,
            **meta)  # fmt: skip
        if n_splits > 1:
            _merge_splits_kernel[(S, nh)](
                part, part_lse, out, lse, n_splits, *out.stride()[:2],
                D=d, D_P2=triton.next_power_of_2(d), SPLITS_P2=triton.next_power_of_2(n_splits),
                num_warps=4 if d >= 128 else 2)
    return out, lse


__all__ = ["ATTENTION_TILES", "INTERPRETED", "Tiles", "kv_decode_attention", "kv_encode"]
