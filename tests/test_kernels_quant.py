"""Quantized-weight kernels (offbatch/kernels/quant_triton.py) against their torch twins
(offbatch/kernels/quant_reference.py), and the twins against the formats' own `dequantize` / `linear`.

Without CUDA the Triton kernels run on the CPU through the Triton interpreter (fp32/fp16, small ragged
sizes: it is numpy per program); the `gpu`-marked tests add bf16 and engine-sized shapes on CUDA.
Dequantization is compared bit for bit; GEMMs within the rounding of their outputs (both sides round an
fp32 sum once, in different orders).
"""

import pytest
import torch
from triton_support import triton_kernel_module

from offbatch.formats import Int4Format, Int8Format
from offbatch.kernels import quant_reference as ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


qt = triton_kernel_module("quant_triton")

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}  # ||out - twin|| / ||twin||
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def weight(n, k, seed):
    """Random weights with an all-zero group and a row of a much larger magnitude."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    w[0, : min(k, 40)] = 0.0
    w[1] *= 30.0
    return w


def int4_weight(n, k, group, asym, seed, device=DEVICE):
    """(q4, scale, minimum or None) of a random [n, k] weight, from the format's own encoder."""
    st = Int4Format(group, asymmetric=asym).encode("w.weight", weight(n, k, seed), F32)
    low = st["w.weight.min"].to(device) if asym else None
    return st["w.weight.q4"].to(device), st["w.weight.scale"].to(device), low


def int8_weight(n, k, group, seed, device=DEVICE):
    """(q8, scale) of a random [n, k] weight (group None: per row, float32 scales)."""
    st = Int8Format(group).encode("w.weight", weight(n, k, seed), F32)
    return st["w.weight.q8"].to(device), st["w.weight.scale"].to(device)


def rand(*shape, dtype, seed, device=DEVICE):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def rel_err(out, twin):
    out, twin = out.double().cpu(), twin.double().cpu()
    return ((out - twin).norm() / twin.norm()).item()


# ------------------------------------------------------------------------------ twins against the formats

@pytest.mark.parametrize("group,asym", [(32, False), (64, True), (128, False), (128, True), (48, True)])
def test_int4_twin_is_the_formats_dequantize_and_linear(group, asym):
    fmt = Int4Format(group, asymmetric=asym)
    n, k = 21, 2 * group + 19  # a ragged last group
    st = fmt.encode("q.weight", weight(n, k, seed=group), F32)
    parts = st["q.weight.q4"], st["q.weight.scale"], st.get("q.weight.min")
    for dtype in (F32, F16, BF16):
        assert torch.equal(ref.dequant_int4(*parts, group, k, dtype), fmt.dequantize(st, "q.weight", dtype, k))
        x, bias = rand(3, k, dtype=dtype, seed=1, device="cpu"), rand(n, dtype=dtype, seed=2, device="cpu")
        assert torch.equal(ref.int4_linear(x, *parts, group, bias), fmt.linear(x, {**st, "q.bias": bias}, "q"))


@pytest.mark.parametrize("group", [None, 32])
def test_int8_twin_is_the_formats_dequantize_and_linear(group):
    fmt = Int8Format(group)
    n, k = 21, 75
    st = fmt.encode("q.weight", weight(n, k, seed=3), F32)
    q8, scale = st["q.weight.q8"], st["q.weight.scale"]
    for dtype in (F32, F16, BF16):
        assert torch.equal(ref.dequant_int8(q8, scale, dtype, k=k), fmt.dequantize(st, "q.weight", dtype, k))
        x = rand(5, k, dtype=dtype, seed=4, device="cpu")
        assert torch.equal(ref.int8_linear(x, q8, scale), fmt.linear(x, st, "q"))


# ---------------------------------------------------------------------------------------- dequantization

# group 48 and 6: no power of two >= 32 divides them, the scales are gathered per input; 6 with K=100
# also makes the last tile reach past the stored row.
@pytest.mark.parametrize("group,asym", [(32, True), (64, False), (128, True), (48, False), (6, True)])
def test_dequant_int4_is_bit_exact(group, asym):
    n, k = 37, (100 if group == 6 else 2 * group - 3)
    q4, scale, low = int4_weight(n, k, group, asym, seed=group)
    for dtype in (F32, F16):
        out = qt.dequant_int4(q4, scale, low, group, k, dtype)
        assert out.shape == (n, k) and out.dtype == dtype
        assert torch.equal(out, ref.dequant_int4(q4, scale, low, group, k, dtype))


@pytest.mark.parametrize("group", [None, 32, 24])
def test_dequant_int8_is_bit_exact(group):
    n, k = 37, 101
    q8, scale = int8_weight(n, k, group, seed=5)
    for dtype in (F32, F16):
        poison = torch.full((n, k), float("nan"), dtype=dtype, device=DEVICE)
        out = qt.dequant_int8(q8, scale, dtype, out=poison, k=k)
        assert out is poison and torch.equal(out, ref.dequant_int8(q8, scale, dtype, k=k))


# ----------------------------------------------------------------------------------------- fused linear

# (rows, N, K, group, asym, dtype, bias, split_k); x's leading shape is (rows,) or (2, rows / 2).
INT4_LINEAR = {
    "m1_g32_bias": (1, 37, 101, 32, False, F32, True, None),
    "m3_g64_asym_split2": (3, 37, 101, 64, True, F16, False, 2),
    "m17_g128_bias_split3": (17, 20, 250, 128, False, F16, True, 3),
    "m3_g48_gathered": (3, 24, 90, 48, True, F32, True, None),
    "m3_g128_one_group_a_row": (3, 20, 100, 128, True, F16, False, None),
    "m17_g64_even_k": (17, 40, 128, 64, True, F32, False, None),
    "m6_3d_x_g6": (6, 19, 100, 6, False, F16, True, 2),
}


@pytest.mark.parametrize("case", list(INT4_LINEAR))
def test_int4_linear_matches_twin(case):
    m, n, k, group, asym, dtype, with_bias, split_k = INT4_LINEAR[case]
    q4, scale, low = int4_weight(n, k, group, asym, seed=len(case))
    x = rand(m, k, dtype=dtype, seed=m)
    if case.startswith("m6_3d"):
        x = x.view(2, m // 2, k)
    bias = rand(n, dtype=dtype, seed=9) if with_bias else None
    y = qt.int4_linear(x, q4, scale, low, group, bias=bias, split_k=split_k)
    twin = ref.int4_linear(x, q4, scale, low, group, bias=bias)
    assert y.shape == twin.shape and y.dtype == dtype
    assert rel_err(y, twin) <= TOL[dtype]


INT8_LINEAR = {  # (rows, N, K, group, dtype, bias, split_k)
    "per_row_m1": (1, 37, 101, None, F32, True, None),
    "per_row_m17_split2": (17, 24, 101, None, F16, False, 2),
    "g32_m3": (3, 37, 90, 32, F16, True, None),
    "g24_gathered_m3": (3, 20, 70, 24, F32, False, 3),
}


@pytest.mark.parametrize("case", list(INT8_LINEAR))
def test_int8_linear_matches_twin(case):
    m, n, k, group, dtype, with_bias, split_k = INT8_LINEAR[case]
    q8, scale = int8_weight(n, k, group, seed=len(case))
    x = rand(m, k, dtype=dtype, seed=m)
    bias = rand(n, dtype=dtype, seed=9) if with_bias else None
    y = qt.int8_linear(x, q8, scale, bias=bias, split_k=split_k)
    twin = ref.int8_linear(x, q8, scale, bias=bias)
    assert y.shape == twin.shape and y.dtype == dtype
    assert rel_err(y, twin) <= TOL[dtype]


# ---------------------------------------------------------------------------------------- grouped experts

def expert_bank(fmt, experts, hidden, inter, seed, device=DEVICE, dtype=F16):
    """A uint8 bank [experts, row_bytes] holding one gated expert module per row in the format's layout
    (rows spaced wider than a module: the stacks are strided views), and its stacks by stored name."""
    shapes = {"gate.weight": (inter, hidden), "up.weight": (inter, hidden), "down.weight": (hidden, inter)}
    layout = fmt.layout(list(shapes.items()), dtype)
    bank = torch.zeros(experts, layout.nbytes + 512, dtype=torch.uint8)
    for e in range(experts):
        views = layout.views(bank[e])
        for i, (name, shape) in enumerate(shapes.items()):
            for stored, t in fmt.encode(name, weight(*shape, seed + 10 * e + i), dtype).items():
                views[stored].copy_(t)
    bank = bank.to(device)
    return fmt.expert_stacks(bank, layout.items)


def stack_of(stacks, name, bits):
    if bits == 4:
        return stacks[f"{name}.q4"], stacks[f"{name}.scale"], stacks.get(f"{name}.min")
    return stacks[f"{name}.q8"], stacks[f"{name}.scale"]


def offsets_of(sizes, device=DEVICE):
    acc = [0]
    for s in sizes:
        acc.append(acc[-1] + s)
    return torch.tensor(acc, dtype=torch.int32, device=device)


def run_experts(module, x, stacks, offsets, slots, bits, group, out=None):
    """The engine's two launches: h = swiglu(x; gate, up), y = h @ down.T per group."""
    gate, up, down = (stack_of(stacks, f"{w}.weight", bits) for w in ("gate", "up", "down"))
    if bits == 4:
        h = module.grouped_swiglu_int4(x, gate, up, offsets, slots, group)
        return h, module.grouped_gemm_int4(h, down, offsets, slots, group, out=out)
    h = module.grouped_swiglu_int8(x, gate, up, offsets, slots)
    return h, module.grouped_gemm_int8(h, down, offsets, slots, out=out)


# (format, group sizes (empty and uneven ones), slot per group, hidden, inter, dtype)
GROUPED = {
    "int4_sym_g32": (Int4Format(32), [5, 0, 17, 1, 0, 9], [2, 0, 2, 1, 3, 0], 48, 40, F16),
    "int4_asym_g64": (Int4Format(64, asymmetric=True), [0, 3, 20, 0], [1, 1, 0, 2], 64, 72, F32),
    "int8_g32": (Int8Format(32), [7, 0, 11], [1, 2, 0], 48, 40, F16),
}


@pytest.mark.parametrize("case", list(GROUPED))
def test_grouped_experts_from_a_bank_match_twin(case):
    fmt, sizes, slots, hidden, inter, dtype = GROUPED[case]
    bits = 8 if isinstance(fmt, Int8Format) else 4
    stacks = expert_bank(fmt, 4, hidden, inter, seed=len(case), dtype=dtype)
    assert stacks[f"gate.weight.q{bits}"].stride(0) > stacks[f"gate.weight.q{bits}"][0].numel()  # strided rows
    x = rand(sum(sizes) + 3, hidden, dtype=dtype, seed=6)[: sum(sizes)]
    offsets, slots_t = offsets_of(sizes), torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    out = torch.full((sum(sizes) + 2, hidden), float("nan"), dtype=dtype, device=DEVICE)
    h, y = run_experts(qt, x, stacks, offsets, slots_t, bits, fmt.group, out=out[: sum(sizes)])
    h_twin, y_twin = run_experts(ref, x, stacks, offsets, slots_t, bits, fmt.group)
    assert rel_err(h, h_twin) <= TOL[dtype]
    assert rel_err(y, y_twin) <= TOL[dtype]
    assert torch.isnan(out[sum(sizes):]).all(), "wrote past the out view"


def test_dequant_int4_of_a_bank_stack_is_bit_exact():
    # The scratch path for large micro-batches: a chunk's strided stack expanded whole ([S, N, K]).
    stacks = expert_bank(Int4Format(32, asymmetric=True), 3, 48, 40, seed=7)
    q4, scale, low = stack_of(stacks, "down.weight", 4)
    out = qt.dequant_int4(q4, scale, low, 32, 40, F16)
    assert out.shape == (3, 48, 40) and torch.equal(out, ref.dequant_int4(q4, scale, low, 32, 40, F16))


def test_grouped_with_no_rows_or_no_groups_writes_nothing():
    stacks = expert_bank(Int4Format(32), 2, 32, 32, seed=8)
    gate = stack_of(stacks, "gate.weight", 4)
    x = rand(4, 32, dtype=F16, seed=1)
    out = torch.full((4, 32), 7.0, dtype=F16, device=DEVICE)
    no_groups = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    for module in (qt, ref):
        module.grouped_gemm_int4(x, gate, offsets_of([0, 0]), torch.tensor([0, 1], dtype=torch.int32, device=DEVICE),
                                 32, out=out)  # fmt: skip
        module.grouped_gemm_int4(x, gate, offsets_of([]), no_groups, 32, out=out)
        assert (out == 7.0).all()


# -------------------------------------------------------------------------------------------- bad input

def _bad_calls():
    q4, scale, low = int4_weight(8, 64, 32, True, seed=1, device="cpu")
    q8, s8 = int8_weight(8, 64, 32, seed=1, device="cpu")
    x = torch.zeros(2, 64)
    return {
        "group_mismatch": (lambda m: m.dequant_int4(q4, scale, low, 64, 64, F32), ValueError),
        "odd_group": (lambda m: m.dequant_int4(q4, scale, low, 33, 64, F32), ValueError),
        "k_past_row": (lambda m: m.dequant_int4(q4, scale, low, 32, 65, F32), ValueError),
        "q4_not_uint8": (lambda m: m.dequant_int4(q4.to(torch.int8), scale, low, 32, 64, F32), TypeError),
        "min_shape": (lambda m: m.dequant_int4(q4, scale, low[:, :1], 32, 64, F32), ValueError),
        "int_dtype_out": (lambda m: m.dequant_int8(q8, s8, torch.int32), TypeError),
        "x_wider_than_row": (lambda m: m.int4_linear(torch.zeros(2, 65), q4, scale, low, 32), ValueError),
        "x_int": (lambda m: m.int8_linear(x.to(torch.int32), q8, s8), TypeError),
        "bias_shape": (lambda m: m.int8_linear(x, q8, s8, bias=torch.zeros(9)), ValueError),
        "scales_uneven": (lambda m: m.int8_linear(x, q8, torch.ones(8, 3, dtype=F16)), ValueError),
        "stack_not_3d": (lambda m: m.grouped_gemm_int4(x, (q4, scale, low), offsets_of([2], "cpu"),
                                                       torch.zeros(1, dtype=torch.int32), 32), ValueError),
        "slot_out_of_range": (lambda m: m.grouped_gemm_int4(x, (q4[None], scale[None], low[None]), offsets_of([2], "cpu"),
                                                            torch.ones(1, dtype=torch.int32), 32), ValueError),
    }  # fmt: skip


@pytest.mark.parametrize("name", list(_bad_calls()))
@pytest.mark.parametrize("module", [ref, qt], ids=["twin", "triton"])
def test_bad_input_is_rejected_before_launch(module, name):
    call, error = _bad_calls()[name]
    with pytest.raises(error):
        call(module)


def test_should_fuse_takes_few_rows_only():
    assert qt.should_fuse(1, 14336, 4096) and qt.should_fuse(32, 4096, 14336)  # the H200's crossover
    assert not qt.should_fuse(64, 4096, 14336)
    assert not qt.should_fuse(4096, 14336, 4096)


# ----------------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("group,asym", [(32, False), (64, True), (128, False), (128, True)])
def test_gpu_dequant_int4_bf16_is_bit_exact(group, asym):
    q4, scale, low = int4_weight(1000, 1000, group, asym, seed=group, device="cuda")
    for dtype in (BF16, F16, F32):
        assert torch.equal(qt.dequant_int4(q4, scale, low, group, 1000, dtype),
                           ref.dequant_int4(q4, scale, low, group, 1000, dtype))  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("group", [None, 32])
def test_gpu_dequant_int8_bf16_is_bit_exact(group):
    q8, scale = int8_weight(1000, 1000, group, seed=2, device="cuda")
    for dtype in (BF16, F16):
        assert torch.equal(qt.dequant_int8(q8, scale, dtype, k=1000), ref.dequant_int8(q8, scale, dtype, k=1000))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 200])
@pytest.mark.parametrize("shape", [(3584, 1024), (1024, 3584), (1000, 1000)], ids=["up", "down", "ragged"])
@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=["bf16", "fp16", "fp32"])
def test_gpu_linear_matches_twin(m, shape, dtype):
    n, k = shape
    x, bias = rand(m, k, dtype=dtype, seed=m), rand(n, dtype=dtype, seed=1)
    for group, asym in ((64, False), (32, True), (128, False)):
        q4, scale, low = int4_weight(n, k, group, asym, seed=m + group, device="cuda")
        twin = ref.int4_linear(x, q4, scale, low, group, bias=bias)
        assert rel_err(qt.int4_linear(x, q4, scale, low, group, bias=bias), twin) <= TOL[dtype]
    for group in (None, 32):
        q8, scale = int8_weight(n, k, group, seed=m, device="cuda")
        assert rel_err(qt.int8_linear(x, q8, scale, bias=bias), ref.int8_linear(x, q8, scale, bias=bias)) <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("sizes", [[3, 1, 0, 4, 2, 0, 5, 1], [498, 530, 0, 489, 540, 1, 507, 519]],
                         ids=["decode", "prefill"])
@pytest.mark.parametrize("fmt", [Int4Format(64), Int4Format(32, asymmetric=True), Int8Format(32)],
                         ids=["int4", "int4_asym", "int8"])
def test_gpu_grouped_experts_bf16_match_twin(sizes, fmt):
    bits = 8 if isinstance(fmt, Int8Format) else 4
    stacks = expert_bank(fmt, 8, 1024, 3584, seed=3, device="cuda", dtype=BF16)
    x = rand(sum(sizes), 1024, dtype=BF16, seed=4)
    offsets, slots = offsets_of(sizes, "cuda"), torch.arange(8, dtype=torch.int32, device="cuda").flip(0)
    h, y = run_experts(qt, x, stacks, offsets, slots, bits, fmt.group)
    h_twin, y_twin = run_experts(ref, x, stacks, offsets, slots, bits, fmt.group)
    assert rel_err(h, h_twin) <= TOL[BF16] and rel_err(y, y_twin) <= TOL[BF16]
