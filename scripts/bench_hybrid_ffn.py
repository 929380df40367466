"""Issue 17 on the GPU: the hybrid FFN (hot neurons on the GPU, cold ones on the host threads) against the
dense streaming engine, on a synthetic ReLU model with planted activity, jobs of a few prompts, in one
process on one packed copy of the weights.

  1. calibration: the dense engine runs CALIB prompts (random ids) through a recording FFN that keeps every
     dense layer's FFN inputs and which neurons were active (ReLU: output > 0);
  2. a predictor per layer is trained on the GPU (tools/predictor.train_one: recall cut on one split,
     measured on another); the activity profile is the calibration's;
  3. per job size: the dense plan and the planner's plan with the neurons allowed (hybrid where it predicts
     faster), each run end to end; decode tok/s, the plans, the predictions, the hybrid's host work and the
     greedy tokens' agreement with the dense run; --other-cold-path: the planner's hybrid plan again with its
     cold neurons taken the other way (host threads or fetched to the GPU).

  python scripts/bench_hybrid_ffn.py --preset opt-30b --gpu-memory 8GiB --jobs 1,8,32 --out hybrid.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from offbatch.engine.benchmark import run_bench  # noqa: E402
from offbatch.errors import OffbatchError  # noqa: E402
from offbatch.ffn.dense import DenseFFN, mlp_chunked  # noqa: E402
from offbatch.ffn.neurons import NeuronStats  # noqa: E402
from offbatch.ffn.union import UNION_ROWS, independent_union, measured_union, union_table  # noqa: E402
from offbatch.models import layers as L  # noqa: E402
from offbatch.models.spec import spec_from_config  # noqa: E402
from offbatch.offload.weights import SynthSource, WeightStore  # noqa: E402
from offbatch.tools.predictor import train_one  # noqa: E402
from offbatch.tools.synth import parse_ffn_activity, synth_config  # noqa: E402
from offbatch.units import parse_bytes  # noqa: E402


class RecordingFFN(DenseFFN):
    """The dense FFN, keeping (on the host) each layer's first `keep` input rows and their activity."""

    def __init__(self, spec, modules, micro_tokens, keep: int):
        super().__init__(spec, modules, micro_tokens)
        self.keep = keep
        self.x: dict[int, list] = {}
        self.y: dict[int, list] = {}

    def forward(self, layer, x):
        spec = self.spec
        w = self.mods.acquire((layer, "ffn"))
        h = L.norm(x, w, "ffn_norm", spec) if spec.pre_norm else x
        have = sum(t.shape[0] for t in self.x.get(layer, []))
        if have < self.keep:
            part = h[: self.keep - have]
            act = L.activation(spec.activation, w.linear(part, "up")) > 0
            self.x.setdefault(layer, []).append(part.cpu())
            self.y.setdefault(layer, []).append(act.cpu())
        y = mlp_chunked(h, w, spec, self.micro_tokens)
        self.mods.release((layer, "ffn"))
        return y


def calibrate(source, store, cap, prompts, prompt_len, keep, device):
    from offbatch.engine.api import GenRequest, SamplingParams
    from offbatch.engine.benchmark import random_prompts
    from offbatch.engine.build import build_engine

    eng = build_engine(source, device=device, gpu_memory=cap, num_requests=prompts, max_len=prompt_len + 1,
                       default_dtype=store.dtype, dtype=store.dtype, store=store)
    rec = RecordingFFN(eng.spec, eng.mods, eng.plan.ffn_micro_tokens, keep)
    eng.ffns[False] = rec
    reqs = [GenRequest(i, p, SamplingParams(max_tokens=1, ignore_eos=True))
            for i, p in enumerate(random_prompts(prompts, prompt_len, eng.spec.vocab_size, seed=1234))]
    try:
        for _ in eng.generate(reqs):
            pass
    finally:
        eng.close()
    data = {i: (torch.cat(rec.x[i]), torch.cat(rec.y[i])) for i in sorted(rec.x)}
    del eng, rec
    if device == "cuda":
        torch.cuda.empty_cache()
    return data


def host_probe(spec, store, layer: int = 0) -> dict:
    """The host's rate on a layer's cold part (ColdPart.partial: gather, float32, two GEMMs), from a worker
    thread as the engine runs it: neuron bytes per second for a few union sizes and token counts."""
    from concurrent.futures import ThreadPoolExecutor

    from offbatch.ffn.hybrid import ColdPart, neuron_bytes

    w = store.host_views((layer, "ffn"))
    n = spec.intermediate_size
    cold = torch.arange(n)
    part = ColdPart(w, cold, spec, w["down.weight"].t().contiguous())
    nb = neuron_bytes(spec, store.dtype.itemsize)
    out = {}

    def one(tokens, used):
        g = torch.Generator().manual_seed(tokens)
        active = torch.zeros(tokens, n, dtype=torch.bool)
        active[:, torch.randperm(n, generator=g)[:used]] = True
        h = torch.randn(tokens, spec.hidden_size).to(store.dtype)
        part.partial(h, active)
        t0 = time.perf_counter()
        for _ in range(3):
            part.partial(h, active)
        dt = (time.perf_counter() - t0) / 3
        return {"s": dt, "bytes_s": used * nb / dt, "threads": torch.get_num_threads()}

    with ThreadPoolExecutor(1) as pool:
        for tokens, used in ((1, n // 40), (8, n // 8), (32, n // 3)):
            out[f"T{tokens}_U{used}"] = pool.submit(one, tokens, used).result()
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Greedy agreement: the share of generated positions equal, and of positions before the first difference."""
    same = sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))
    total = sum(len(p) for p in a)
    prefix = 0
    for p, q in zip(a, b):
        for x, y in zip(p, q):
            if x != y:
                break
            prefix += 1
    return {"token_agreement": same / max(1, total), "prefix_agreement": prefix / max(1, total)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="opt-30b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--activity", default="hot=0.2,sparsity=0.9")
    ap.add_argument("--gpu-memory", default="8GiB")
    ap.add_argument("--jobs", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--calib-prompts", type=int, default=16)
    ap.add_argument("--calib-tokens", type=int, default=4096, help="FFN input rows kept per layer")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--recall", type=float, default=0.9)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--oracle", action="store_true", help="exact activity instead of trained predictors")
    ap.add_argument("--independent-union", action="store_true",
                    help="price steps as if tokens' activity were independent (no measured union)")
    ap.add_argument("--force", action="store_true", help="where the planner keeps the dense FFN, also run the hybrid")
    ap.add_argument("--other-cold-path", action="store_true",
                    help="where the planner takes the hybrid FFN, also run its plan with the other cold path (host threads "
                         "or fetched to the GPU)")
    ap.add_argument("--also-attention", default="",
                    help="comma-separated attention backends: the planner's plan with the neurons allowed, pinned to each "
                         "of these that differs from its own choice, run too (is its backend the faster one?)")
    ap.add_argument("--host-threads", type=int, default=None,
                    help="torch's CPU threads (the cold part's): fewer leave DRAM bandwidth to the pinned copies")
    ap.add_argument("--kv", default=None,
                    help="KV format of every run, dense and hybrid alike (int8, int4, ...; default: the exact bf16 KV)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from offbatch.cli.options import kv_plan_options
    from offbatch.offload.kv import kv_format_name

    if a.kv:
        try:
            kv_format_name(a.kv)
        except Exception as e:  # the format's own message names the known ones
            ap.error(f"--kv: {e}")
    kv_opts = kv_plan_options(a.kv, None)
    if min(a.prompt_len, a.gen_len) < 1 or any(not j.strip().isdigit() or int(j) < 1 for j in a.jobs.split(",")):
        ap.error("--prompt-len and --gen-len are at least 1; --jobs is prompt counts of at least 1, comma-separated")
    from offbatch.attention import attention_names

    unknown = [b for b in a.also_attention.split(",") if b and b not in attention_names()]
    if unknown:
        ap.error(f"--also-attention: unknown backend(s) {', '.join(unknown)} (known: {', '.join(attention_names())})")
    from offbatch.attention import get_attention

    lossy = [b for b in a.also_attention.split(",") if b and get_attention(b).lossy]
    if lossy:
        ap.error(f"--also-attention: {', '.join(lossy)} is lossy; this bench compares exact attention backends")
    if a.host_threads:
        torch.set_num_threads(a.host_threads)
    cap = parse_bytes(a.gpu_memory)
    try:
        spec = spec_from_config(synth_config(a.preset, layers=a.layers,
                                             offbatch_synth_ffn_activity=parse_ffn_activity(a.activity)))
    except (OffbatchError, ValueError) as e:  # an unknown preset or activity: the message says what is known
        ap.error(str(e))
    source = SynthSource(spec)
    t0 = time.perf_counter()
    dt = torch.bfloat16 if a.device == "cuda" else torch.float32
    store = WeightStore(source, dt, pin=a.device == "cuda", encode_on=a.device)
    report = {"preset": a.preset, "layers": spec.num_layers, "activity": a.activity, "gpu_memory": cap,
              "prompt_len": a.prompt_len, "gen_len": a.gen_len, "kv": a.kv or "dense", "pack_s": time.perf_counter() - t0,
              "host_threads": torch.get_num_threads(), "jobs": []}
    print(f"packed {store.total_bytes / 1e9:.1f} GB in {report['pack_s']:.0f} s; host threads {torch.get_num_threads()}",
          flush=True)

    report["host_probe"] = host_probe(spec, store)
    print("host cold-part rate:", {k: f"{v['bytes_s'] / 1e9:.1f} GB/s ({v['s'] * 1e3:.1f} ms, {v['threads']} threads)"
                                   for k, v in report["host_probe"].items()}, flush=True)
    t0 = time.perf_counter()
    data = calibrate(source, store, cap, a.calib_prompts, a.prompt_len, a.calib_tokens, a.device)
    report["calibrate_s"] = time.perf_counter() - t0
    # Rows whose FFN input is not finite (none expected) would poison a predictor's training: counted, left out.
    finite = {i: torch.isfinite(x.float()).all(dim=1) for i, (x, _) in data.items()}
    report["nonfinite_rows"] = {i: int((~f).sum()) for i, f in finite.items() if not f.all()}
    data = {i: (x[finite[i]], y[finite[i]]) for i, (x, y) in data.items()}
    report["calib_rows"] = {i: int(x.shape[0]) for i, (x, _) in list(data.items())[:1]}
    print("FFN input rows kept per layer:", report["calib_rows"], "non-finite:", report["nonfinite_rows"] or "none",
          "x range", {i: (float(x.float().abs().max()), float(x.float().pow(2).mean().sqrt())) for i, (x, _) in list(data.items())[:2]},
          flush=True)
    activity = {i: y.float().mean(0) for i, (_, y) in data.items()}
    preds = {}
    t0 = time.perf_counter()
    train_on = a.device
    if not a.oracle:
        for i, (x, y) in data.items():
            preds[i] = train_one(x, y, a.rank, a.recall, epochs=a.epochs, device=train_on)
            if i == min(data):
                print(f"layer {i} predictor ({train_on}):", preds[i].metrics, "cut", preds[i].cut, flush=True)
                if preds[i].metrics["recall"] < 0.5 and train_on != "cpu":
                    # Seen once on the H200 (recall 0 on every layer, not on the CPU): train on the host instead.
                    train_on = "cpu"
                    preds[i] = train_one(x, y, a.rank, a.recall, epochs=a.epochs, device=train_on)
                    print(f"layer {i} predictor (cpu):", preds[i].metrics, "cut", preds[i].cut, flush=True)
    report["trained_on"] = train_on
    report["train_s"] = time.perf_counter() - t0
    # How many neurons tokens need together, measured on the calibration rows (the planner prices a step's
    # union from it; --independent-union: as if tokens were independent, the planner's fallback).
    gen = torch.Generator().manual_seed(0)
    union = {} if a.independent_union else {
        i: union_table(y[torch.randperm(y.shape[0], generator=gen)[:UNION_ROWS]], activity[i]) for i, (_, y) in data.items()}
    del data
    neurons = NeuronStats(activity, preds, oracle=a.oracle, source="calibration of this run", union=union)
    if union:
        curve = np.mean([np.sort(v.numpy())[::-1] for v in activity.values()], axis=0)
        table = np.mean([t.numpy() for t in union.values()], axis=0)
        report["union_share"] = {f"T{t}": {"measured": float(measured_union(table, curve, 0, np.array([t]))[0]) / curve.size,
                                          "independent": float(independent_union(curve, 0, np.array([t]))[0]) / curve.size}
                                 for t in (1, 8, 32, 256)}
        print("union of T tokens' active neurons (share of a layer's):", report["union_share"], flush=True)
    recalls = [p.metrics["recall"] for p in preds.values()]
    report["predictors"] = {
        "rank": a.rank, "recall_target": a.recall, "recall_mean": sum(recalls) / len(recalls) if recalls else 1.0,
        "recall_min": min(recalls) if recalls else 1.0,
        "predicted_sparsity_mean": (sum(p.metrics["predicted_sparsity"] for p in preds.values()) / len(preds)) if preds else None,
        "sparsity_mean": 1 - float(torch.stack(list(activity.values())).mean()),
        "inflation": neurons.inflation(),
        "by_layer": {i: p.metrics for i, p in preds.items()},
    }
    print(f"calibrated in {report['calibrate_s']:.0f} s, predictors trained in {report['train_s']:.0f} s: recall "
          f"mean {report['predictors']['recall_mean']:.3f} min {report['predictors']['recall_min']:.3f}, "
          f"sparsity {report['predictors']['sparsity_mean']:.3f}, predicted sparsity "
          f"{report['predictors']['predicted_sparsity_mean']}", flush=True)

    for n in [int(j) for j in a.jobs.split(",")]:
        row = {"prompts": n}
        for name, extra in (("dense", {}), ("planner", {"neurons": neurons})):
            r = run_bench(source, a.device, cap, n, a.prompt_len, a.gen_len, store=store, keep_tokens=True, **kv_opts, dtype=store.dtype,
                          default_dtype=store.dtype, **extra)
            if "hybrid_ffn" in r:
                print("   host dtype", r["hybrid_ffn"].get("host_dtype"), r["hybrid_ffn"].get("host_dtype_times"), flush=True)
            row[name] = {k: r[k] for k in ("decode_tok_s", "e2e_tok_s", "prefill_tok_s", "wall_s",
                                           "decode_bytes_per_step", "peak_gpu_reserved_bytes", "gpu_alloc_retries")}
            r_slots = r["plan"]["slots"]
            row[name]["plan"] = {k: r["plan"][k] for k in ("attention", "kv_format", "wave_size", "dense_ffn", "hot_neurons",
                                                            "hybrid_tokens", "hybrid_fetch_tokens", "memory",
                                                            "host_memory")}
            row[name]["predicted_decode_tok_s"] = r["plan"]["predicted"].get("decode_tok_s")
            row[name]["bottleneck"] = r["plan"]["predicted"].get("bottleneck")
            if "hybrid_ffn" in r:
                row[name]["hybrid_ffn"] = r["hybrid_ffn"]
            row[name]["tokens"] = r["tokens"]
            print(f"{n:>4} prompts {name:>7}: {row[name]['plan']['dense_ffn']:>6} FFN, decode {r['decode_tok_s']:8.2f} tok/s "
                  f"(predicted {row[name]['predicted_decode_tok_s']:.2f}), e2e {r['e2e_tok_s']:.2f}, peak "
                  f"{r['peak_gpu_reserved_bytes'] / 2**30:.2f} GiB" + (
                      f", host cold share {r['hybrid_ffn']['cold_share_computed']:.3f}, host {r['hybrid_ffn']['host_s']:.1f} s, "
                      f"waited {r['hybrid_ffn']['wait_s']:.1f} s" if "hybrid_ffn" in r else ""), flush=True)
        if row["planner"]["plan"]["dense_ffn"] != "hybrid" and a.force:
            # The planner kept the dense FFN: measure the hybrid it turned down (the dense plan, its resident
            # weight memory given to hot neurons, every step hybrid) to check that it would have been slower.
            from offbatch.ffn.hybrid import neuron_bytes

            plan = row["planner"]["plan"]
            pred_bytes = (a.rank * (spec.hidden_size + spec.intermediate_size) * 2) if preds else 0
            # 0.85: the head, resident in the dense plan, then takes a slot.
            hot = max(0, int(0.85 * plan["memory"]["resident_weights"]) - spec.num_layers * pred_bytes) // (
                spec.num_layers * neuron_bytes(spec, 2))
            slots = {"attn": 2, "ffn": 2, "head": 1, **{k: v for k, v in r_slots.items() if v}}
            r = run_bench(source, a.device, cap, n, a.prompt_len, a.gen_len, store=store, keep_tokens=True, **kv_opts,
                          dtype=store.dtype, default_dtype=store.dtype, neurons=neurons,
                          plan_overrides=dict(dense_ffn="hybrid", hot_neurons=int(hot), hybrid_tokens=n, resident=set(),
                                              slots=slots))
            row["forced_hybrid"] = {k: r[k] for k in ("decode_tok_s", "e2e_tok_s", "peak_gpu_reserved_bytes")}
            row["forced_hybrid"]["hot_neurons"] = int(hot)
            row["forced_hybrid"]["hybrid_ffn"] = r.get("hybrid_ffn")
            row["forced_hybrid_vs_dense"] = r["decode_tok_s"] / max(1e-9, row["dense"]["decode_tok_s"])
            row["forced_hybrid_agreement"] = agreement(row["dense"]["tokens"], r["tokens"])
            print(f"{n:>4} prompts  forced hybrid ({int(hot)} hot): decode {r['decode_tok_s']:8.2f} tok/s = "
                  f"{row['forced_hybrid_vs_dense']:.2f}x dense, host cold share "
                  f"{r['hybrid_ffn']['cold_share_computed']:.3f}, host {r['hybrid_ffn']['host_s']:.1f} s, "
                  f"waited {r['hybrid_ffn']['wait_s']:.1f} s", flush=True)
        if row["planner"]["plan"]["dense_ffn"] == "hybrid" and a.other_cold_path:
            # The planner's hybrid plan with its cold neurons taken the other way (host threads <-> fetched to
            # the GPU, ffn/hybrid_fetch.py) for every hybrid step: is the planner's pick the faster one?
            chosen = row["planner"]["plan"].get("hybrid_fetch_tokens", 0)
            other = 0 if chosen else 1
            r = run_bench(source, a.device, cap, n, a.prompt_len, a.gen_len, store=store, keep_tokens=True, **kv_opts,
                          dtype=store.dtype, default_dtype=store.dtype, neurons=neurons,
                          plan_overrides=dict(hybrid_fetch_tokens=other))
            key = "other_cold_path"
            row[key] = {k: r[k] for k in ("decode_tok_s", "e2e_tok_s", "peak_gpu_reserved_bytes", "decode_bytes_per_step")}
            row[key]["hybrid_fetch_tokens"] = other
            row[key]["hybrid_ffn"] = r.get("hybrid_ffn")
            row[key]["vs_dense"] = r["decode_tok_s"] / max(1e-9, row["dense"]["decode_tok_s"])
            row[key]["vs_planner"] = r["decode_tok_s"] / max(1e-9, row["planner"]["decode_tok_s"])
            row[key]["agreement"] = agreement(row["dense"]["tokens"], r["tokens"])
            h = r.get("hybrid_ffn") or {}
            print(f"{n:>4} prompts  other cold path ({'fetched to the GPU' if other else 'host threads'}): decode "
                  f"{r['decode_tok_s']:8.2f} tok/s = {row[key]['vs_dense']:.2f}x dense, {row[key]['vs_planner']:.2f}x the "
                  f"planner's; cold share {h.get('cold_share_computed', 0):.3f}, fetch {h.get('fetch_s', 0):.1f} s, "
                  f"host {h.get('host_s', 0):.1f} s, peak {r['peak_gpu_reserved_bytes'] / 2**30:.2f} GiB", flush=True)
        for name in [b for b in a.also_attention.split(",") if b and b != row["planner"]["plan"]["attention"]]:
            # The same job planned with the attention backend pinned (the hybrid FFN still allowed).
            r = run_bench(source, a.device, cap, n, a.prompt_len, a.gen_len, store=store, keep_tokens=True, **kv_opts,
                          dtype=store.dtype, default_dtype=store.dtype, neurons=neurons, attention=name)
            key = f"attention_{name}"
            row[key] = {k: r[k] for k in ("decode_tok_s", "e2e_tok_s", "peak_gpu_reserved_bytes", "decode_bytes_per_step")}
            row[key]["plan"] = {k: r["plan"][k] for k in ("attention", "wave_size", "dense_ffn", "hot_neurons",
                                                           "hybrid_tokens", "hybrid_fetch_tokens")}
            row[key]["predicted_decode_tok_s"] = r["plan"]["predicted"].get("decode_tok_s")
            row[key]["vs_dense"] = r["decode_tok_s"] / max(1e-9, row["dense"]["decode_tok_s"])
            row[key]["vs_planner"] = r["decode_tok_s"] / max(1e-9, row["planner"]["decode_tok_s"])
            row[key]["agreement"] = agreement(row["dense"]["tokens"], r["tokens"])
            print(f"{n:>4} prompts  attention pinned to {name}: {r['plan']['dense_ffn']} FFN, {r['plan']['hot_neurons']} hot, "
                  f"decode {r['decode_tok_s']:8.2f} tok/s (predicted {row[key]['predicted_decode_tok_s']:.2f}) = "
                  f"{row[key]['vs_dense']:.2f}x dense, {row[key]['vs_planner']:.2f}x the planner's; peak "
                  f"{r['peak_gpu_reserved_bytes'] / 2**30:.2f} GiB", flush=True)
        row["speedup_decode"] = row["planner"]["decode_tok_s"] / max(1e-9, row["dense"]["decode_tok_s"])
        row.update(agreement(row["dense"]["tokens"], row["planner"]["tokens"]))
        for name in ("dense", "planner"):
            row[name].pop("tokens")
        print(f"{n:>4} prompts: decode {row['speedup_decode']:.2f}x dense; token agreement {row['token_agreement']:.3f}",
              flush=True)
        report["jobs"].append(row)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
