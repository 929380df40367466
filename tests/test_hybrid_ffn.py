"""The hybrid FFN backend (ffn/hybrid.py) in the streaming engine, its pricing and choice (planner/hybrid_ffn.py)
and its options: with an exact activity oracle the engine's tokens are the reference forward's (ReLU, and a
gated SiLU FFN with no threshold); with trained predictors it computes a fraction of the cold neurons; its
parts equal their torch twins; the planner takes it for a few prompts where streaming bounds the step and
keeps the dense FFN for a large job; bad options are one clear error."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hf_factory import save_hf_model
from offbatch.cli.main import app
from offbatch.engine.api import GenRequest, SamplingParams
from offbatch.engine.build import engine_for_folder
from offbatch.engine.reference import ReferenceModel
from offbatch.errors import InputFileError, OffbatchError, PlanFileError
from offbatch.ffn.hybrid import ColdPart, DevicePredictor, HotPart, split_down
from offbatch.ffn.hybrid_mlp import partial_ffn
from offbatch.ffn.neurons import NeuronStats, load_neuron_stats, neuron_stats_for_folder
from offbatch.models import layers as L
from offbatch.plan import Plan

PROMPTS = [[3, 5, 7, 9, 11, 13, 2], [4, 8, 15, 16, 23, 42, 1, 2, 3, 4, 5, 6], [99], list(range(1, 15)), [7, 7, 7]]
NEW = 10


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny OPT with 90% planted activity, its profile and trained predictors beside it."""
    root = tmp_path_factory.mktemp("hybrid")
    model = root / "m"
    r = CliRunner().invoke(app, ["synth", "opt", str(model), "--intermediate-size", "512", "--ffn-activity",
                                 "hot=0.2,sparsity=0.9", "--quiet"])
    assert r.exit_code == 0, r.output
    text = root / "t.txt"
    text.write_text(" ".join(f"w{i % 97} x{i % 13} y{i % 31}" for i in range(4000)))
    r = CliRunner().invoke(app, ["profile", str(model), str(text), "--windows", "4", "--window", "128", "--no-eval"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["train-predictors", str(model), str(text), "--windows", "8", "--window", "128",
                                 "--rank", "32", "--epochs", "10"])
    assert r.exit_code == 0, r.output
    ref = ReferenceModel.load(model, dtype="float32")
    return model, ref.greedy(PROMPTS, NEW)


def run(path, neurons, hot=100, tokens=5, fetch=0, **options):
    """The streaming engine on the CPU with a hybrid plan pinned over the planner's (every module streamed)."""
    eng = engine_for_folder(path, device="cpu", dtype="float32", num_requests=len(PROMPTS), max_len=32, neurons=neurons,
                            plan_overrides=dict(dense_ffn="hybrid", hot_neurons=hot, hybrid_tokens=tokens, resident=set(),
                                                slots={"attn": 2, "ffn": 2, "head": 1}, hybrid_fetch_tokens=fetch),
                            **options)
    reqs = [GenRequest(i, p, SamplingParams(max_tokens=NEW, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    outs = {o.key: o.token_ids for o in eng.generate(reqs)}
    eng.close()
    return eng, [outs[i] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("hot", [0, 100, 512])
def test_oracle_hybrid_engine_gives_the_reference_tokens_on_relu(planted, hot):
    model, expected = planted
    neurons = neuron_stats_for_folder(model, "oracle")
    eng, got = run(model, neurons, hot=hot)
    assert got == expected
    st = eng.hybrid.stats
    # Decode steps (5 tokens) ran hybrid, prompts (larger steps) streamed the FFN modules dense.
    assert st["calls"] == 2 * (NEW - 1) and st["tokens"] == 2 * len(PROMPTS) * (NEW - 1)
    assert eng.hybrid.layers == [0, 1] and all(p.count == hot for p in eng.hybrid.hot.values())


@pytest.mark.parametrize("act", ["silu", "relu"])
def test_oracle_hybrid_is_exact_on_a_gated_ffn_without_a_threshold(tmp_path, act):
    """Llama's gated FFN, SiLU and a ReLU synth of it: the oracle with no threshold keeps every non-zero."""
    save_hf_model("llama", tmp_path, hidden_act=act)
    ref = ReferenceModel.load(tmp_path, dtype="float32")
    expected = ref.greedy(PROMPTS, NEW)
    spec = ref.spec
    g = torch.Generator().manual_seed(0)
    activity = {i: torch.rand(spec.intermediate_size, generator=g) for i in range(spec.num_layers)}
    eng, got = run(tmp_path, NeuronStats(activity, oracle=True), hot=spec.intermediate_size // 4)
    assert got == expected


def test_predicted_hybrid_computes_a_fraction_of_the_cold_neurons(planted):
    model, expected = planted
    neurons = neuron_stats_for_folder(model)
    assert not neurons.oracle and set(neurons.predictors) == {0, 1}
    eng, got = run(model, neurons, hot=100)
    st = eng.hybrid.stats
    # The union over a step's 5 tokens of the neurons predicted active: a part of the cold neurons only.
    assert 0 < st["cold_neurons"] < 0.85 * st["cold_count"]
    assert all(len(g) == NEW for g in got)
    same = sum(a == b for p, q in zip(got, expected) for a, b in zip(p, q)) / (NEW * len(PROMPTS))
    assert same > 0.5  # recall ~0.9 on a tiny random model: mostly the same greedy tokens


def test_hybrid_parts_equal_their_torch_twins(planted):
    model, _ = planted
    ref = ReferenceModel.load(model, dtype="float32")
    spec, w = ref.spec, ref.modules[(1, "ffn")]
    g = torch.Generator().manual_seed(3)
    x = L.norm(torch.randn(7, spec.hidden_size, generator=g), w, "ffn_norm", spec)
    perm = torch.randperm(spec.intermediate_size, generator=g)
    hot, cold = perm[:130].sort().values, perm[130:].sort().values
    down_hot, down_t = split_down(w["down.weight"], hot, cold, "cpu")
    hp = HotPart(w, hot, spec, "cpu", torch.float32, down_hot)
    torch.testing.assert_close(hp.partial(x), partial_ffn(x, w, spec, hot) + w["down.bias"])
    cp = ColdPart(w, cold, spec, down_t)
    active = torch.rand(7, cold.numel(), generator=g) < 0.1
    y, n = cp.partial(x, active)
    assert n == int(active.any(0).sum())
    torch.testing.assert_close(y, partial_ffn(x, w, spec, cold, active), rtol=1e-5, atol=1e-5)
    none, n0 = cp.partial(x, torch.zeros_like(active))
    assert n0 == 0 and not none.any()
    # The device predictor over the cold neurons is the predictor's columns of them.
    p = neuron_stats_for_folder(model).predictors[1]
    dp = DevicePredictor(p, cold, "cpu", torch.float32)
    assert torch.equal(dp.active(x), p.active(x)[:, cold])


@pytest.fixture
def torch_gathers(monkeypatch):
    """The row gather's torch twin on the CPU (the Triton kernel under the interpreter is tests/test_kernels_rows.py's;
    other modules leave TRITON_INTERPRET set for the session, which would send every gather through it)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize("fetch_from", [1, 4])
def test_oracle_hybrid_fetching_its_cold_neurons_gives_the_reference_tokens(planted, fetch_from, torch_gathers):
    """The fetch path (ffn/hybrid_fetch.py: the union's rows gathered to the compute device, multiplied there),
    for every hybrid step (1) or for the 5-token steps only while smaller ones stay on the host (4): exact
    with the oracle on ReLU, as the host path."""
    model, expected = planted
    neurons = neuron_stats_for_folder(model, "oracle")
    eng, got = run(model, neurons, hot=100, fetch=fetch_from)
    assert got == expected
    st = eng.hybrid.stats
    assert st["fetch_calls"] == st["calls"] == 2 * (NEW - 1)  # every decode step has 5 tokens
    assert st["cold_neurons"] == st["cold_count"]  # the oracle fetches every cold neuron
    eng, got = run(model, neurons, hot=100, fetch=6)  # larger than any hybrid step: host path
    assert got == expected and eng.hybrid.stats["fetch_calls"] == 0


def test_fetched_cold_part_equals_the_host_cold_part(planted, torch_gathers):
    """ColdFetcher over chunks smaller than the union (3 chunks) against ColdPart.partial, predicted masks and
    the oracle, on a gated SiLU FFN with a threshold too."""
    from offbatch.ffn.hybrid_fetch import ColdFetcher, FetchLayer, fetch_scratch_bytes

    model, _ = planted
    ref = ReferenceModel.load(model, dtype="float32")
    spec, w = ref.spec, ref.modules[(0, "ffn")]
    g = torch.Generator().manual_seed(5)
    perm = torch.randperm(spec.intermediate_size, generator=g)
    cold = perm[100:].sort().values
    _, down_t = split_down(w["down.weight"], perm[:100].sort().values, cold, "cpu")
    x = torch.randn(6, spec.hidden_size, generator=g)
    for threshold in (0.0, 0.05):
        cp = ColdPart(w, cold, spec, down_t, threshold)
        fetcher = ColdFetcher(spec, "cpu", torch.float32, rows=150)
        assert fetcher.nbytes == 150 * 2 * spec.hidden_size * 4 <= fetch_scratch_bytes(spec, 4, 6, rows=150)
        layer = FetchLayer(cp, "cpu", torch.float32)
        active = torch.rand(6, cp.count, generator=g) < 0.3
        for mask in (active, None, torch.zeros_like(active)):
            y_host, n_host = cp.partial(x, mask)
            y, n = fetcher.partial(layer, x, mask)
            assert n == n_host and (mask is not None or n == cp.count)
            torch.testing.assert_close(y, y_host, rtol=1e-5, atol=1e-5)


def test_the_host_dtype_is_measured_and_bf16_products_stay_close(planted):
    from offbatch.ffn.hybrid import choose_host_dtype

    model, _ = planted
    ref = ReferenceModel.load(model, dtype="float32")
    spec = ref.spec
    w = {k: v.to(torch.bfloat16) for k, v in ref.modules[(0, "ffn")].items()}
    cold = torch.arange(40, spec.intermediate_size)
    part = ColdPart(w, cold, spec, split_down(w["down.weight"], torch.arange(40), cold, "cpu")[1])
    dtype, times = choose_host_dtype(part, 4, torch.bfloat16)
    assert dtype in (torch.float32, torch.bfloat16) and set(times) == {"float32", "bfloat16"}
    g = torch.Generator().manual_seed(1)
    x = L.norm(torch.randn(5, spec.hidden_size, generator=g), ref.modules[(0, "ffn")], "ffn_norm", spec)
    active = torch.rand(5, cold.numel(), generator=g) < 0.2
    part.compute_dtype = torch.float32
    exact, n = part.partial(x.bfloat16(), active)
    part.compute_dtype = torch.bfloat16
    fast, m = part.partial(x.bfloat16(), active)
    assert n == m and torch.allclose(fast, exact, rtol=0.05, atol=0.05 * float(exact.abs().max()))


def test_eval_ppl_scores_the_hybrid_ffn(planted, tmp_path):
    model, _ = planted
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 89} x{i % 11} y{i % 29}" for i in range(3000)))
    runner = CliRunner()
    r = runner.invoke(app, ["eval-ppl", str(model), str(text), "--window", "64", "--max-windows", "3", "--device", "cpu",
                            "--ffn", "hybrid", "--predictors", "oracle", "--hot-fraction", "0", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["results"]
    assert [x["ffn"] for x in rows] == ["dense", "hybrid"]
    # ReLU and the exact activity: the hybrid FFN is the dense one.
    assert rows[1]["agreement"] == 1.0 and abs(rows[1]["delta_pct"]) < 1e-6
    r = runner.invoke(app, ["eval-ppl", str(model), str(text), "--window", "64", "--max-windows", "3", "--device", "cpu",
                            "--ffn", "hybrid", "--hot-fraction", "0", "--hot-fraction", "1", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["results"]
    assert [x["hot_fraction"] for x in rows] == [None, 0.0, 1.0]
    assert 0.5 < rows[1]["agreement"] <= 1.0
    assert rows[2]["agreement"] == 1.0  # every neuron hot: nothing is predicted
    r = runner.invoke(app, ["eval-ppl", str(model), str(text), "--hot-fraction", "0.2"])
    assert r.exit_code != 0 and "--hot-fraction is for --ffn hybrid" in r.output


def test_neuron_stats_refuse_another_model(planted, tmp_path):
    model, _ = planted
    neurons = neuron_stats_for_folder(model)
    save_hf_model("opt", tmp_path)
    spec = ReferenceModel.load(tmp_path, dtype="float32").spec
    with pytest.raises(InputFileError, match="lack FFN layer 2"):
        neurons.check(spec)  # the hf_factory OPT has more layers
    import dataclasses

    with pytest.raises(InputFileError, match="neurons; this model's FFN has"):
        neurons.check(dataclasses.replace(spec, num_layers=2))
    with pytest.raises(InputFileError, match="offbatch profile"):
        neuron_stats_for_folder(tmp_path)
    from offbatch.tools.activity import STATS_FILE

    (tmp_path / STATS_FILE).write_bytes((model / STATS_FILE).read_bytes())
    with pytest.raises(InputFileError, match="train-predictors"):
        neuron_stats_for_folder(tmp_path)
    partial = load_neuron_stats(model / STATS_FILE, None)
    assert partial.oracle and partial.inflation() == 1.0


# ---- the planner ---------------------------------------------------------------------------------------
def PROFILES_H200():
    from offbatch.planner.hardware import PROFILES

    return PROFILES["h200"]


def planted_opt30b_neurons():
    from offbatch.models.spec import spec_from_config
    from offbatch.tools.predictor import Predictor
    from offbatch.tools.synth import activity_probabilities, synth_config

    spec = spec_from_config(synth_config("opt-30b", offbatch_synth_ffn_activity={"hot_fraction": 0.2, "sparsity": 0.9}))
    I, H = spec.intermediate_size, spec.hidden_size
    act = {i: torch.from_numpy(activity_probabilities(I, 0.2, 0.9, np.random.default_rng(i))).float()
           for i in range(spec.num_layers)}
    pred = Predictor(torch.zeros(128, H), torch.zeros(I, 128), 0.0,
                     {"recall": 0.9, "sparsity": 0.9, "predicted_sparsity": 0.86})
    return spec, NeuronStats(act, {i: pred for i in range(spec.num_layers)})


@pytest.mark.parametrize("prompts, hybrid", [(1, True), (1024, False)])
def test_planner_takes_the_hybrid_ffn_only_where_it_predicts_faster(prompts, hybrid):
    from offbatch.planner.solve import make_plan
    from offbatch.planner.workload import Workload

    spec, neurons = planted_opt30b_neurons()
    wl = Workload.uniform(prompts, 256, 128)
    dense = make_plan(spec, torch.bfloat16, "cuda", 8 << 30, wl, hardware="h200")
    plan = make_plan(spec, torch.bfloat16, "cuda", 8 << 30, wl, hardware="h200", neurons=neurons)
    assert (plan.dense_ffn == "hybrid") == hybrid
    if hybrid:
        assert plan.hot_neurons > 0 and plan.hybrid_tokens >= prompts
        assert plan.predicted["decode_tok_s"] > 1.5 * dense.predicted["decode_tok_s"]
        # Hot neurons come out of the device budget the dense plan had (its 10% margin kept).
        assert plan.memory["hybrid_ffn"] > 0 and sum(plan.memory.values()) <= 0.9 * (8 << 30)
        assert plan.host_memory["cold_neurons"] > 0
        assert "hybrid FFN" in plan.summary()
        again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
        assert (again.dense_ffn, again.hot_neurons, again.hybrid_tokens) == ("hybrid", plan.hot_neurons, plan.hybrid_tokens)
        # The plan file, pinned and priced again with the neurons, predicts what the solver did (within 1%).
        from offbatch.planner.shape import shape_from_spec
        from offbatch.planner.solve import predict

        shape = shape_from_spec(spec, torch.bfloat16)
        again_pred = predict(again, shape, PROFILES_H200(), wl, neurons)["decode_tok_s"]
        assert again_pred == pytest.approx(plan.predicted["decode_tok_s"], rel=0.01)
        assert predict(again, shape, PROFILES_H200(), wl)["decode_tok_s"] < 0.8 * again_pred  # priced dense
    else:
        assert plan.to_dict() == dense.to_dict()
    # On the CPU as compute device there is no host beside it to take the cold part.
    cpu = make_plan(spec, torch.bfloat16, "cpu", 8 << 30, Workload.uniform(1, 256, 16), hardware="h200", neurons=neurons)
    assert cpu.dense_ffn == "dense"


def test_planner_prices_the_hybrid_ffn_on_every_attention_backend():
    """The dense FFN may keep KV on the GPU (its streamed weights bound the step anyway) where the hybrid FFN's hot
    neurons want that memory: the hybrid is priced on each backend's best dense plan, not only the chosen one's.
    With the probed H200's rates (CPU attention noisy: the dense plan keeps KV on the device) the issue's job of
    8 prompts x 256 + 128 leaves no device memory for hot neurons beside device KV; the hybrid plan moves KV to
    host memory. Pinned to device KV the plan stays dense."""
    import dataclasses

    from offbatch.planner.hardware import PROFILES
    from offbatch.planner.solve import make_plan
    from offbatch.planner.workload import Workload

    spec, neurons = planted_opt30b_neurons()
    h200 = PROFILES["h200"]
    probed = dataclasses.replace(h200, name="probed-h200", mem_bytes_s=2.88e12, h2d_pinned_bytes_s=55.3e9,
                                 h2d_pageable_bytes_s=7.13e9, d2h_bytes_s=55.3e9, gpu_memory_bytes=150109880320,
                                 gemm_flop_s={16: 53.8e12, 64: 191e12, 256: 617e12, 1024: 750e12, 4096: 714e12},
                                 cpu_attn_noise=0.4, host=dataclasses.replace(
                                     h200.host, cpu_attn_bytes_s=58.1e9, cpu_attn_contended_bytes_s=26.6e9))
    wl = Workload.uniform(8, 256, 128)
    dense = make_plan(spec, torch.bfloat16, "cuda", 8 << 30, wl, hardware=probed)
    assert dense.attention == "device-kv"
    plan = make_plan(spec, torch.bfloat16, "cuda", 8 << 30, wl, hardware=probed, neurons=neurons)
    assert plan.dense_ffn == "hybrid" and plan.attention != "device-kv" and plan.hot_neurons > 0
    assert plan.predicted["decode_tok_s"] > 1.5 * dense.predicted["decode_tok_s"]
    pinned = make_plan(spec, torch.bfloat16, "cuda", 8 << 30, wl, hardware=probed, neurons=neurons, attention="device-kv")
    assert pinned.dense_ffn == "dense" and pinned.attention == "device-kv"
    # Hybrid plans are compared at CPU rates less the machine's noise. At 8 prompts the CPU attention hides under
    # the link (the H200 measured host-kv-cpu 1.16x host-kv-gpu on this job): taken.
    assert plan.attention == "host-kv-cpu"
    # At 32 prompts on a slower host its CPU attention bounds the step: predicted 13% faster at the probed rate,
    # slower at that rate less the noise, so GPU attention is kept; without noise the faster one is taken.
    slower = dataclasses.replace(probed, host=dataclasses.replace(probed.host, cpu_attn_contended_bytes_s=20e9))
    wl32 = Workload.uniform(32, 256, 128)
    wider = make_plan(spec, torch.bfloat16, "cuda", 8 << 30, wl32, hardware=slower, neurons=neurons)
    assert wider.dense_ffn == "hybrid" and wider.attention == "host-kv-gpu"
    exact = make_plan(spec, torch.bfloat16, "cuda", 8 << 30, wl32, hardware=dataclasses.replace(slower, cpu_attn_noise=0.0),
                      neurons=neurons)
    assert exact.dense_ffn == "hybrid" and exact.attention == "host-kv-cpu"


def test_near_tie_hybrid_plans_go_to_exact_kv_then_the_simpler_backend(monkeypatch):
    """choose_hybrid's order among hybrid plans within TIE_TOLERANCE of the fastest (by their cautious price):
    exact KV before a lossy format, then the backend's rank, as the solver orders dense plans; a plan outside
    the tolerance is not taken for being simpler; none is taken unless it beats the chosen dense plan."""
    from types import SimpleNamespace

    import offbatch.planner.hybrid_ffn as hf
    from offbatch.planner.solve import TIE_TOLERANCE

    def ev(attention, kv, total):
        return SimpleNamespace(knobs=SimpleNamespace(attention=attention, kv_format=kv, hgca=""), total_s=total)

    def pick(*cands, dense_s=100.0):
        plans = {i: c for i, c in enumerate(cands)}
        solver = SimpleNamespace(best_by_backend=plans)
        monkeypatch.setattr(hf, "consider_hybrid", lambda s, e, stats: (e, None, None))
        monkeypatch.setattr(hf, "cautious_total_s", lambda trial, e: e.total_s)
        got = hf.choose_hybrid(solver, ev("device-kv", "dense", dense_s), None)
        return None if got is None else (got[0].knobs.attention, got[0].knobs.kv_format)

    close = 50.0 * (1 + TIE_TOLERANCE / 2)
    assert pick(ev("host-kv-gpu", "int8", 50.0), ev("host-kv-cpu", "dense", close)) == ("host-kv-cpu", "dense")
    assert pick(ev("host-kv-cpu", "dense", 50.0), ev("host-kv-gpu", "dense", close)) == ("host-kv-gpu", "dense")
    far = 50.0 * (1 + 2 * TIE_TOLERANCE)
    assert pick(ev("host-kv-cpu", "dense", 50.0), ev("device-kv", "dense", far)) == ("host-kv-cpu", "dense")
    assert pick(ev("host-kv-cpu", "dense", 99.9)) is None  # not faster than the dense plan by the tolerance


def test_planner_picks_the_cold_path_by_step_size_and_the_machine():
    """Host threads for the smallest steps, the fetch to the GPU once the union times the tokens costs the host
    more than the union's bytes cost the link; a slow link keeps every step on the host, a slow host fetches
    them all. The choice is in the plan (and its file), its words and its prediction."""
    import dataclasses

    from offbatch.planner.hardware import PROFILES
    from offbatch.planner.shape import shape_from_spec
    from offbatch.planner.solve import make_plan, predict
    from offbatch.planner.workload import Workload

    spec, neurons = planted_opt30b_neurons()
    h200 = PROFILES["h200"]
    wl = Workload.uniform(32, 256, 64)
    plan = make_plan(spec, torch.bfloat16, "cuda", 8 << 30, wl, hardware="h200", neurons=neurons)
    assert plan.dense_ffn == "hybrid" and 1 <= plan.hybrid_fetch_tokens <= 32 <= plan.hybrid_tokens
    assert "fetched to the GPU" in plan.summary()
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.hybrid_fetch_tokens == plan.hybrid_fetch_tokens
    shape = shape_from_spec(spec, torch.bfloat16)
    assert predict(again, shape, h200, wl, neurons)["decode_tok_s"] == pytest.approx(plan.predicted["decode_tok_s"], rel=0.01)
    host_only = predict(dataclasses.replace(again, hybrid_fetch_tokens=0), shape, h200, wl, neurons)["decode_tok_s"]
    assert host_only < plan.predicted["decode_tok_s"]
    # The fetch's device scratch is in the plan's device memory.
    from offbatch.ffn.hybrid_fetch import fetch_scratch_bytes

    from offbatch.ffn.hybrid import neuron_bytes

    layers = spec.num_layers - sum(1 for k in plan.resident if k[1] == "ffn")
    pred = (128 * (spec.hidden_size + spec.intermediate_size)) * 2
    assert plan.memory["hybrid_ffn"] == (layers * (plan.hot_neurons * neuron_bytes(spec, 2) + pred)
                                         + fetch_scratch_bytes(spec, 2, plan.hybrid_tokens))
    slow_link = dataclasses.replace(h200, name="slow-link", h2d_pinned_bytes_s=2e9)
    p = make_plan(spec, torch.bfloat16, "cuda", 8 << 30, wl, hardware=slow_link, neurons=neurons)
    assert p.dense_ffn == "hybrid" and p.hybrid_fetch_tokens == 0 and "host threads" in p.summary()
    slow_host = dataclasses.replace(h200, name="slow-host", host=dataclasses.replace(h200.host, cpu_ffn_bytes_s=1e8))
    p = make_plan(spec, torch.bfloat16, "cuda", 8 << 30, Workload.uniform(1, 256, 64), hardware=slow_host, neurons=neurons)
    assert p.dense_ffn == "hybrid" and p.hybrid_fetch_tokens == 1


def test_a_plan_file_names_a_known_ffn():
    from offbatch.planner.solve import make_plan
    from offbatch.planner.workload import Workload

    spec, neurons = planted_opt30b_neurons()
    d = make_plan(spec, torch.bfloat16, "cuda", 8 << 30, Workload.uniform(1, 256, 16), hardware="h200").to_dict()
    with pytest.raises(PlanFileError, match="dense_ffn is dense or hybrid"):
        Plan.from_dict(dict(d, dense_ffn="sparse"))
    with pytest.raises(PlanFileError, match="hot_neurons"):
        Plan.from_dict(dict(d, hot_neurons=-1))


# ---- options -------------------------------------------------------------------------------------------
def test_options_refused_clearly(planted, tmp_path):
    model, _ = planted
    runner = CliRunner()
    bare = tmp_path / "bare"
    save_hf_model("opt", bare)
    r = runner.invoke(app, ["plan", str(bare), "--ffn", "hybrid", "--hardware", "h200", "--num-prompts", "1"])
    assert r.exit_code != 0 and "offbatch profile" in r.output
    r = runner.invoke(app, ["plan", str(model), "--predictors", "oracle", "--hardware", "h200"])
    assert r.exit_code != 0 and "--predictors is for --ffn hybrid" in r.output
    r = runner.invoke(app, ["plan", str(model), "--ffn", "sparse"])
    assert r.exit_code != 0 and "use dense or hybrid" in r.output
    r = runner.invoke(app, ["plan", "--synth", "opt", "--ffn", "hybrid", "--hardware", "h200"])
    assert r.exit_code != 0 and "needs MODEL_DIR" in r.output
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": 1, "prompt": "w1 x2", "max_tokens": 3}\n')
    r = runner.invoke(app, ["run", str(model), str(prompts), "-o", str(tmp_path / "o.jsonl"), "--ffn", "hybrid",
                            "--engine", "reference"])
    assert r.exit_code != 0 and "streaming engine" in r.output
    assert not (tmp_path / "o.jsonl").exists()
    r = runner.invoke(app, ["eval-ppl", str(model), str(prompts), "--ffn", "hybrid", "--predictors", " "])
    assert r.exit_code != 0 and "--predictors is empty" in r.output  # not the folder's, silently
    with pytest.raises(OffbatchError, match="needs the model's profile statistics"):
        engine_for_folder(model, device="cpu", dtype="float32", num_requests=2, max_len=32,
                          plan_overrides=dict(dense_ffn="hybrid", hot_neurons=4, hybrid_tokens=2))


def test_run_with_the_hybrid_ffn_writes_results_under_their_own_key(planted, tmp_path):
    model, _ = planted
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"id": {i}, "prompt": "w{i} x{i}", "max_tokens": 4}}\n' for i in range(3)))
    out = tmp_path / "o.jsonl"
    r = CliRunner().invoke(app, ["run", str(model), str(prompts), "-o", str(out), "--ffn", "hybrid", "--predictors",
                                 "oracle", "--device", "cpu", "--dtype", "float32", "--quiet"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    assert sorted(x["id"] for x in lines if "id" in x) == [0, 1, 2]
    # Retrained predictors (another file's contents) make other results too.
    from offbatch.cli.options import ffn_words
    from offbatch.tools.predictor import load_predictors, save_predictors

    preds = load_predictors(model / "offbatch_predictors.safetensors")
    for p in preds.values():
        p.cut += 1.0
    save_predictors(tmp_path / "other.safetensors", preds, {})
    mine = ffn_words("hybrid", None, model)
    assert mine == ffn_words("hybrid", None, model) != ffn_words("hybrid", str(tmp_path / "other.safetensors"), model)
    assert ffn_words("hybrid", "oracle", model) != mine and ffn_words(None, None, model) == ""
    # The same job without --ffn is another job's results: refused unless asked to redo them.
    again = CliRunner().invoke(app, ["run", str(model), str(prompts), "-o", str(out), "--device", "cpu", "--dtype",
                                     "float32", "--engine", "streaming", "--quiet"])
    assert again.exit_code != 0 and "hybrid FFN" in again.output


# ---- on the GPU: the host's cold part beside the device's hot part ----------------------------------------
def gpu_tokens(model, neurons=None, **overrides):
    """float32 on the GPU, every module streamed: (engine, tokens, whether each hybrid layer's down^T was pinned
    while it ran, and after close)."""
    eng = engine_for_folder(model, device="cuda", dtype="float32", num_requests=len(PROMPTS), max_len=32,
                            neurons=neurons, plan_overrides=dict(resident=set(), slots={"attn": 2, "ffn": 2, "head": 1},
                                                                 **overrides))
    reqs = [GenRequest(i, p, SamplingParams(max_tokens=NEW, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    outs = {o.key: o.token_ids for o in eng.generate(reqs)}
    down_t = [c.down_t for c in eng.hybrid.cold.values()] if eng.hybrid is not None else []
    pinned = [t.is_pinned() for t in down_t]
    eng.close()
    return eng, [outs[i] for i in range(len(PROMPTS))], pinned, [t.is_pinned() for t in down_t]


@pytest.mark.gpu
def test_gpu_hybrid_engine_overlaps_the_host_and_keeps_the_tokens(planted):
    """float32 on the GPU: the oracle hybrid (cold part on the host threads, beside the hot part on the GPU)
    gives the dense streaming engine's tokens; with predictors it runs and computes a part of the cold neurons."""
    model, _ = planted

    def gpu_run(neurons=None, **overrides):
        eng, tokens, _, _ = gpu_tokens(model, neurons, **overrides)
        return eng, tokens

    _, dense = gpu_run()
    hybrid = dict(dense_ffn="hybrid", hot_neurons=100, hybrid_tokens=8)
    eng, got = gpu_run(neuron_stats_for_folder(model, "oracle"), **hybrid)
    assert got == dense
    assert eng.hybrid.stats["calls"] == 2 * (NEW - 1) and eng.hybrid.hot[0].up.is_cuda
    eng, got = gpu_run(neuron_stats_for_folder(model), **hybrid)
    st = eng.hybrid.stats
    assert 0 < st["cold_neurons"] < st["cold_count"] and all(len(g) == NEW for g in got)


def test_plan_shows_the_hybrid_ffn_it_chose(tmp_path):
    """A planted OPT larger than the cap, planned for one prompt on a machine whose link bounds the step (the
    h200 profile with a 1 GB/s link): the plan takes the hybrid FFN and says so; its plan file round-trips."""
    import dataclasses

    from offbatch.planner.hardware import PROFILES

    slow = dataclasses.replace(PROFILES["h200"], name="slow-link", h2d_pinned_bytes_s=1e9,
                               host=dataclasses.replace(PROFILES["h200"].host, launch_s=1e-6))
    (tmp_path / "hw.json").write_text(json.dumps(slow.to_dict()))
    runner = CliRunner()
    model, text = tmp_path / "m", tmp_path / "t.txt"
    r = runner.invoke(app, ["synth", "opt", str(model), "--hidden-size", "256", "--intermediate-size", "8192",
                            "--layers", "4", "--ffn-activity", "hot=0.2,sparsity=0.9", "--quiet"])
    assert r.exit_code == 0, r.output
    text.write_text(" ".join(f"w{i % 97} x{i % 13} y{i % 31}" for i in range(3000)))
    for cmd in (["profile", str(model), str(text), "--windows", "2", "--window", "128", "--no-eval"],
                ["train-predictors", str(model), str(text), "--windows", "4", "--window", "128", "--rank", "16",
                 "--epochs", "4"]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 0, r.output
    args = ["plan", str(model), "--ffn", "hybrid", "--hardware", str(tmp_path / "hw.json"), "--gpu-memory", "80MiB",
            "--num-prompts", "1",
            "--prompt-len", "64", "--gen-len", "64"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    words = " ".join(w for w in r.output.replace("│", " ").split())  # the table wraps its cells
    assert "FFN hybrid:" in words and "hot neurons per" in words and "host threads" in words
    r = runner.invoke(app, args + ["--json", "--out", str(tmp_path / "plan.json")])
    assert r.exit_code == 0, r.output
    plan = Plan.from_dict(json.loads((tmp_path / "plan.json").read_text()))
    assert plan.dense_ffn == "hybrid" and plan.hot_neurons > 0 and plan.hybrid_tokens >= 1
    dense = runner.invoke(app, args[:2] + args[4:] + ["--json"])
    assert json.loads(dense.output)["plan"]["dense_ffn"] == "dense"  # not without --ffn hybrid


def test_a_pinned_hybrid_plan_runs_in_bench_and_run(planted, tmp_path):
    """A plan file whose FFN is hybrid (written by hand from a CPU plan): bench and run take it with the folder's
    statistics (--predictors picks them), bench reports what the hybrid FFN did, and run writes every result."""
    from offbatch.planner.solve import make_plan
    from offbatch.planner.workload import Workload
    from offbatch.models.spec import load_spec

    model, _ = planted
    spec = load_spec(model)
    d = make_plan(spec, torch.float32, "cpu", None, Workload.uniform(3, 8, 4), hardware="cpu").to_dict()
    d.update(dense_ffn="hybrid", hot_neurons=64, hybrid_tokens=3, resident=[], slots={"attn": 2, "ffn": 2, "head": 1},
             max_len=64)
    (tmp_path / "plan.json").write_text(json.dumps(d))
    runner = CliRunner()
    r = runner.invoke(app, ["bench", str(model), "--plan", str(tmp_path / "plan.json"), "--device", "cpu", "--dtype",
                            "float32", "--prompts", "3", "--prompt-len", "8", "--gen-len", "4", "--predictors", "oracle",
                            "--json"])
    assert r.exit_code == 0, r.output
    h = json.loads(r.stdout)["hybrid_ffn"]
    assert h["calls"] == 2 * 3 and h["hot_neurons"] == 64 and h["cold_share_computed"] == 1.0  # oracle: every cold one
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"id": {i}, "prompt": "w{i} x{i}", "max_tokens": 4}}\n' for i in range(3)))
    r = runner.invoke(app, ["run", str(model), str(prompts), "-o", str(tmp_path / "o.jsonl"), "--plan",
                            str(tmp_path / "plan.json"), "--device", "cpu", "--dtype", "float32", "--engine", "streaming",
                            "--quiet"])
    assert r.exit_code == 0, r.output
    assert len([x for x in (tmp_path / "o.jsonl").read_text().splitlines() if x.strip()]) >= 3
    d.update(dense_ffn="dense", hot_neurons=0, hybrid_tokens=0)
    (tmp_path / "dense.json").write_text(json.dumps(d))
    r = runner.invoke(app, ["run", str(model), str(prompts), "-o", str(tmp_path / "o2.jsonl"), "--plan",
                            str(tmp_path / "dense.json"), "--device", "cpu", "--engine", "streaming", "--ffn", "hybrid"])
    assert r.exit_code != 0 and "pinned plan's FFN is dense" in r.output
    assert not (tmp_path / "o2.jsonl").exists()


@pytest.mark.gpu
def test_gpu_hybrid_fetch_reads_pinned_cold_rows_and_keeps_the_tokens(planted):
    """float32 on the GPU, cold neurons fetched by the device from pinned host memory (the weights' pinned chunks,
    down^T registered in place): the oracle gives the dense engine's tokens; the registration is undone at close."""
    model, _ = planted
    _, dense, _, _ = gpu_tokens(model)
    fetch = dict(dense_ffn="hybrid", hot_neurons=100, hybrid_tokens=8, hybrid_fetch_tokens=1)
    eng, got, pinned, after = gpu_tokens(model, neuron_stats_for_folder(model, "oracle"), **fetch)
    assert got == dense and all(pinned) and not any(after)
    assert eng.hybrid.stats["fetch_calls"] == eng.hybrid.stats["calls"] == 2 * (NEW - 1)
    eng, got, _, _ = gpu_tokens(model, neuron_stats_for_folder(model), **fetch)
    st = eng.hybrid.stats
    assert 0 < st["cold_neurons"] < st["cold_count"] and all(len(g) == NEW for g in got)


@pytest.mark.gpu
def test_down_split_on_the_gpu_equals_the_cpus_across_layers_of_ragged_shapes():
    from offbatch.ffn.hybrid import DownSplitter

    splitter = DownSplitter("cuda", block_rows=48)  # blocks that end inside the rows; scratch reused by every layer
    g = torch.Generator().manual_seed(7)
    for hidden, inter in ((100, 333), (130, 257), (64, 64)):
        down = torch.randn(hidden, inter, generator=g).to(torch.bfloat16)
        perm = torch.randperm(inter, generator=g)
        hot, cold = perm[: inter // 5].sort().values, perm[inter // 5:].sort().values
        hot_cols, cold_rows = splitter.split(down, hot, cold)
        assert hot_cols.is_cuda and not cold_rows.is_cuda
        assert torch.equal(hot_cols.cpu(), down[:, hot]) and torch.equal(cold_rows, down.t()[cold])
    splitter.close()
