"""The int4 and int8 formats computing through the Triton kernels (interpreted on the CPU, compiled on a
GPU): `linear` on both of its paths (fused for few rows, expanded + GEMM for many) equals the format's
torch twin, and the streaming engine whose grouped experts run the quantized Triton kernels gives the
reference forward's greedy tokens over the same quantized weights."""

import os

import pytest
import torch
from triton_support import triton_kernel_module
import torch.nn.functional as F

import offbatch.kernels
from hf_factory import save_hf_model
from offbatch.formats import get_format

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
PROMPTS = [[3, 5, 7, 9, 11, 13, 2], [4, 8, 15, 16, 23, 42, 1, 2, 3], [99], [7, 7, 7]]


@pytest.fixture
def triton_quant(monkeypatch):
    """offbatch.kernels dispatching to quant_triton (the interpreter on the CPU), counting its launches."""
    module = triton_kernel_module("quant_triton", monkeypatch.setenv)
    calls: dict[str, int] = {}
    for name in ("int4_linear", "int8_linear", "dequant_int4", "dequant_int8", "grouped_swiglu_int4",
                 "grouped_gemm_int4", "grouped_swiglu_int8", "grouped_gemm_int8"):
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kw)

        monkeypatch.setattr(module, name, spy)
    assert offbatch.kernels.backend(torch.empty(1, device=DEVICE)) == "triton"
    return calls


@pytest.mark.parametrize("name", ["int4", "int4-asym-g32", "int8", "int8-g32"])
@pytest.mark.parametrize("rows", [3, 200], ids=["fused", "expanded"])
def test_linear_through_the_kernels_equals_the_twin(name, rows, triton_quant):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(rows)
    n, k = 40, 100  # ragged: k is not a multiple of the groups
    w = {s: t.to(DEVICE) for s, t in fmt.encode("q.weight", torch.randn(n, k, generator=g), torch.float32).items()}
    w["q.bias"] = torch.randn(n, generator=g).to(DEVICE)
    x = torch.randn(rows, k, generator=g).to(DEVICE)
    got = fmt.kernel_linear(x, w, "q")
    twin = F.linear(x, fmt.dequantize(w, "q.weight", torch.float32, k), w["q.bias"])
    assert got.shape == (rows, n) and ((got - twin).norm() / twin.norm()).item() < 1e-5
    bits = "int4" if name.startswith("int4") else "int8"
    assert triton_quant == ({f"{bits}_linear": 1} if rows <= offbatch.kernels.FUSE_MAX_ROWS else {f"dequant_{bits}": 1})


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    save_hf_model("mixtral", path)
    return path


@pytest.mark.parametrize("name", ["int4"])  # int8's grouped kernels: tests/test_kernels_quant.py
def test_engine_experts_run_the_quantized_grouped_kernels(mixtral, name, triton_quant):
    from offbatch.engine.api import GenRequest, SamplingParams
    from offbatch.engine.build import engine_for_folder
    from offbatch.engine.reference import ReferenceModel

    expected = ReferenceModel.load(mixtral, dtype="float32", weights=name).greedy(PROMPTS, 4)
    eng = engine_for_folder(mixtral, device=DEVICE, dtype="float32", num_requests=len(PROMPTS), max_len=32,
                            max_resident_bytes=0, weights=name)
    assert eng.experts is not None
    eng.experts.kernels = offbatch.kernels  # on the CPU the engine takes the twins; here Triton
    reqs = [GenRequest(i, p, SamplingParams(max_tokens=4, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    outs = {o.key: o.token_ids for o in eng.generate(reqs)}
    assert [outs[i] for i in range(len(PROMPTS))] == expected
    assert triton_quant.get(f"grouped_swiglu_{name}", 0) > 0 and triton_quant.get(f"grouped_gemm_{name}", 0) > 0


def test_the_interpreter_is_what_ran_on_the_cpu():
    if not CUDA:
        assert os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("name", ["int4", "int4-asym-g32", "int8"])
@pytest.mark.parametrize("rows", [(2, 0, 3), (40, 0, 70, 33)], ids=["fused", "expanded"])
def test_grouped_experts_on_both_paths_equal_the_dense_twin(name, rows):
    """Few rows per expert: the fused grouped kernels; many: experts expanded EXPAND_EXPERTS at a time into
    the dense grouped kernels. Both equal the dense grouped twin over the decoded experts (the twins here:
    the Triton side of both paths is in tests/test_kernels_quant.py)."""
    from offbatch.kernels import reference

    fmt = get_format(name)
    g = torch.Generator().manual_seed(len(rows))
    hidden, inter, experts = 64, 48, 4
    shapes = [("down.weight", (hidden, inter)), ("gate.weight", (inter, hidden)), ("up.weight", (inter, hidden))]
    layout = fmt.layout(shapes, torch.float32)
    bank = torch.zeros(experts, layout.nbytes, dtype=torch.uint8)
    dense = {n: torch.empty(experts, *s) for n, s in shapes}
    for e in range(experts):
        views = layout.views(bank[e])
        for n, s in shapes:
            for stored, t in fmt.encode(n, torch.randn(*s, generator=g) / 8, torch.float32).items():
                views[stored].copy_(t)
            dense[n][e] = fmt.dequantize(views, n, torch.float32, s[1])
    stacks = fmt.expert_stacks(bank, layout.items)
    sizes = list(rows)
    offsets = torch.tensor([0] + [sum(sizes[: i + 1]) for i in range(len(sizes))], dtype=torch.int32)
    slots = torch.tensor([3, 1, 0, 2][: len(sizes)], dtype=torch.int32)
    x = torch.randn(sum(sizes), hidden, generator=g)
    h = fmt.grouped_swiglu(reference, x, stacks, offsets, slots)
    want_h = reference.grouped_swiglu(x, dense["gate.weight"], dense["up.weight"], offsets, slots)
    assert torch.allclose(h, want_h, rtol=1e-5, atol=1e-6)
    y = fmt.grouped_gemm(reference, h, stacks, offsets, slots)
    assert torch.allclose(y, reference.grouped_gemm(h, dense["down.weight"], offsets, slots), rtol=1e-5, atol=1e-6)


def test_the_planner_prices_expanding_a_compressed_format_past_the_fused_rows():
    """The same residency and knobs in bf16 and int4: int4's decode step carries the expansion of every
    module it uses (stored bytes read + dense written, at the fitted rate), and none when the wave is small
    enough for the fused kernel."""
    import dataclasses

    from offbatch.planner.cost import StepModel, expansion_bytes
    from offbatch.planner.memory import Knobs
    from offbatch.planner.residency import residency_of
    from offbatch.planner.shape import shape_from_spec
    from offbatch.planner.solve import resolve_hardware
    from offbatch.models.spec import spec_from_config
    from offbatch.tools.synth import synth_config

    spec = spec_from_config(synth_config("llama-3-8b", layers=2))
    hw = resolve_hardware("h200", "cuda")
    hw = dataclasses.replace(hw, host=dataclasses.replace(hw.host, launch_s=0.0))  # compute, not launches
    shapes = {n: shape_from_spec(spec, torch.bfloat16, get_format(n)) for n in ("dense", "int4")}
    gpu = {}
    for wave in (16, 512):
        knobs = Knobs(wave, 64, 4096, wave, "device-kv")
        for name, shape in shapes.items():
            model = StepModel(shape, hw, knobs, residency_of(shape, set(shape.nbytes), {}), 128)
            gpu[name, wave] = model.step(wave, 0, 64, 96, 128).gpu_s
    per_layer = expansion_bytes(shapes["int4"])
    want = spec.num_layers * (per_layer["attn"] + per_layer["ffn"]) / (hw.mem_bytes_s * get_format("int4").expand_efficiency)
    assert gpu["int4", 512] - gpu["dense", 512] == pytest.approx(want, rel=1e-6)
    assert gpu["int4", 16] == pytest.approx(gpu["dense", 16], rel=1e-9)  # 16 rows: the fused kernel


def test_each_format_prices_its_expansion_at_its_own_efficiency():
    """The bitmap expansion is priced at its own (faster) share of the memory rate, int4's at its own: the
    same stored and dense bytes cost bitmap half the time at 0.2 against 0.1; keep= takes its inner format's."""
    import dataclasses

    from offbatch.planner.cost import StepModel, expansion_bytes
    from offbatch.planner.memory import Knobs
    from offbatch.planner.residency import residency_of
    from offbatch.planner.shape import shape_from_spec
    from offbatch.planner.solve import resolve_hardware
    from offbatch.models.spec import spec_from_config
    from offbatch.tools.synth import synth_config

    spec = spec_from_config(synth_config("llama-3-8b", layers=2))
    hw = resolve_hardware("h200", "cuda")
    hw = dataclasses.replace(hw, host=dataclasses.replace(hw.host, launch_s=0.0))
    knobs = Knobs(512, 64, 4096, 512, "device-kv")
    gpu = {}
    for name in ("dense", "bitmap-50", "int4+keep=o"):
        shape = shape_from_spec(spec, torch.bfloat16, get_format(name))
        gpu[name] = StepModel(shape, hw, knobs, residency_of(shape, set(shape.nbytes), {}), 128).step(512, 0, 64, 96, 128).gpu_s
        if name != "dense":
            per_layer = expansion_bytes(shape)
            want = spec.num_layers * (per_layer["attn"] + per_layer["ffn"]) / (hw.mem_bytes_s * get_format(name).expand_efficiency)
            assert gpu[name] - gpu["dense"] == pytest.approx(want, rel=1e-6), name
    assert get_format("bitmap-50").expand_efficiency == 2 * get_format("int4").expand_efficiency
    assert get_format("int4+keep=o").expand_efficiency == get_format("int4").expand_efficiency


def test_moe_experts_expansion_is_priced_at_the_experts_efficiency():
    """Mixtral int4 at a large step: the attention modules' expansion at the dense modules' efficiency, every
    used expert's at the experts' (their grouped path); keep=o keeps both figures of its inner format."""
    import dataclasses

    from offbatch.planner.cost import StepModel, expansion_bytes
    from offbatch.planner.memory import Knobs
    from offbatch.planner.residency import residency_of
    from offbatch.planner.shape import shape_from_spec
    from offbatch.planner.solve import resolve_hardware
    from offbatch.models.spec import spec_from_config
    from offbatch.tools.synth import synth_config

    spec = spec_from_config(synth_config("mixtral-8x7b", layers=2))
    hw = resolve_hardware("h200", "cuda")
    hw = dataclasses.replace(hw, host=dataclasses.replace(hw.host, launch_s=0.0))
    knobs = Knobs(1024, 64, 4096, 1024, "device-kv")
    fmt = get_format("int4")
    gpu = {}
    for name in ("dense", "int4"):
        shape = shape_from_spec(spec, torch.bfloat16, get_format(name))
        gpu[name] = StepModel(shape, hw, knobs, residency_of(shape, set(shape.nbytes), {}), 128).step(1024, 0, 64, 96, 128).gpu_s
    per_layer = expansion_bytes(shape_from_spec(spec, torch.bfloat16, fmt))
    experts = spec.moe.num_experts  # 1024 tokens x top-2 over 8 experts: every expert is used
    want = spec.num_layers * (per_layer["attn"] / fmt.expand_efficiency
                              + experts * per_layer["expert"] / fmt.expert_expand_efficiency) / hw.mem_bytes_s
    assert gpu["int4"] - gpu["dense"] == pytest.approx(want, rel=1e-3)
    assert fmt.expert_expand_efficiency > fmt.expand_efficiency
    assert get_format("int4+keep=o").expert_expand_efficiency == fmt.expert_expand_efficiency
