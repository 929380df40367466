"""Bitmap-sparse weight expansion: the torch twin (offbatch/kernels/bitmap_reference.py) against a dense
reference, and the Triton kernel (offbatch/kernels/bitmap_triton.py) against the twin.

Without CUDA the Triton kernel runs on the CPU through the Triton interpreter (fp32/fp16, small ragged
sizes: it is numpy per program); the `gpu`-marked tests add bf16 and Llama-3-8B-sized shapes on CUDA.
Expansion is a copy, so everything is compared bit for bit.
"""

import pytest
import torch
from triton_support import triton_kernel_module

import offbatch.kernels as kernels
from offbatch.kernels import bitmap_reference as ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


bt = triton_kernel_module("bitmap_triton")


def gen(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def keep_mask(n: int, k: int, sparsity: float, fixed: bool, seed: int, device="cpu") -> torch.Tensor:
    """bool [n, k]: fixed, every row keeps round((1 - sparsity) * k) columns; else each column is kept
    with probability 1 - sparsity (rows keep different counts)."""
    g = gen(seed, device)
    r = torch.rand(n, k, generator=g, device=device)
    if not fixed:
        return r < 1.0 - sparsity
    m = round((1.0 - sparsity) * k)
    keep = torch.zeros(n, k, dtype=torch.bool, device=device)
    keep.scatter_(1, r.argsort(1)[:, :m], True)
    return keep


def weight(n: int, k: int, seed: int, device="cpu") -> torch.Tensor:
    """Random float32 [n, k] with exact zeros and signed zeros among the values."""
    w = torch.randn(n, k, generator=gen(seed, device), device=device)
    w.view(-1)[::7] = 0.0
    w.view(-1)[3::11] = -0.0
    return w


def sparse(n, k, sparsity, fixed, seed, dtype=F32, pad=0, device="cpu"):
    """(dense reference float32 [n, k], bits, values in `dtype`): values padded by `pad` columns, the
    padding (and the zero-padding of shorter rows) overwritten with NaN, which must never be read."""
    w, keep = weight(n, k, seed, device), keep_mask(n, k, sparsity, fixed, seed + 1, device)
    most = int(keep.sum(1).max()) if n else 0
    bits, values = ref.bitmap_pack(w.to(dtype), keep, most + pad)
    counts = keep.sum(1)
    values[torch.arange(values.shape[1], device=device)[None, :] >= counts[:, None]] = float("nan")
    return torch.where(keep, w.to(dtype).float(), 0.0), bits, values


def expected(dense: torch.Tensor, k: int, dtype) -> torch.Tensor:
    return dense[:, :k].to(dtype)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit: torch.equal on the values and on their bit patterns (signed zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    bits = _SAME_SIZE_INT[a.element_size()]
    return torch.equal(a, b) and torch.equal(a.view(bits), b.view(bits))


NS, KS = (1, 7, 33), (1, 8, 13, 100, 257)
SPARSITIES = (0.0, 0.3, 0.5, 0.9, 1.0)


# ---------------------------------------------------------------------------------------- the twin

@pytest.mark.parametrize("fixed", [True, False], ids=["fixed", "varying"])
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("n,k", [(n, k) for n in NS for k in KS])
def test_twin_matches_dense(n, k, sparsity, fixed):
    pad = 0 if fixed else 3  # varying counts: NaN padding after the longest row too
    dense, bits, values = sparse(n, k, sparsity, fixed, seed=1000 * n + k, pad=pad)
    assert bits.shape == (n, -(-k // 8)) and bits.dtype == torch.uint8
    for dtype in (F32, F16, BF16):
        assert identical(ref.bitmap_expand(bits, values, k, dtype), expected(dense, k, dtype))


@pytest.mark.parametrize("n,K", [(7, 13), (33, 100), (5, 257)])
def test_twin_first_k_columns(n, K):
    dense, bits, values = sparse(n, K, 0.5, False, seed=K, pad=2)
    for k in (1, 8, K // 2 + 1, K - 1):
        assert identical(ref.bitmap_expand(bits, values, k, F32), expected(dense, k, F32))


def test_twin_bit_order_is_lsb_first():
    bits = torch.tensor([[0b00000101, 0b10000000], [0, 0b00000001]], dtype=torch.uint8)
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    want = torch.zeros(2, 16)
    want[0, 0], want[0, 2], want[0, 15], want[1, 8] = 1.0, 2.0, 3.0, 4.0
    assert torch.equal(ref.bitmap_expand(bits, values, 16, F32), want)
    assert torch.equal(ref.bitmap_expand(bits, values, 10, F32), want[:, :10])


def test_twin_converts_values_like_torch():
    _, bits, values = sparse(9, 50, 0.3, False, seed=3)
    kept = ref.unpack_bits(bits)[:, :50]
    stored = torch.arange(values.shape[1])[None, :] < kept.sum(1)[:, None]  # the entries rows use
    for vdtype, dtype in ((F32, F16), (F32, BF16), (F16, F32), (BF16, F16)):
        v = (values * 1e-3 + 1.0).to(vdtype)  # values the conversion must round
        twin = ref.bitmap_expand(bits, v, 50, dtype)
        assert identical(twin[kept], v[stored].to(dtype))  # row-major: the same order on both sides
        assert not twin[~kept].any()


def test_twin_writes_into_out():
    dense, bits, values = sparse(7, 100, 0.5, False, seed=4)
    buf = torch.full((7, 120), 5.0, dtype=F16)
    out = buf[:, 10:110]  # strided rows
    assert ref.bitmap_expand(bits, values, 100, F16, out=out) is out
    assert identical(out, expected(dense, 100, F16))
    assert (buf[:, :10] == 5).all() and (buf[:, 110:] == 5).all()


@pytest.mark.parametrize("n,k", [(1, 1), (7, 8), (33, 13), (5, 257), (0, 9)])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_pack_round_trip(n, k, sparsity):
    w, keep = weight(n, k, seed=k), keep_mask(n, k, sparsity, False, seed=n)
    bits, values = ref.bitmap_pack(w, keep)
    unpacked = ref.unpack_bits(bits)
    assert bits.shape == (n, -(-k // 8))
    assert torch.equal(unpacked[:, :k], keep) and not unpacked[:, k:].any()  # padding bits are 0
    counts = keep.sum(1)
    assert values.shape == (n, int(counts.max()) if n else 0) and values.dtype == w.dtype
    for r in range(n):
        c = int(counts[r])
        assert torch.equal(values[r, :c], w[r][keep[r]])  # column order, bit-exact (signed zeros too)
        assert torch.equal(values[r, :c].signbit(), w[r][keep[r]].signbit())
        assert not values[r, c:].any()
    assert torch.equal(ref.popcount(bits), counts)
    if n:
        assert identical(ref.bitmap_expand(bits, values, k, F32), torch.where(keep, w, 0.0))
    padded_bits, padded = ref.bitmap_pack(w, keep, values.shape[1] + 4)
    assert torch.equal(padded_bits, bits) and torch.equal(padded[:, : values.shape[1]], values)
    assert not padded[:, values.shape[1]:].any()


def test_pack_rejects_a_short_count():
    w, keep = weight(3, 20, seed=0), keep_mask(3, 20, 0.5, True, seed=0)
    with pytest.raises(ValueError):
        ref.bitmap_pack(w, keep, 9)
    with pytest.raises(TypeError):
        ref.bitmap_pack(w, keep.float())


def _bad_calls():
    bits = torch.zeros(3, 2, dtype=torch.uint8)
    bits[0, 0] = 0b111  # row 0 keeps 3 values
    values = torch.ones(3, 3)
    yield "int8 bits", (bits.to(torch.int8), values, 16, F32)
    yield "1-D bits", (bits[0], values, 16, F32)
    yield "int values", (bits, values.long(), 16, F32)
    yield "rows differ", (bits, values[:2], 16, F32)
    yield "k 0", (bits, values, 0, F32)
    yield "k past the bits", (bits, values, 17, F32)
    yield "int dtype", (bits, values, 16, torch.int32)
    yield "out shape", (bits, values, 16, F32, torch.empty(3, 15))
    yield "out dtype", (bits, values, 16, F32, torch.empty(3, 16, dtype=F16))
    yield "too few values", (bits, values[:, :2], 16, F32)


@pytest.mark.parametrize("name", [name for name, _ in _bad_calls()])
@pytest.mark.parametrize("module", [ref, bt], ids=["twin", "triton"])
def test_bad_input_is_rejected_before_launch(module, name):
    args = dict(_bad_calls())[name]
    with pytest.raises((TypeError, ValueError)):
        module.bitmap_expand(*args)


# ------------------------------------------------------------------- Triton (interpreted on the CPU)

# (n, K, k, sparsity, fixed counts, values dtype, out dtype)
TRITON_CASES = {
    "1x1": (1, 1, 1, 0.0, False, F32, F32),
    "7x13_fp16": (7, 13, 13, 0.5, False, F16, F16),
    "33x100_k77": (33, 100, 77, 0.3, True, F32, F16),
    "5x257_fp16_to_fp32": (5, 257, 257, 0.5, False, F16, F32),
    "17x257_dense": (17, 257, 250, 0.0, True, F32, F32),
    "9x100_sparse": (9, 100, 100, 0.9, False, F32, F32),
    "6x40_pruned": (6, 40, 40, 1.0, True, F32, F16),
}


@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_matches_twin(case):
    n, K, k, sparsity, fixed, vdtype, dtype = TRITON_CASES[case]
    dense, bits, values = sparse(n, K, sparsity, fixed, seed=K + n, dtype=vdtype, pad=2, device=DEVICE)
    twin = ref.bitmap_expand(bits, values, k, dtype)
    assert identical(twin, expected(dense, k, dtype))
    assert identical(bt.bitmap_expand(bits, values, k, dtype), twin)


# (block_n, block_k, splits): a chunk of one byte, a split per chunk, splits ending mid-chunk at k
TILES = [(4, 8, 1), (16, 32, 3), (2, 128, 2), (8, 16, 5)]


@pytest.mark.parametrize("sparsity", [0.0, 0.5])  # 0: full bytes in the split prefixes' popcounts
@pytest.mark.parametrize("tiles", TILES, ids=[f"{n}x{k}s{s}" for n, k, s in TILES])
def test_triton_tiles_and_splits(tiles, sparsity):
    block_n, block_k, splits = tiles
    dense, bits, values = sparse(11, 131, sparsity, False, seed=block_k, pad=1, device=DEVICE)
    for k in (131, 70):
        y = torch.empty(11, k, device=DEVICE)
        assert identical(bt.launch(bits, values, k, y, block_n, block_k, splits), expected(dense, k, F32))


def test_triton_reads_and_writes_strided_tensors():
    n, K, k = 10, 45, 40
    dense, bits, values = sparse(n, K, 0.5, False, seed=7, pad=3, device=DEVICE)
    bits_t = bits.t().contiguous().t()  # column-major bytes
    wide = torch.full((n, 2 * values.shape[1] + 1), float("nan"), device=DEVICE)
    wide[:, 1::2] = values  # every other column of a wider buffer
    strided_values = wide[:, 1::2]
    out_buf = torch.full((k + 6, n), 7.0, dtype=F16, device=DEVICE)
    out = out_buf[3 : 3 + k].t()  # [n, k] with column stride n
    assert bits_t.stride() != bits.stride() and strided_values.stride(1) == 2
    assert bt.bitmap_expand(bits_t, strided_values, k, F16, out=out) is out
    assert identical(out, expected(dense, k, F16))
    assert (out_buf[:3] == 7).all() and (out_buf[3 + k :] == 7).all()


def test_triton_with_no_values_writes_zeros():
    bits = torch.zeros(5, 3, dtype=torch.uint8, device=DEVICE)
    out = torch.full((5, 20), 3.0, device=DEVICE)
    assert torch.equal(bt.bitmap_expand(bits, torch.empty(5, 0, device=DEVICE), 20, F32, out=out),
                       torch.zeros(5, 20, device=DEVICE))


def test_dispatcher_runs_triton_and_matches_twin():
    dense, bits, values = sparse(6, 29, 0.5, False, seed=11, pad=1, device=DEVICE)
    assert kernels.backend(values) == "triton"  # TRITON_INTERPRET=1 without CUDA
    assert identical(kernels.bitmap_expand(bits, values, 29, F32), expected(dense, 29, F32))


# ---------------------------------------------------------------------------------------- on the GPU

def _gpu_sparse(n, K, sparsity, fixed, dtype, seed):
    w = torch.randn(n, K, generator=gen(seed, "cuda"), device="cuda").to(dtype)
    keep = keep_mask(n, K, sparsity, fixed, seed + 1, device="cuda")
    bits, values = ref.bitmap_pack(w, keep, None)
    return torch.where(keep, w, torch.zeros((), dtype=dtype, device="cuda")), bits, values


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 14336), (14336, 4096), (4096, 4096)], ids=["down", "up", "q"])
@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
def test_gpu_expand_is_bit_exact(shape, dtype):
    n, K = shape
    dense, bits, values = _gpu_sparse(n, K, 0.5, shape[0] != 4096, dtype, seed=n + K)
    y = bt.bitmap_expand(bits, values, K, dtype)
    assert identical(y, ref.bitmap_expand(bits, values, K, dtype))
    assert identical(y, dense)
    assert identical(kernels.bitmap_expand(bits, values, K, dtype), dense)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 2, 7, None])
def test_gpu_ragged_splits_and_conversions(splits):
    n, K, k = 1001, 5003, 4999
    dense, bits, values = _gpu_sparse(n, K, 0.7, False, F32, seed=5)
    values = torch.cat([values, torch.full((n, 5), float("nan"), device="cuda")], 1)  # padding never read
    for dtype in (BF16, F16, F32):
        y = torch.empty(n, k, dtype=dtype, device="cuda")
        bt.launch(bits, values, k, y, **bt.GPU_BLOCKS, splits=splits)
        assert identical(y, ref.bitmap_expand(bits, values, k, dtype))
        assert identical(y, dense[:, :k].to(dtype))
