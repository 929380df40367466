"""A/B of how host KV reaches the GPU for decode attention, one plan, one process, one packed model:

    old     copies on the compute stream, whole max_len slot ranges (OFFBATCH_KV_COPY_STREAM=0, _LIVE=0)
    stream  copies one range ahead on a stream of their own, whole ranges (_LIVE=0)
    new     on their own stream, only each slot's live positions (the default: offload/kv_fetch.py)

    python scripts/bench_kv_copy.py --synth llama-3-8b --gpu-memory 8GiB --prompts 1024 --prompt-len 64 \\
        --gen-len 32 --weights int4 --attention host-kv-gpu --wave 1024 --out kv-copy.json

The plan is made once (under the new path's pricing, knobs pinned as given) and run in every mode, then
the solver's own choice is run in the new mode. The first run of a process pays one-time costs: a short
warm-up run goes first and is not recorded.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offbatch.cli.options import kv_plan_options  # noqa: E402
from offbatch.engine.benchmark import run_bench  # noqa: E402
from offbatch.formats import get_format  # noqa: E402
from offbatch.models.spec import spec_from_config  # noqa: E402
from offbatch.offload.weights import SynthSource, WeightStore, release_pinned_cache  # noqa: E402
from offbatch.planner.shape import shape_from_store  # noqa: E402
from offbatch.planner.solve import make_plan, resolve_hardware  # noqa: E402
from offbatch.planner.workload import Workload  # noqa: E402
from offbatch.tools.synth import synth_config  # noqa: E402
from offbatch.units import parse_bytes  # noqa: E402

MODES = {"old": {"OFFBATCH_KV_COPY_STREAM": "0", "OFFBATCH_KV_COPY_LIVE": "0"},
         "stream": {"OFFBATCH_KV_COPY_STREAM": "1", "OFFBATCH_KV_COPY_LIVE": "0"},
         "new": {"OFFBATCH_KV_COPY_STREAM": "1", "OFFBATCH_KV_COPY_LIVE": "1"}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synth", required=True)
    p.add_argument("--layers", type=int)
    p.add_argument("--gpu-memory", default="8GiB")
    p.add_argument("--prompts", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--weights", default="dense")
    p.add_argument("--kv", default="dense")
    p.add_argument("--hgca", default=None, help="HGCA setting (with --attention hgca), e.g. window=256,top_k=128")
    p.add_argument("--attention", default="host-kv-gpu")
    p.add_argument("--wave", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--modes", default="old,stream,new")
    p.add_argument("--no-chosen", action="store_true", help="skip the solver's own plan")
    p.add_argument("--out", default=None)
    a = p.parse_args()

    source = SynthSource(spec_from_config(synth_config(a.synth, layers=a.layers)))
    dtype = getattr(torch, source.spec.torch_dtype)
    store = WeightStore(source, dtype, pin=True, fmt=get_format(a.weights), encode_on="cuda")
    shape = shape_from_store(store)
    hw = resolve_hardware(None, "cuda", None)
    cap = parse_bytes(a.gpu_memory)
    wl = Workload.uniform(a.prompts, a.prompt_len, a.gen_len)
    for k, v in MODES["new"].items():
        os.environ[k] = v

    def plan_for(**pins):
        extra = kv_plan_options(a.kv, a.hgca)
        return make_plan(source.spec, dtype, "cuda", cap, wl, hardware=hw, shape=shape, weights=a.weights,
                         disk_tier=False, **extra, **pins)

    pins = {"attention": a.attention}
    if a.wave:
        pins["wave_size"] = a.wave
    if a.micro_batch:
        pins["attn_micro_batch"] = a.micro_batch
    pinned = plan_for(**pins)
    runs = [(m, pinned) for m in a.modes.split(",")]
    if not a.no_chosen:
        runs.append(("chosen", plan_for()))

    def bench(plan, n, gen):
        r = run_bench(source, "cuda", cap, n, a.prompt_len, gen, default_dtype=dtype, plan=plan, store=store,
                      hardware=hw)
        gc.collect()
        torch.cuda.empty_cache()
        release_pinned_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
        return r

    bench(pinned, min(a.prompts, 64), 2)  # warm-up, not recorded
    results = []
    for mode, plan in runs:
        for k, v in MODES["new" if mode == "chosen" else mode].items():
            os.environ[k] = v
        try:
            r = bench(plan, a.prompts, a.gen_len)
        except Exception as e:  # one failing run (out of memory) must not lose the others
            r = {"error": f"{type(e).__name__}: {e}"}
        row = {"mode": mode, "attention": plan.attention, "hgca": plan.hgca, "wave": plan.wave_size,
               "attn_micro_batch": plan.attn_micro_batch, "kv_format": plan.kv_format,
               "predicted_decode_tok_s": plan.predicted["decode_tok_s"]}
        for key in ("decode_tok_s", "e2e_tok_s", "prefill_tok_s", "decode_floor_tok_s", "decode_bytes_per_step",
                    "decode_kv_copied_bytes_per_step", "peak_gpu_reserved_bytes", "error"):
            if key in r:
                row[key] = r[key]
        results.append(row)
        print(json.dumps(row), flush=True)
    base = next((r["decode_tok_s"] for r in results if r.get("decode_tok_s")), None)
    for r in results:
        if base and r.get("decode_tok_s"):
            print(f"{r['mode']:7s} {r['attention']:12s} wave {r['wave']:5d} decode {r['decode_tok_s']:8.0f} "
                  f"({r['decode_tok_s'] / base:.2f}x the first) e2e {r['e2e_tok_s']:8.0f} KV copied/step "
                  f"{r.get('decode_kv_copied_bytes_per_step', 0) / 1e9:6.2f} GB  predicted "
                  f"{r['predicted_decode_tok_s']:8.0f}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "runs": results}, indent=1))


if __name__ == "__main__":
    main()
