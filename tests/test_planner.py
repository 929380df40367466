"""The planner: shapes without weights, hardware profiles and the probe, the cost model against the
recorded H200 runs, and the solver's promises (budgets kept, caps above the machine refused, monotone
in memory, a clear minimum, deterministic, the same plan under probe noise)."""

import json
from pathlib import Path

import pytest
import torch

from offbatch.attention import get_attention
from offbatch.errors import BudgetError, OffbatchError, PlanFileError
from offbatch.offload.kv import kv_format
from offbatch.models.spec import spec_from_config
from offbatch.tools.synth import synth_config
from offbatch.offload.weights import SynthSource, WeightStore
from offbatch.planner.hardware import PROFILES, Hardware, load_hardware
from offbatch.planner.memory import SAFETY
from offbatch.plan import Plan
from offbatch.planner.shape import shape_from_spec, shape_from_store
from offbatch.planner.solve import make_plan
from offbatch.planner.workload import Workload
from offbatch.units import parse_bytes

GiB = 1 << 30
BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "2026-11-28"


def spec_of(preset, layers=None):
    return spec_from_config(synth_config(preset, layers=layers))


# ---- shapes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2_moe", "opt", "mixtral", "qwen3"])
def test_shape_sizes_equal_the_packed_store(family):
    spec = spec_of(family)
    store = WeightStore(SynthSource(spec), torch.float32, pin=False)
    assert shape_from_spec(spec, torch.float32).nbytes == shape_from_store(store).nbytes
    assert shape_from_spec(spec, torch.float32).total_bytes == store.total_bytes


def test_shape_of_a_real_preset_matches_the_recorded_run():
    rec = json.loads((BENCH / "mixtral-offbatch.json").read_text())
    shape = shape_from_spec(spec_of("mixtral-8x7b", 8), torch.bfloat16)
    assert shape.total_bytes == rec["weights_bytes"]
    assert kv_format("dense", shape.dtype).bytes_per_token(shape.spec) == 2 * 8 * 1024 * 2


# ---- hardware ---------------------------------------------------------------------------------------
def test_profiles_cover_the_named_gpus_and_round_trip(tmp_path):
    for name in ("rtx3060-12g", "rtx4060ti-16g", "rtx4090", "l4", "a10", "h200"):
        hw = PROFILES[name]
        assert hw.gpu_memory_bytes > 8 * GiB and hw.h2d_pinned_bytes_s > 1e9 and hw.host.memory_bytes > 0
        again = Hardware.from_dict(json.loads(json.dumps(hw.to_dict())))
        assert again.to_dict() == hw.to_dict()
    assert PROFILES["h200"].h2d_pinned_bytes_s == 54.7e9
    assert PROFILES["rtx4060ti-16g"].h2d_pinned_bytes_s < PROFILES["rtx4090"].h2d_pinned_bytes_s  # x8 link
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"hardware": PROFILES["l4"].to_dict()}))  # a whole `plan --json` report
    assert load_hardware(str(path)).gpu_name == "NVIDIA L4"
    with pytest.raises(OffbatchError, match="unknown hardware"):
        load_hardware("gtx9999")
    path.write_text(json.dumps({"name": "x"}))
    with pytest.raises(OffbatchError, match="not a hardware profile"):
        load_hardware(str(path))


def test_gemm_rate_interpolates_between_measured_points():
    hw = PROFILES["h200"]
    for m, r in hw.gemm_flop_s.items():
        assert hw.gemm_rate(m) == pytest.approx(r)
        assert float(hw.gemm_rates([m])[0]) == pytest.approx(r)
    rates = [hw.gemm_rate(m) for m in (1, 8, 16, 40, 64, 100, 256, 600, 1024, 8192)]
    assert all(b >= a * (1 - 1e-12) for a, b in zip(rates, rates[1:])) and rates[-1] == hw.gemm_flop_s[1024]
    assert hw.gemm_rate(8) == pytest.approx(hw.gemm_flop_s[16] / 2)  # below the points: bound by the weight read


def test_probe_measures_and_caches(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from offbatch.planner import probe

    monkeypatch.setenv("OFFBATCH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"w": torch.ones(1 << 20)}, str(folder / "model.safetensors"))
    hw = probe.probe_hardware("cpu", folder)
    assert hw.device == "cpu" and hw.h2d_pinned_bytes_s > 1e8 and hw.host.cpu_attn_bytes_s > 1e7
    assert min(hw.gemm_flop_s.values()) > 1e8 and hw.host.memory_bytes > 1 << 30
    # Every measured rate is on the probe's grid: probe noise of a percent or two mostly lands on one value.
    rates = [hw.h2d_pinned_bytes_s, hw.d2h_bytes_s, hw.mem_bytes_s, hw.host.cpu_attn_bytes_s,
             hw.host.disk_read_bytes_s, *hw.gemm_flop_s.values()]
    assert all(probe.snap_rate(r) == r for r in rates)
    cached = list((tmp_path / "cache" / "hardware").glob("*.json"))
    assert len(cached) == 1
    data = json.loads(cached[0].read_text())
    assert len(data["disk_read_bytes_s"]) == 1 and hw.host.disk_read_bytes_s == next(iter(data["disk_read_bytes_s"].values()))

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again: a plan must come from the cached probe")

    monkeypatch.setattr(probe, "measure", no_measuring)
    monkeypatch.setattr(probe, "disk_read_rate", no_measuring)
    again = probe.probe_hardware("cpu", folder)  # from the cache: no measuring
    assert again.to_dict() == hw.to_dict()
    # A cache that cannot be used (here: a profile with a rate of "fast") is measured again, not an error.
    data["hardware"]["h2d_pinned_bytes_s"] = "fast"
    cached[0].write_text(json.dumps(data))
    with pytest.raises(AssertionError, match="measured again"):
        probe.probe_hardware("cpu", folder)


def test_probed_rates_snap_to_a_grid_that_absorbs_small_noise():
    from offbatch.planner.probe import RATE_STEP, snap_rate

    for rate in (54.7e9, 24e9, 664e12, 3.1e9):
        snapped = snap_rate(rate)
        assert snap_rate(snapped) == snapped and abs(snapped / rate - 1) <= RATE_STEP - 1
    # Rates of one machine measured twice a little apart land on one value unless they straddle a line.
    lines = {snap_rate(54.7e9 * (1 + e / 1000)) for e in range(-15, 16)}
    assert len(lines) <= 2


# ---- the cost model against the H200 grid runs ------------------------------------------------------------
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# (file, preset, layers, cap GiB, id prefix). 2026-11-28c: the grids the host constants were fitted to
# (in-sample; 71f97a5, residency in layer order). 2026-11-28d: measured after (out of sample; spread
# residency from 5e71750 on, with each grid's other-order point), by scripts/plan_grid.py. 2026-11-28e:
# the same at 75d48dc, whose grid tool warms up and measures the chosen plan again last ("chosen, again").
GRID_FILES = [("2026-11-28c/grid-mixtral-24g.json", "mixtral-8x7b", 8, 24, "mixtral-24g"),
              ("2026-11-28c/grid-llama-8g.json", "llama-3-8b", None, 8, "llama-8g"),
              ("2026-11-28c/grid-llama-24g.json", "llama-3-8b", None, 24, "llama-24g"),
              ("2026-11-28d/grid1-mixtral-8g.json", "mixtral-8x7b", 8, 8, "d1 mixtral-8g"),
              ("2026-11-28d/grid1-mixtral-24g.json", "mixtral-8x7b", 8, 24, "d1 mixtral-24g"),
              ("2026-11-28d/grid3-llama-8g.json", "llama-3-8b", None, 8, "d3 llama-8g"),
              ("2026-11-28d/grid3-llama-24g.json", "llama-3-8b", None, 24, "d3 llama-24g"),
              ("2026-11-28d/grid4-mixtral-8g.json", "mixtral-8x7b", 8, 8, "d4 mixtral-8g"),
              ("2026-11-28d/grid4-mixtral-24g.json", "mixtral-8x7b", 8, 24, "d4 mixtral-24g"),
              ("2026-11-28d/grid4-llama-24g.json", "llama-3-8b", None, 24, "d4 llama-24g"),
              ("2026-11-28e/grid1-mixtral-24g.json", "mixtral-8x7b", 8, 24, "e1 mixtral-24g"),
              ("2026-11-28e/grid2-mixtral-8g.json", "mixtral-8x7b", 8, 8, "e2 mixtral-8g"),
              ("2026-11-28e/grid3-llama-8g.json", "llama-3-8b", None, 8, "e3 llama-8g"),
              ("2026-11-28e/grid4-llama-24g.json", "llama-3-8b", None, 24, "e4 llama-24g"),
              ("2026-11-28e/grid5-llama-8g.json", "llama-3-8b", None, 8, "e5 llama-8g")]
# The refitted solver's own choice at 8 GiB, measured after the fit (out of sample then; one point).
SINGLE_FILES = [("2026-11-28c/chosen-mixtral-8g.json", "mixtral-8x7b", 8, 8, "mixtral-8g")]
WORKLOAD = Workload.uniform(1024, 256, 64)  # the engine issue's workload, as every grid ran it


def grid_points():
    """(id, preset, layers, cap GiB, point) of every measured point of scripts/plan_grid.py's H200 runs."""
    out = []
    for name, preset, layers, cap, prefix in GRID_FILES + SINGLE_FILES:
        path = BENCHMARKS / name
        if not path.exists():
            continue
        for g in json.loads(path.read_text())["points"]:
            if g["measured"]["e2e_tok_s"]:
                out.append((f"{prefix} {g['label']}", preset, layers, cap, g))
    return out


# The recorded grids name the placement as plan format 1 did (KV placement, decode attention).
ATTENTION_OF = {("gpu", "gpu"): "device-kv", ("host", "gpu"): "host-kv-gpu", ("host", "cpu"): "host-kv-cpu"}


@pytest.fixture
def grid_engine(monkeypatch):
    """The recorded grids ran an engine that copied host KV on the compute stream, whole slot ranges
    (before offload/kv_fetch.py): the model prices what they ran."""
    monkeypatch.setenv("OFFBATCH_KV_COPY_STREAM", "0")
    monkeypatch.setenv("OFFBATCH_KV_COPY_LIVE", "0")


def pinned_plan(preset, layers, cap, g):
    """The point's plan re-made on the h200 profile with its knobs pinned (same budget: same residency)."""
    attention = g.get("attention") or ATTENTION_OF[(g["kv_placement"], g["decode_attention"])]
    return make_plan(spec_of(preset, layers), torch.bfloat16, "cuda", cap * GiB, WORKLOAD, hardware="h200",
                     cpu_memory=100 * GiB, attention=attention,
                     wave_size=g["wave_size"], attn_micro_batch=g["attn_micro_batch"],
                     prefill_tokens=g["prefill_tokens"], ffn_micro_tokens=g["ffn_micro_tokens"],
                     residency_order=g.get("residency_order", "layer"))  # the first grids had only "layer"


# Known decode miss: CPU attention over Llama-3-8B's 32 layers at 8 GiB read host KV at about 30 GB/s (the
# h200 profile's rate while copies run is 24 GB/s; the probe on that machine said less): -25%. Mixtral's
# CPU attention points fit the same rates within 15%. (Llama-3-8B at 24 GiB, wave 205, where copies and
# GEMMs take about as long as each other, ran 3 255 to 4 680 decode tok/s in five runs of one plan; with
# the overlap's p-norm the model says 3 855-3 993, inside 25% of all five.)
DECODE_MISSES = {"e5 llama-8g host-cpu wave 512 mb 64"}


@pytest.mark.parametrize("point", [pytest.param(p, marks=pytest.mark.xfail(strict=True, reason="known miss"))
                                   if p[0] in DECODE_MISSES else p for p in grid_points()], ids=lambda p: p[0])
@pytest.mark.usefixtures("grid_engine")
def test_predicted_decode_within_25_percent_of_the_h200_grid_points(point):
    # Issue 5's check. The model's host constants (hardware.Host) were fitted to the 20 grid points of
    # 2026-11-28c, so those are in-sample: they guard the fit against later changes of the model; the
    # 2026-11-28d points are out of sample.
    _, preset, layers, cap, g = point
    plan = pinned_plan(preset, layers, cap, g)
    m = g["measured"]
    assert plan.predicted["decode_tok_s"] == pytest.approx(m["decode_tok_s"], rel=0.25)
    # The bytes streamed per decode step are not fitted: they must be what the engine counted, wherever
    # the re-made plan holds the same modules as the measured one (planned on the probed rates, a point
    # may have held others; the first grids saved no plan, and their solver always filled the GPU).
    saved = g.get("plan")
    same = sorted(map(tuple, saved["resident"])) == sorted(plan.resident) if saved else not point[0].startswith("mixtral-8g")
    if same:
        assert plan.predicted["decode_step"]["weight_bytes"] == pytest.approx(m["decode_bytes_per_step"], rel=1e-6)


# Known end-to-end misses: a prefill budget of one prompt per step (the grid's smallest Llama wave at
# 24 GiB) runs 1 024 tiny admitting steps whose per-layer fixed costs the model prices too low (+40%);
# the first point of a process, whose admitting steps ran up to 45% slower than the same plan's later
# (d4 mixtral-24g: prefill 19 399 tok/s first, 28 173 right after with only the residency order changed).
# The grids of 2026-11-28c ran an engine about 20% slower than today's: Mixtral 24 GiB, gpu KV, wave 1024,
# micro-batch 64 decoded 2 738 tok/s there and 3 259 and 3 344 (spread) later; one of their points, a
# process's first, now falls outside. The first point of a process is still slow with the grid tool's
# warm-ups (e1 mixtral-24g: 2 311 first, 2 730 for the same plan last).
E2E_MISSES = {"llama-24g gpu wave 73 mb 64", "llama-24g gpu wave 73 mb 256", "d4 mixtral-24g chosen",
              "mixtral-24g chosen", "e1 mixtral-24g chosen"}


@pytest.mark.parametrize("point", [pytest.param(p, marks=pytest.mark.xfail(strict=True, reason="known miss"))
                                   if p[0] in E2E_MISSES else p for p in grid_points()], ids=lambda p: p[0])
@pytest.mark.usefixtures("grid_engine")
def test_predicted_end_to_end_within_25_percent_of_the_h200_grid_points(point):
    _, preset, layers, cap, g = point
    plan = pinned_plan(preset, layers, cap, g)
    assert plan.predicted["e2e_tok_s"] == pytest.approx(g["measured"]["e2e_tok_s"], rel=0.25)


# d4 mixtral-24g: the model ranks its chosen plan first, whose only run was the process's first point
# (2 146 tok/s; the same knobs with layer residency ran 2 690 right after, the best point 2 949). Whether
# spread residency or the first-point cost made it slow is what plan_grid's "chosen, again" now tells.
PICK_MISSES = {"d4 mixtral-24g"}


@pytest.mark.parametrize("grid", [pytest.param(f, marks=pytest.mark.xfail(strict=True, reason="first-point run"))
                                  if f[4] in PICK_MISSES else f for f in GRID_FILES if (BENCHMARKS / f[0]).exists()],
                         ids=lambda f: f[4])
@pytest.mark.usefixtures("grid_engine")
def test_model_picks_a_measured_point_within_10_percent_of_the_best(grid):
    # Among the points each grid measured, the one the model predicts fastest end to end measured within
    # 10% of the fastest (issue 5's "chosen within 10% of the best", over the measured alternatives).
    name, preset, layers, cap, prefix = grid
    points = [p for p in grid_points() if p[0].startswith(prefix + " ")]
    # Where the grid measured its chosen plan again at the end, the first run (its process's first point,
    # slow whatever the plan) is left out, as plan_grid.py's own chosen/best leaves it out.
    if any(p[0] == f"{prefix} chosen, again" for p in points):
        points = [p for p in points if p[0] != f"{prefix} chosen"]
    if len(points) < 3:
        pytest.skip("fewer than three points measured")
    predicted = {p[0]: pinned_plan(preset, layers, cap, p[4]).predicted["e2e_tok_s"] for p in points}
    measured = {p[0]: p[4]["measured"]["e2e_tok_s"] for p in points}
    # Points the model cannot tell apart (the same plan measured twice, or residency orders that move the
    # same bytes over a saturated link) count as one plan: their mean run.
    top = max(predicted.values())
    picks = [name for name, v in predicted.items() if v >= top * (1 - 1e-6)]
    mine = sum(measured[name] for name in picks) / len(picks)
    assert mine >= 0.9 * max(measured.values()), (picks, measured)


# ---- the solver --------------------------------------------------------------------------------------------
JOBS = [Workload.uniform(1024, 256, 64), Workload.uniform(100, 1000, 300), Workload.uniform(5000, 64, 512)]


def roomy(name: str, gpu_gib: int = 48, host_gib: int = 512) -> Hardware:
    """A profile's rates with more memory than its card and host have: budgets beyond the machine are
    refused (test_caps_above_the_machine_are_refused), and these tests vary budgets, not machines."""
    from dataclasses import replace

    hw = PROFILES[name]
    return replace(hw, gpu_memory_bytes=max(hw.gpu_memory_bytes, gpu_gib * GiB),
                   host=replace(hw.host, memory_bytes=max(hw.host.memory_bytes, host_gib * GiB)))


@pytest.mark.parametrize("preset,layers,hw", [("mixtral-8x7b", 8, "h200"), ("llama-3-8b", None, "rtx4090"),
                                              ("qwen1.5-moe-a2.7b", None, "rtx3060-12g")])
def test_more_gpu_memory_never_predicts_slower_and_budgets_hold(preset, layers, hw):
    from offbatch.planner.solve import TIE_TOLERANCE

    spec = spec_of(preset, layers)
    host = 512 * GiB
    hw = roomy(hw)
    for wl in JOBS:
        prev = 0.0
        for gib in (3, 4, 6, 8, 12, 16, 24, 32, 48):
            try:
                plan = make_plan(spec, torch.bfloat16, "cuda", gib * GiB, wl, hardware=hw, cpu_memory=host)
            except BudgetError:
                assert prev == 0.0, "a budget that worked stopped working with more memory"
                continue
            e2e = plan.predicted["e2e_tok_s"]
            # Within the tie tolerance: a larger budget may take a simpler placement that the model
            # prices up to TIE_TOLERANCE slower than the fastest (planner.solve's near-tie rule).
            assert e2e >= prev * (1 - TIE_TOLERANCE), (gib, wl)
            prev = max(prev, e2e)
            assert sum(plan.memory.values()) <= gib * GiB * SAFETY
            assert sum(plan.host_memory.values()) <= host
            assert plan.wave_size <= wl.num_requests and plan.attn_micro_batch <= plan.wave_size
        assert prev > 0


def test_host_budget_limits_the_host_kv_wave():
    spec = spec_of("mixtral-8x7b", 8)
    wl = Workload.uniform(4096, 256, 64)
    roomy = make_plan(spec, torch.bfloat16, "cuda", 8 * GiB, wl, hardware="h200", cpu_memory=120 * GiB)
    assert get_attention(roomy.attention).kv_on_host
    budget = int(0.8 * sum(roomy.host_memory.values()))  # a fifth short of what the roomy plan holds
    tight = make_plan(spec, torch.bfloat16, "cuda", 8 * GiB, wl, hardware="h200", cpu_memory=budget)
    assert sum(tight.host_memory.values()) <= budget
    # Something gave way: a smaller host-KV wave, the KV on the GPU, or weights left on disk.
    assert tight.attention == "device-kv" or tight.wave_size < roomy.wave_size or tight.disk
    assert tight.predicted["e2e_tok_s"] <= roomy.predicted["e2e_tok_s"]


def minimum_from(err: BudgetError) -> float:
    value, unit = str(err).split("at least ")[1].split(" (")[0].split()
    return float(value) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]


def test_infeasible_budget_states_the_real_minimum():
    spec = spec_of("llama-3-8b")
    wl = Workload.uniform(64, 512, 128)
    with pytest.raises(BudgetError) as e:
        make_plan(spec, torch.bfloat16, "cuda", 256 << 20, wl, hardware="rtx4090")
    assert "too small" in str(e.value) and "weight buffers" in str(e.value)
    need = minimum_from(e.value)
    plan = make_plan(spec, torch.bfloat16, "cuda", int(need * 1.01), wl, hardware="rtx4090")  # (rounded to 0.01)
    assert plan.wave_size >= 1
    with pytest.raises(BudgetError):
        make_plan(spec, torch.bfloat16, "cuda", int(need * 0.97), wl, hardware="rtx4090")


def test_too_little_host_memory_is_one_clear_error():
    # 4 GiB cannot hold even the pinned embedding table, two staging buffers and the runtime.
    with pytest.raises(BudgetError, match="--cpu-memory .* too small.*even with its weights read from disk"):
        make_plan(spec_of("llama-3-8b"), torch.bfloat16, "cuda", 8 * GiB, Workload.uniform(8, 64, 8),
                  hardware="rtx4090", cpu_memory=4 * GiB)


def test_plans_are_deterministic_and_round_trip_as_files():
    spec = spec_of("qwen1.5-moe-a2.7b")
    wl = Workload.uniform(700, 300, 100)
    a = make_plan(spec, torch.bfloat16, "cuda", 6 * GiB, wl, hardware="l4", cpu_memory=60 * GiB)
    b = make_plan(spec, torch.bfloat16, "cuda", 6 * GiB, wl, hardware="l4", cpu_memory=60 * GiB)
    assert json.dumps(a.to_dict(), sort_keys=True) == json.dumps(b.to_dict(), sort_keys=True)
    again = Plan.from_dict(json.loads(json.dumps(a.to_dict())))
    assert again.resident == a.resident and again.slots == a.slots and again.dtype == a.dtype
    assert (again.wave_size, again.attention) == (a.wave_size, a.attention)
    with pytest.raises(OffbatchError, match="not a plan"):
        Plan.from_dict({"wave_size": 3})
    bad = dict(a.to_dict(), attention="disk")
    with pytest.raises(OffbatchError, match="attention"):
        Plan.from_dict(bad)


def test_pins_are_kept_and_unknown_options_refused():
    spec = spec_of("mixtral-8x7b", 4)
    wl = Workload.uniform(512, 128, 32)
    plan = make_plan(spec, torch.bfloat16, "cuda", 8 * GiB, wl, hardware="h200", wave_size=100, attn_micro_batch=16,
                     attention="host-kv-cpu")
    assert (plan.wave_size, plan.attn_micro_batch, plan.attention) == (100, 16, "host-kv-cpu")
    cpu_plan = make_plan(spec_of("llama"), torch.float32, "cpu", None, wl, max_resident_bytes=0)
    assert cpu_plan.attention == "device-kv" and cpu_plan.memory["resident_weights"] == 0  # routers only, none here
    with pytest.raises(TypeError, match="unknown plan option"):
        make_plan(spec, torch.bfloat16, "cuda", 8 * GiB, wl, hardware="h200", waves=3)


def test_a_64_layer_model_plans():
    # How long planning takes is measured by scripts/bench_planner.py, not asserted here: a loaded CI
    # machine failed the old "under a second" check.
    spec = spec_of("llama-3-70b", 64)
    for wl in JOBS:
        plan = make_plan(spec, torch.bfloat16, "cuda", 24 * GiB, wl, hardware="h200", cpu_memory=120 * GiB)
        assert plan.predicted["e2e_tok_s"] > 0 and plan.predicted["bottleneck"]
        assert sum(plan.memory.values()) <= 24 * GiB * SAFETY and sum(plan.host_memory.values()) <= 120 * GiB


# ---- the engine asks the planner ---------------------------------------------------------------------------
def test_engine_keeps_within_its_plan_and_pins_a_saved_plan(tmp_path):
    from offbatch.engine.api import GenRequest, SamplingParams
    from offbatch.engine.build import build_engine

    spec = spec_of("qwen2_moe")
    source = SynthSource(spec)
    wl = Workload.uniform(4, 6, 3)
    eng = build_engine(source, device="cpu", dtype="float32", gpu_memory=3 << 20, workload=wl, max_resident_bytes=0)
    plan = eng.plan
    assert plan.chosen_by == "solver" and plan.predicted["decode_tok_s"] > 0
    assert eng.pf.device_bytes <= plan.memory["weight_slots"] + plan.memory["resident_weights"]
    assert eng.kv.nbytes <= plan.memory["kv"]
    reqs = [GenRequest(i, list(range(3 + i, 9 + i)), SamplingParams(max_tokens=3, ignore_eos=True)) for i in range(4)]
    first = {o.key: o.token_ids for o in eng.generate(reqs)}

    saved = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    pinned = build_engine(source, device="cpu", dtype="float32", plan=saved)
    assert pinned.plan is saved and pinned.plan.chosen_by == "file"
    assert {o.key: o.token_ids for o in pinned.generate(reqs)} == first
    with pytest.raises(TypeError):
        build_engine(source, device="cpu", dtype="float32", plan=saved, wave_size=2)
    other = SynthSource(spec_of("llama"))
    with pytest.raises(OffbatchError, match="does not have|gives them no device slots"):
        build_engine(other, device="cpu", dtype="float32", plan=saved)


def test_planning_and_benching_need_no_gguf_package():
    # The GPU machine's image has no `gguf`: only importing the default model may need it.
    import subprocess
    import sys

    code = ("import sys; sys.modules['gguf'] = None\n"
            "import offbatch.cli.main, offbatch.engine.benchmark\n"
            "from offbatch.planner.probe import cache_file\n"
            "print(cache_file('cpu'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_plan_grid_script_measures_points_and_saves_them(tmp_path):
    # scripts/plan_grid.py is issue 5's measuring tool (run on the GPU); here on the CPU with a tiny model:
    # every point measured, the chosen one first, its plan and the machine's profile in the JSON.
    import subprocess
    import sys

    out = tmp_path / "grid.json"
    script = Path(__file__).resolve().parent.parent / "scripts" / "plan_grid.py"
    r = subprocess.run([sys.executable, str(script), "--synth", "llama", "--device", "cpu", "--gpu-memory", "1GiB,2MiB",
                        "--prompts", "4", "--prompt-len", "6", "--gen-len", "3", "--placements", "gpu",
                        "--waves", "2,4", "--micro-batches", "2", "--order-point", "--out", str(out)],
                       capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("chosen plan (chosen, again):") == 2  # one grid per cap, the weights packed once
    for cap in ("1GiB", "2MiB"):
        data = json.loads((tmp_path / f"grid-{cap}.json").read_text())
        assert data["gpu_memory"] == cap
        labels = [p["label"] for p in data["points"]]
        # The chosen plan first, then with the other residency order, ..., and the chosen plan again last
        # (chosen/best uses the second run: the first pays the process's one-time costs).
        assert labels[:2] == ["chosen", "chosen, residency layer"] and len(labels) >= 4
        assert labels[-1] == "chosen, again" and labels.count("chosen, again") == 1
        assert data["points"][-1]["plan"] == data["points"][0]["plan"]
        assert [p["residency_order"] for p in data["points"][:2]] == ["spread", "layer"]
        assert all(p["measured"]["e2e_tok_s"] > 0 and p["error"] is None for p in data["points"])
        assert data["hardware_profile"]["name"] == data["hardware"]
        assert 0 < data["chosen_over_best"] <= 1.0
        plan = Plan.from_dict(data["points"][0]["plan"])
        assert plan.wave_size == data["points"][0]["wave_size"] and plan.budget_bytes == parse_bytes(cap)


def test_plan_summary_line_says_placement_sizes_prediction_and_why():
    wl = Workload.uniform(1024, 256, 64)
    plan = make_plan(spec_of("mixtral-8x7b", 8), torch.bfloat16, "cuda", 8 * GiB, wl, hardware="h200",
                     cpu_memory=100 * GiB)
    line = plan.summary()
    assert line.startswith("plan (solver): ")
    assert f"wave {plan.wave_size}," in line and f"attention mb {plan.attn_micro_batch}" in line
    assert f"{plan.predicted['e2e_tok_s']:,.0f} tok/s end to end" in line
    assert ("KV on the GPU" in line) == (plan.attention == "device-kv")
    assert "\n  bottleneck: " in line


def test_spread_order_and_pick_are_even_and_complete():
    from offbatch.planner.residency import spread_order, spread_pick

    for n in (1, 2, 7, 64):
        order = spread_order(n)
        assert sorted(order) == list(range(n))
        for m in range(1, n + 1):  # every prefix leaves no gap much wider than n / m
            picked = sorted(order[:m]) + [n + order[0]]
            assert max(b - a for a, b in zip(picked, picked[1:])) <= 2 * n / m + 1
    keys = list(range(64))
    assert spread_pick(keys, 0) == [] and spread_pick(keys, 64) == keys and spread_pick(keys, 4) == [8, 24, 40, 56]


def test_spread_residency_holds_the_same_bytes_over_more_layers_and_predicts_no_slower():
    spec, wl = spec_of("mixtral-8x7b", 8), Workload.uniform(1024, 256, 64)
    plans = {o: make_plan(spec, torch.bfloat16, "cuda", 24 * GiB, wl, hardware="h200", cpu_memory=100 * GiB,
                          residency_order=o, attention="device-kv") for o in ("layer", "spread")}
    layer, spread = plans["layer"], plans["spread"]
    assert spread.residency_order == "spread" and layer.residency_order == "layer"
    # The model credits spread residency with no exposed resident stretch; with the same knobs it can
    # only be faster, so the solver's spread plan predicts at least the layer plan's figure.
    assert spread.predicted["e2e_tok_s"] >= layer.predicted["e2e_tok_s"]
    pinned = dict(wave_size=layer.wave_size, prefill_tokens=layer.prefill_tokens, attn_micro_batch=layer.attn_micro_batch,
                  ffn_micro_tokens=layer.ffn_micro_tokens, attention="device-kv")
    same = make_plan(spec, torch.bfloat16, "cuda", 24 * GiB, wl, hardware="h200", cpu_memory=100 * GiB,
                     residency_order="spread", **pinned)
    assert same.memory["resident_weights"] == layer.memory["resident_weights"]
    layers_of = lambda p: {k[0] for k in p.resident if k[1].startswith("expert.")}  # noqa: E731
    assert len(layers_of(same)) > len(layers_of(layer))
    again = Plan.from_dict(json.loads(json.dumps(same.to_dict())))
    assert again.residency_order == "spread" and again.resident == same.resident
    with pytest.raises(OffbatchError, match="residency order 'diagonal'"):
        make_plan(spec, torch.bfloat16, "cuda", 24 * GiB, wl, hardware="h200", residency_order="diagonal")
    bad = dict(same.to_dict(), residency_order="diagonal")
    with pytest.raises(OffbatchError, match="residency_order is layer or spread"):
        Plan.from_dict(bad)


def test_layer_order_exposes_only_the_resident_stretch_before_the_first_streamed_module():
    from offbatch.planner.cost import StepModel
    from offbatch.planner.memory import Knobs
    from offbatch.planner.residency import ResidencyChooser, residency_of

    spec = spec_of("llama-3-8b")
    shape = shape_from_spec(spec, torch.bfloat16)
    chooser = ResidencyChooser(shape)
    attn = shape.nbytes[(0, "attn")]
    ffn = shape.nbytes[(0, "ffn")]
    # Every FFN, the head and 8 attention modules fit (d4/e4 llama-24g's plan, 24 of 32 attention streamed).
    left = chooser.fixed_bytes + 32 * ffn + shape.nbytes[(-1, "head")] + 8 * attn + 2 * attn
    hw = load_hardware("h200")
    knobs = Knobs(wave=205, prefill_tokens=8192, ffn_micro_tokens=1024, attn_micro_batch=205,
                  attention="device-kv")
    steps = {}
    for order in ("layer", "spread"):
        res = chooser.choose(left, 205, order=order)
        summary = chooser.choose(left, 205, with_keys=False, order=order)
        assert res.streamed_by_kind == {"attn": 24 * attn}
        assert summary.lead_layers == res.lead_layers == residency_of(shape, res.resident).lead_layers
        streamed = sorted(i for i in range(32) if (i, "attn") not in res.resident)
        assert res.lead_layers == streamed[0]
        steps[order] = StepModel(shape, hw, knobs, res, 320).step(202, 0, 256, 300, 320)
    assert steps["layer"].total_s > steps["spread"].total_s  # 8 resident layers first: the copies wait
    # ...by the compute of those 8 layers less one ring fill (2 attention modules), not by all the
    # resident bytes' share of the compute (the old rule's 79 ms step against 54 ms measured).
    lead = (steps["layer"].gpu_s + steps["layer"].serial_s) * 8 / 32 - 2 * attn / hw.h2d_pinned_bytes_s
    assert steps["layer"].total_s <= steps["spread"].total_s + lead + 1e-9
    assert steps["layer"].total_s == pytest.approx(0.054, rel=0.1)  # e4 llama-24g: 202 / 3 780 tok/s


# ---- the same plan under probe noise (the near-tie rule) ---------------------------------------------------
def perturbed(hw: Hardware, seed: int, noise: float = 0.02) -> Hardware:
    """The profile with every measured rate off by up to +-noise, as two probes of one machine differ."""
    import random
    from dataclasses import replace

    rng = random.Random(seed)

    def off(rate: float) -> float:
        return rate * (1 + rng.uniform(-noise, noise))

    host = replace(hw.host, cpu_attn_bytes_s=off(hw.host.cpu_attn_bytes_s),
                   cpu_attn_contended_bytes_s=off(hw.host.cpu_attn_contended_bytes_s),
                   disk_read_bytes_s=off(hw.host.disk_read_bytes_s))
    return replace(hw, h2d_pinned_bytes_s=off(hw.h2d_pinned_bytes_s), h2d_pageable_bytes_s=off(hw.h2d_pageable_bytes_s),
                   d2h_bytes_s=off(hw.d2h_bytes_s), gemm_flop_s={m: off(r) for m, r in hw.gemm_flop_s.items()},
                   mem_bytes_s=off(hw.mem_bytes_s), scatter_elems_s=off(hw.scatter_elems_s), host=host)


# The presets, profiles, caps and jobs of the tests above (the grids' Mixtral and Llama on the H200, the
# monotonicity test's cards and jobs, the determinism test's L4).
NOISY_CASES = [("mixtral-8x7b", 8, "h200", 8, WORKLOAD), ("mixtral-8x7b", 8, "h200", 24, WORKLOAD),
               ("llama-3-8b", None, "h200", 8, WORKLOAD), ("llama-3-8b", None, "rtx4090", 24, JOBS[1]),
               ("qwen1.5-moe-a2.7b", None, "rtx3060-12g", 6, JOBS[2]),
               ("qwen1.5-moe-a2.7b", None, "l4", 6, Workload.uniform(700, 300, 100))]


@pytest.mark.parametrize("preset,layers,hw,cap,wl", NOISY_CASES,
                         ids=[f"{c[0]}-{c[2]}-{c[3]}g-{c[4].num_requests}" for c in NOISY_CASES])
def test_probe_noise_does_not_change_the_plan(preset, layers, hw, cap, wl):
    # Two probes of one machine differ by a couple of percent in every rate. The choice that cost 14% when
    # it flipped, the placement, and the wave are the same; the prefill budget and micro-batch sizes may
    # swap only between sizes priced alike (on the unperturbed profile, within the tie tolerance of the
    # plan made there: these are priced within a fraction of a percent, where no order can be stable).
    from offbatch.planner.solve import TIE_TOLERANCE, predict

    spec, base_hw = spec_of(preset, layers), PROFILES[hw]
    host = int(0.8 * base_hw.host.memory_bytes)
    base = make_plan(spec, torch.bfloat16, "cuda", cap * GiB, wl, hardware=base_hw, cpu_memory=host)
    for seed in (1, 2):
        noisy = make_plan(spec, torch.bfloat16, "cuda", cap * GiB, wl, hardware=perturbed(base_hw, seed),
                          cpu_memory=host)
        assert (noisy.attention, noisy.wave_size) == (base.attention, base.wave_size), seed
        priced_here = predict(noisy, shape_from_spec(spec, torch.bfloat16), base_hw, wl)
        assert priced_here["total_s"] <= base.predicted["total_s"] * (1 + TIE_TOLERANCE), seed


@pytest.mark.usefixtures("grid_engine")
def test_a_near_tie_keeps_the_simpler_placement_and_says_so(tmp_path):
    # The flip: Mixtral (8 layers) at 8 GiB on the H200, where host KV with GPU attention and with
    # CPU attention are priced 2.7% apart (3.4% before each step's KV was priced by its live slots alone).
    # A probe that measures CPU attention 10% faster (as probes of that machine did: 24 to 26+ GB/s beside
    # copies) prices CPU attention 2.5% *faster*; the fastest-wins solver switched to it. Inside the
    # tolerance the simpler placement stays, and the plan says so. 5% slower CPU attention: a clear choice.
    from dataclasses import replace

    from typer.testing import CliRunner

    from offbatch.cli.main import app

    spec, h200 = spec_of("mixtral-8x7b", 8), PROFILES["h200"]
    plans = {}
    for factor in (0.95, 1.0, 1.1):
        hw = replace(h200, host=replace(h200.host, cpu_attn_bytes_s=h200.host.cpu_attn_bytes_s * factor,
                                        cpu_attn_contended_bytes_s=h200.host.cpu_attn_contended_bytes_s * factor))
        plans[factor] = make_plan(spec, torch.bfloat16, "cuda", 8 * GiB, WORKLOAD, hardware=hw, cpu_memory=100 * GiB)
    assert {p.attention for p in plans.values()} == {"host-kv-gpu"}
    assert plans[0.95].near_tie is None  # over 3% apart: a clear choice
    assert plans[1.0].near_tie["e2e_tok_s"] < plans[1.0].near_tie["chosen_e2e_tok_s"]  # a rival within 3%, slower
    tie = plans[1.1].near_tie
    assert tie["attention"] == "host-kv-cpu" and tie["tolerance"] == 0.03
    assert tie["chosen_e2e_tok_s"] < tie["e2e_tok_s"] <= tie["chosen_e2e_tok_s"] * 1.03  # the rival priced faster
    assert "near-tie: within 3% of host KV with CPU attention" in plans[1.1].summary()
    # `offbatch plan` says it too, and writes it in the plan file.
    hw_file = tmp_path / "h200-fast-cpu.json"
    hw_file.write_text(json.dumps(replace(h200, name="h200-fast-cpu", host=replace(
        h200.host, cpu_attn_bytes_s=h200.host.cpu_attn_bytes_s * 1.1,
        cpu_attn_contended_bytes_s=h200.host.cpu_attn_contended_bytes_s * 1.1)).to_dict()))
    args = ["plan", "--synth", "mixtral-8x7b", "--layers", "8", "--gpu-memory", "8GiB", "--hardware", str(hw_file),
            "--num-prompts", "1024", "--prompt-len", "256", "--gen-len", "64", "--cpu-memory", "100GiB"]
    r = CliRunner().invoke(app, args, terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "near-tie: within 3% of host KV with CPU attention" in " ".join(r.output.split())


# ---- caps above the machine ---------------------------------------------------------------------------------
def test_caps_above_the_machine_are_refused():
    # The cases: --gpu-memory 100GiB on the 24 GiB rtx4090 profile planned 40 GiB; --cpu-memory 10TiB
    # planned 155 GiB of pinned memory on its 64 GiB host. A cap of exactly the machine's memory plans.
    spec, wl = spec_of("mixtral-8x7b", 8), Workload.uniform(256, 256, 64)
    with pytest.raises(BudgetError, match=r"--gpu-memory 100.00 GiB is more than the rtx4090 profile's 24.00 GiB"):
        make_plan(spec, torch.bfloat16, "cuda", 100 * GiB, wl, hardware="rtx4090")
    with pytest.raises(BudgetError, match=r"--cpu-memory 10.00 TiB is more than the rtx4090 profile's 64.00 GiB"):
        make_plan(spec, torch.bfloat16, "cuda", 8 * GiB, wl, hardware="rtx4090", cpu_memory=10 << 40)
    plan = make_plan(spec, torch.bfloat16, "cuda", 24 * GiB, wl, hardware="rtx4090", cpu_memory=64 * GiB)
    assert sum(plan.memory.values()) <= 24 * GiB and sum(plan.host_memory.values()) <= 64 * GiB
    # This machine (CPU engine): its own memory, not the fixed cpu profile's 16 GiB.
    from offbatch.planner.probe import host_memory_bytes

    with pytest.raises(BudgetError, match="more than this machine's"):
        make_plan(spec_of("llama"), torch.float32, "cpu", host_memory_bytes() + 1, Workload.uniform(4, 6, 3))


def test_a_pinned_plan_is_checked_against_the_model_and_the_memory_before_packing():
    from dataclasses import replace

    from offbatch.engine.build import check_plan
    from offbatch.errors import PlanFileError

    spec = spec_of("llama-3-8b")
    shape = shape_from_spec(spec, torch.bfloat16)
    plan = make_plan(spec, torch.bfloat16, "cuda", 8 * GiB, Workload.uniform(64, 256, 64), hardware="h200",
                     cpu_memory=100 * GiB)
    check_plan(plan, shape, torch.device("cuda"), 8 * GiB)  # as made: fits
    with pytest.raises(PlanFileError, match="the model's is 131072"):
        check_plan(replace(plan, max_len=200_000), shape, torch.device("cuda"), 8 * GiB)
    # A wave of 4096 x 8192 tokens of Llama-3-8B KV is 4 TiB: more than the cap (GPU KV), more than any
    # host (host KV). Refused from the shape alone: no weight is packed.
    with pytest.raises(PlanFileError, match="more than the --gpu-memory cap"):
        check_plan(replace(plan, wave_size=4096, max_len=8192, attention="device-kv"), shape, torch.device("cuda"), 8 * GiB)
    with pytest.raises(PlanFileError, match="host KV .* more than this machine's"):
        check_plan(replace(plan, wave_size=4096, max_len=8192, attention="host-kv-gpu"), shape, torch.device("cuda"),
                   8 * GiB)
    with pytest.raises(PlanFileError, match="more than the device's memory"):
        check_plan(replace(plan, device="cpu", wave_size=4096, max_len=8192, attention="device-kv"), shape,
                   torch.device("cpu"))


def test_cpu_attention_noise_widens_the_tie_only_where_cpu_attention_is_in_the_comparison():
    # Fresh probes of one H200 put CPU attention up to 38% apart, enough to flip Mixtral 8 GiB between
    # CPU and GPU attention from probe to probe (BENCHMARKS.md, sixth session). A probed machine declares
    # that noise (cpu_attn_noise); the solver keeps GPU attention unless CPU attention wins by more.
    from dataclasses import replace

    from offbatch.planner.probe import PROBED_CPU_ATTN_NOISE

    assert PROBED_CPU_ATTN_NOISE == 0.4
    spec, h200 = spec_of("mixtral-8x7b", 8), PROFILES["h200"]
    assert h200.cpu_attn_noise == 0.0  # the calibrated profiles are not probes

    def with_cpu(factor, noise):
        host = replace(h200.host, cpu_attn_bytes_s=h200.host.cpu_attn_bytes_s * factor,
                       cpu_attn_contended_bytes_s=h200.host.cpu_attn_contended_bytes_s * factor)
        return replace(h200, host=host, cpu_attn_noise=noise)

    def plan(hw, cap=8 * GiB):
        return make_plan(spec, torch.bfloat16, "cuda", cap, WORKLOAD, hardware=hw, cpu_memory=100 * GiB)

    quiet = plan(with_cpu(1.5, 0.0))
    assert quiet.attention == "host-kv-cpu"  # clearly faster on a quiet machine
    noisy = plan(with_cpu(1.5, 0.3))
    assert noisy.attention == "host-kv-gpu"
    tie = noisy.near_tie
    assert tie["tolerance"] == 0.3 and tie["attention"] == "host-kv-cpu"
    assert tie["chosen_e2e_tok_s"] * 1.03 < tie["e2e_tok_s"] <= tie["chosen_e2e_tok_s"] * 1.3
    assert "CPU attention rate is that noisy" in tie["words"]
    # Far enough ahead, CPU attention still wins on the noisy machine.
    assert plan(with_cpu(4.0, 0.3)).attention == "host-kv-cpu"
    # The noise does not touch choices that do not hang on CPU attention: at 24 GiB, KV on the GPU against
    # host KV with GPU attention is decided as on the quiet machine.
    a, b = plan(with_cpu(1.0, 0.0), 24 * GiB), plan(with_cpu(1.0, 0.5), 24 * GiB)
    assert a.attention == b.attention
    # The field travels in profile files and is checked like every other.
    assert Hardware.from_dict(replace(h200, cpu_attn_noise=0.3).to_dict()).cpu_attn_noise == 0.3
    with pytest.raises(PlanFileError, match="cpu_attn_noise"):
        Hardware.from_dict({**h200.to_dict(), "cpu_attn_noise": 2.0})


def test_host_kv_micro_batches_are_priced_on_the_host_thread():
    # Llama-3-8B in int4 with int8 KV at 8 GiB: every weight resident, the host KV copied per attention
    # micro-batch. Each micro-batch of each layer is a copy to issue and tokens to patch on the host thread;
    # on the H200 a step took 180 / 155 / 125 ms with 4 / 2 / 1 micro-batches a layer. The model must rank
    # them so, and the solver take one micro-batch for the wave on that backend (it had only 256 to choose up
    # to).
    spec, wl = spec_of("llama-3-8b"), Workload.uniform(1024, 64, 32)

    def plan(**pins):
        return make_plan(spec, torch.bfloat16, "cuda", 8 * GiB, wl, hardware="h200", weights="int4",
                         kv_formats=("int8",), disk_tier=False, **pins)

    steps = {mb: plan(attention="host-kv-gpu", wave_size=1024, attn_micro_batch=mb).predicted["decode_step"]["total_s"]
             for mb in (256, 512, 1024)}
    assert steps[256] > steps[512] * 1.05 and steps[256] > steps[1024] * 1.05
    chosen = plan(attention="host-kv-gpu")
    assert (chosen.wave_size, chosen.attn_micro_batch) == (1024, 1024)
