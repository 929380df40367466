"""How much the machine probe moves from one measurement to the next, and whether that moves the plan.

Measures this machine N times (each a fresh probe, as a fresh machine or `--reprobe` would), prints
each rate's spread (max/min) and the plan each probe gives for a few jobs. The planner's promise is
the same plan for the same job on the same machine; this is its check on the GPU machine.

    python scripts/probe_noise.py --probes 4 [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import torch

from offbatch.errors import OffbatchError

from offbatch.models.spec import spec_from_config
from offbatch.tools.synth import synth_config
from offbatch.planner.probe import measure, snapped
from offbatch.planner.solve import make_plan
from offbatch.planner.workload import Workload

JOBS = [("mixtral-8x7b", 8, 8 << 30), ("mixtral-8x7b", 8, 24 << 30), ("llama-3-8b", None, 8 << 30)]


def rates(hw) -> dict[str, float]:
    out = {"h2d_pinned": hw.h2d_pinned_bytes_s, "h2d_pageable": hw.h2d_pageable_bytes_s, "d2h": hw.d2h_bytes_s,
           "mem": hw.mem_bytes_s, "cpu_attn": hw.host.cpu_attn_bytes_s,
           "cpu_attn_contended": hw.host.cpu_attn_contended_bytes_s}
    out.update({f"gemm_m{m}": r for m, r in hw.gemm_flop_s.items()})
    return out


def plan_of(hw, preset: str, layers, cap: int) -> dict:
    spec = spec_from_config(synth_config(preset, layers=layers))
    plan = make_plan(spec, torch.bfloat16, hw.device, cap, Workload.uniform(1024, 256, 64), hardware=hw)
    d = plan.to_dict()
    keys = ("attention", "wave_size", "attn_micro_batch", "ffn_micro_tokens", "near_tie")
    return {**{k: d.get(k) for k in keys}, "decode_tok_s": round(plan.predicted["decode_tok_s"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args()
    probes = [measure() for _ in range(args.probes)]
    raw = [rates(hw) for hw in probes]
    print(f"{'rate':<20} {'min':>12} {'max':>12} {'max/min':>8}")
    for name in raw[0]:
        vals = [r[name] for r in raw]
        lo, hi = min(vals), max(vals)
        print(f"{name:<20} {lo:>12.4g} {hi:>12.4g} {hi / lo if lo > 0 else float('nan'):>8.3f}")
    plans = {}
    for preset, layers, cap in JOBS:
        label = f"{preset}{'/' + str(layers) if layers else ''} @ {cap >> 30} GiB"
        try:
            plans[label] = [plan_of(snapped(hw), preset, layers, cap) for hw in probes]
        except OffbatchError as e:  # e.g. a cap above this machine's memory
            print(label, "not planned:", e)
            continue
        for i, p in enumerate(plans[label]):
            print(label, f"probe {i + 1}", p)
        same = len({p["attention"] for p in plans[label]}) == 1
        print(label, "SAME placement from every probe" if same else "PLACEMENT FLIPPED")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rates": raw, "plans": plans}, f, indent=2)


if __name__ == "__main__":
    main()
