"""Grouped GEMM kernels: Triton vs torch twin vs float64, on ragged expert groups.

Without CUDA the Triton kernels run on the CPU through the Triton interpreter (fp32/fp16 only, tiny
sizes: it is numpy per program). With CUDA the same cases run compiled on the GPU, and the
`gpu`-marked tests add bf16 and engine-sized shapes (`pytest -m gpu`).
"""

import pytest
import torch
from triton_support import triton_kernel_module

import offbatch.kernels as kernels
from offbatch.kernels import reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


tk = triton_kernel_module("grouped_gemm_triton")

# ||out - ref|| / ||ref|| bounds. Against the twin both sides round the same fp32 sums once, so only
# summation order differs; against float64 the output's own rounding dominates.
TOL_TWIN = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}
TOL_F64 = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}


def _offsets(sizes, start=0):
    return torch.tensor([start] + [start + sum(sizes[: i + 1]) for i in range(len(sizes))], dtype=torch.int32)


def _make(sizes, slots, n_slots, K, N, dtype, seed, device=DEVICE, extra_rows=(0, 0), gated=False):
    """Random x, weight stack(s), offsets and slots; extra_rows adds rows before/after all groups."""
    gen = torch.Generator().manual_seed(seed)
    before, after = extra_rows
    T = before + sum(sizes) + after
    x = torch.randn(T, K, generator=gen).to(dtype)
    # Scale like nn.Linear so that products stay O(1) in fp16.
    ws = [(torch.randn(n_slots, N, K, generator=gen) / K**0.5).to(dtype) for _ in range(2 if gated else 1)]
    offsets = _offsets(sizes, start=before)
    slots_t = torch.tensor(slots, dtype=torch.int32)
    return [t.to(device) for t in (x, *ws, offsets, slots_t)]


def _float64_reference(x, weights, offsets, slots, gated):
    """What every covered row should be, from scratch in float64; uncovered rows are NaN."""
    y = torch.full((x.shape[0], weights[0].shape[1]), float("nan"), dtype=torch.float64)
    offsets, slots = offsets.tolist(), slots.tolist()
    for g, s in enumerate(slots):
        xg = x[offsets[g] : offsets[g + 1]].double().cpu()
        prods = [xg @ w[s].double().cpu().T for w in weights]
        y[offsets[g] : offsets[g + 1]] = torch.nn.functional.silu(prods[0]) * prods[1] if gated else prods[0]
    return y


def _rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def _run(module, x, weights, offsets, slots, out=None):
    if len(weights) == 2:
        return module.grouped_swiglu(x, weights[0], weights[1], offsets, slots, out=out)
    return module.grouped_gemm(x, weights[0], offsets, slots, out=out)


def _check(sizes, slots, n_slots, K, N, dtype, seed, gated=False, device=DEVICE):
    x, *rest = _make(sizes, slots, n_slots, K, N, dtype, seed, device=device, gated=gated)
    *weights, offsets, slots_t = rest
    out = torch.full((x.shape[0], N), float("nan"), dtype=dtype, device=device)  # poison
    y = _run(tk, x, weights, offsets, slots_t, out=out)
    assert y is out and y.dtype == dtype and y.shape == (x.shape[0], N)
    assert torch.isfinite(y).all(), "some output element was never written"
    twin = _run(reference, x, weights, offsets, slots_t)
    assert _rel_err(y, twin) <= TOL_TWIN[dtype]
    assert _rel_err(y, _float64_reference(x, weights, offsets, slots_t, gated)) <= TOL_F64[dtype]
    return y


# (sizes per group, slot per group, number of slots, K, N). Interpreter blocks are 16x16x16.
CASES = {
    # empty groups in the middle, slots 0 and 2 used twice, T=32 but groups straddle tiles, K and N ragged
    "ragged": ([5, 0, 17, 1, 0, 9], [2, 0, 2, 1, 3, 0], 4, 24, 40),
    # one group, T not a multiple of the block, K a multiple (the unmasked-K path)
    "single": ([23], [1], 2, 32, 20),
    # empty groups first and last
    "empty_ends": ([0, 0, 18, 0], [0, 1, 1, 0], 2, 16, 24),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_grouped_gemm_matches_twin_and_float64(case, dtype):
    _check(*CASES[case], dtype=dtype, seed=list(CASES).index(case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", ["ragged", "single"])
def test_grouped_swiglu_matches_twin_and_float64(case, dtype):
    _check(*CASES[case], dtype=dtype, seed=7 + len(case), gated=True)


def test_out_of_place_result_is_fresh_and_correct():
    x, w, offsets, slots = _make([9, 0, 12], [1, 1, 0], 2, 24, 20, torch.float32, seed=3)
    y = tk.grouped_gemm(x, w, offsets, slots)
    assert y.shape == (21, 20) and y.dtype == torch.float32
    assert _rel_err(y, _float64_reference(x, [w], offsets, slots, gated=False)) <= 1e-5


def test_rows_outside_every_group_are_left_untouched():
    # Rows 0..2 and the last 4 belong to no group (e.g. a preallocated buffer used in part).
    x, w, offsets, slots = _make([6, 11], [1, 0], 2, 16, 20, torch.float16, seed=4, extra_rows=(3, 4))
    out = torch.full((x.shape[0], 20), float("nan"), dtype=torch.float16, device=DEVICE)
    tk.grouped_gemm(x, w, offsets, slots, out=out)
    covered = torch.zeros(x.shape[0], dtype=torch.bool)
    covered[3:20] = True
    assert torch.isnan(out[~covered.to(DEVICE)]).all()
    assert torch.isfinite(out[covered.to(DEVICE)]).all()
    ref = _float64_reference(x, [w], offsets, slots, gated=False)
    assert _rel_err(out[3:20], ref[3:20]) <= TOL_F64[torch.float16]


def test_strided_views_gate_up_halves_and_wide_buffers():
    # A stacked [S, 2N, K] gate/up tensor split into halves, x a column slice, out a slice of a wider buffer.
    gen = torch.Generator().manual_seed(5)
    S, N, K, sizes, slots = 3, 20, 24, [7, 0, 13], [2, 0, 2]
    gate_up = (torch.randn(S, 2 * N, K, generator=gen) / K**0.5).to(DEVICE)
    wide_x = torch.randn(sum(sizes), K + 8, generator=gen).to(DEVICE)
    x = wide_x[:, 4 : 4 + K]
    offsets, slots_t = _offsets(sizes).to(DEVICE), torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    wide_out = torch.full((sum(sizes), 2 * N), float("nan"), device=DEVICE)
    h = tk.grouped_swiglu(x, gate_up[:, :N], gate_up[:, N:], offsets, slots_t, out=wide_out[:, :N])
    ref = _float64_reference(x, [gate_up[:, :N], gate_up[:, N:]], offsets, slots_t, gated=True)
    assert _rel_err(h, ref) <= 1e-5
    assert torch.isnan(wide_out[:, N:]).all(), "wrote outside the out view"


def test_nothing_to_do():
    x, w, offsets, slots = _make([0, 0], [0, 1], 2, 16, 16, torch.float32, seed=6, extra_rows=(0, 5))
    out = torch.full((5, 16), 7.0, device=DEVICE)
    tk.grouped_gemm(x, w, offsets, slots, out=out)
    assert (out == 7.0).all()
    no_rows = torch.empty(0, 16, device=DEVICE)
    assert tk.grouped_gemm(no_rows, w, torch.zeros(1, dtype=torch.int32, device=DEVICE),
                           torch.zeros(0, dtype=torch.int32, device=DEVICE)).shape == (0, 16)  # fmt: skip


def _bad_inputs():
    """(name, mutation of the good arguments, expected exception)."""
    def bad(**changes):
        return changes

    f32, f16 = torch.float32, torch.float16
    return [
        ("x_1d", bad(x=torch.zeros(8)), ValueError),
        ("x_int", bad(x=torch.zeros(8, 16, dtype=torch.int32)), TypeError),
        ("w_2d", bad(w=torch.zeros(16, 16)), ValueError),
        ("k_mismatch", bad(w=torch.zeros(2, 16, 8)), ValueError),
        ("w_dtype", bad(w=torch.zeros(2, 16, 16, dtype=f16)), TypeError),
        ("offsets_int64", bad(offsets=torch.tensor([0, 4, 8])), TypeError),
        ("offsets_length", bad(offsets=torch.tensor([0, 8], dtype=torch.int32)), ValueError),
        ("offsets_decreasing", bad(offsets=torch.tensor([0, 6, 4], dtype=torch.int32)), ValueError),
        ("offsets_past_end", bad(offsets=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError),
        ("slot_out_of_range", bad(slots=torch.tensor([0, 2], dtype=torch.int32)), ValueError),
        ("slot_negative", bad(slots=torch.tensor([-1, 0], dtype=torch.int32)), ValueError),
        ("out_shape", bad(out=torch.zeros(8, 15)), ValueError),
        ("out_dtype", bad(out=torch.zeros(8, 16, dtype=f16)), TypeError),
        ("gate_up_shapes_differ", bad(w_up=torch.zeros(2, 8, 16, dtype=f32)), ValueError),
    ]


@pytest.mark.parametrize("name,changes,error", _bad_inputs(), ids=[b[0] for b in _bad_inputs()])
@pytest.mark.parametrize("module", [tk, reference], ids=["triton", "twin"])
def test_bad_input_is_rejected_before_launch(module, name, changes, error):
    args = dict(
        x=torch.zeros(8, 16), w=torch.zeros(2, 16, 16), w_up=torch.zeros(2, 16, 16),
        offsets=torch.tensor([0, 4, 8], dtype=torch.int32), slots=torch.tensor([0, 1], dtype=torch.int32), out=None,
    )  # fmt: skip
    args.update(changes)
    with pytest.raises(error):
        if "w_up" in changes:
            module.grouped_swiglu(args["x"], args["w"], args["w_up"], args["offsets"], args["slots"], args["out"])
        else:
            module.grouped_gemm(args["x"], args["w"], args["offsets"], args["slots"], args["out"])


def test_dispatch_picks_triton_on_cuda_or_interpreter_else_twin(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, w, offsets, slots = _make([3, 5], [1, 0], 2, 16, 16, torch.float32, seed=8, device="cpu")
    if not CUDA:
        assert torch.isfinite(kernels.grouped_gemm(x, w, offsets, slots)).all()
    assert kernels.backend(cpu) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert kernels.backend(cpu) == "torch"
    if CUDA:
        assert kernels.backend(cpu.cuda()) == "triton"
    # The CPU path is the twin itself: bit-identical results.
    torch.testing.assert_close(kernels.grouped_gemm(x, w, offsets, slots),
                               reference.grouped_gemm(x, w, offsets, slots), rtol=0, atol=0)  # fmt: skip


# ----------------------------------------------------------------------------------------------- GPU

GPU_CASES = {
    **CASES,
    # 9 ragged groups over 5 slots, K and N not multiples of any block, two empty groups
    "ragged_large": ([700, 0, 1, 333, 1200, 0, 64, 17, 512], [4, 0, 4, 1, 2, 3, 0, 1, 2], 5, 1000, 1500),
    # Mixtral-like at quarter width: 4096 rows (2048 tokens, top-2) over 8 experts
    "mixtral_quarter": ([498, 530, 511, 489, 540, 502, 507, 519], list(range(8)), 8, 1024, 3584),
    # decode-sized: a handful of rows per expert
    "decode": ([3, 1, 0, 4, 2, 0, 5, 1], list(range(8)), 8, 4096, 2048),
}


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [False, True], ids=["gemm", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_matches_twin_and_float64(case, dtype, gated):
    _check(*GPU_CASES[case], dtype=dtype, seed=11, gated=gated, device="cuda")


@pytest.mark.gpu
def test_gpu_fp32_is_true_fp32_not_tf32():
    _check(*GPU_CASES["ragged_large"], dtype=torch.float32, seed=12, device="cuda")


def test_warm_up_runs_both_kernels_for_every_tile_class_and_parity():
    # scripts/plan_grid.py compiles the kernels before timing anything; here (interpreted on the CPU)
    # the launches it makes must be valid grouped calls: three tile classes x row parity x two kernels.
    assert kernels.warm_up_grouped(16, 32, torch.float32, DEVICE) == 12


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_warm_up_compiles_mixtral_expert_shapes_in_bf16():
    # What plan_grid.py runs before timing a MoE grid: Mixtral's expert shapes, bf16, every tile class.
    assert kernels.warm_up_grouped(4096, 14336, torch.bfloat16, "cuda") == 12
