"""A/B of decode-step variants on one packed model, in one process: the same bench job under each
variant, its decode rate and its decode steps' host-side intervals (no profiler, no extra syncs).

A variant is NAME=SETTINGS, settings comma-separated:
  pin.KNOB=VALUE   pin a plan knob (attn_micro_batch=1024, wave_size=512, ...)
  switch=SECONDS   sys.setswitchinterval (how soon another Python thread, e.g. the host KV writer, runs)
  env.NAME=VALUE   an environment variable for that run (OFFBATCH_* switches read at run time)

Usage: python scripts/step_variants.py --synth llama-3-8b --weights int4 --kv int8 \
         base= mb1024=pin.attn_micro_batch=1024 [--prompts 1024 --prompt-len 64 --gen-len 32] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from offbatch.engine.benchmark import run_bench
from offbatch.errors import OffbatchError
from offbatch.engine.streaming import StreamingEngine
from offbatch.formats import get_format
from offbatch.models.spec import spec_from_config
from offbatch.offload.weights import SynthSource, WeightStore
from offbatch.tools.synth import synth_config
from offbatch.units import parse_bytes


def parse_variant(text: str) -> tuple[str, dict, float | None, dict]:
    name, _, settings = text.partition("=")
    pins, switch, env = {}, None, {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        if key.startswith("pin."):
            pins[key[4:]] = int(value) if value.lstrip("-").isdigit() else value
        elif key == "switch":
            switch = float(value)
        elif key.startswith("env."):
            env[key[4:]] = value
        else:
            raise SystemExit(f"unknown setting {key!r} in variant {text!r}")
    return name, pins, switch, env


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--synth", required=True)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--weights", default="dense")
    ap.add_argument("--kv")
    ap.add_argument("--gpu-memory", default="8GiB")
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1, help="run the variants this many times, interleaved")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds is at least 1")
    if min(args.prompts, args.prompt_len, args.gen_len) < 1:
        ap.error("--prompts, --prompt-len and --gen-len are at least 1")
    variants = [parse_variant(v) for v in args.variants]

    try:
        config = synth_config(args.synth, layers=args.layers)
    except OffbatchError as e:  # an unknown preset: its message lists the known ones
        ap.error(str(e))
    source = SynthSource(spec_from_config(config))
    cap = parse_bytes(args.gpu_memory) if args.device != "cpu" else None
    t0 = time.perf_counter()
    store = WeightStore(source, torch.bfloat16, pin=args.device == "cuda", fmt=get_format(args.weights),
                        encode_on=args.device)
    print(f"packed {store.total_bytes / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s", flush=True)
    common = {"weights": args.weights, "store": store}
    if args.kv:
        common["kv_formats"] = args.kv.split(",")
    run_bench(source, args.device, cap, 64, args.prompt_len, 2, default_dtype=torch.bfloat16, **common)  # compiles

    intervals: list[float] = []
    original = StreamingEngine.step

    def step(self, dec, pre):
        t = time.perf_counter()
        out = original(self, dec, pre)
        if not pre:
            intervals.append(time.perf_counter() - t)
        return out

    rows = []
    default_switch = sys.getswitchinterval()
    StreamingEngine.step = step
    try:
        for rnd in range(args.rounds):
            for name, pins, switch, env in variants:
                saved = {k: os.environ.get(k) for k in env}
                os.environ.update(env)
                sys.setswitchinterval(switch if switch is not None else default_switch)
                intervals.clear()
                try:
                    r = run_bench(source, args.device, cap, args.prompts, args.prompt_len, args.gen_len,
                                  default_dtype=torch.bfloat16, **common, **pins)
                finally:
                    sys.setswitchinterval(default_switch)
                    for k, v in saved.items():
                        if v is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = v
                plan = r["plan"]
                row = {"round": rnd, "variant": name, "decode_tok_s": r["decode_tok_s"], "e2e_tok_s": r["e2e_tok_s"],
                       "tokens_per_step": r["decode_tokens_per_step"],
                       "step_ms_median": 1e3 * statistics.median(intervals) if intervals else None,
                       "achieved_over_floor_with_kv": r["decode_achieved_over_floor_with_kv_copies"],
                       "attention": plan.get("attention"), "wave": plan.get("wave_size"),
                       "attn_micro_batch": plan.get("attn_micro_batch"), "kv_format": plan.get("kv_format"),
                       "predicted_decode_tok_s": plan.get("predicted", {}).get("decode_tok_s"),
                       "host_kv_store_wait_s": r["time_split_s"].get("host_kv_store_wait")}
                rows.append(row)
                print(f"[{rnd}] {name:14s} decode {row['decode_tok_s']:7.0f} tok/s  step median "
                      f"{row['step_ms_median']:6.1f} ms ({row['tokens_per_step']:.0f} tokens)  "
                      f"{row['attention']} wave {row['wave']} mb {row['attn_micro_batch']} kv {row['kv_format']}  "
                      f"kv-store wait {row['host_kv_store_wait_s']:.2f} s  predicted {row['predicted_decode_tok_s']:.0f}",
                      flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(rows, f, indent=1)
    finally:
        StreamingEngine.step = original


if __name__ == "__main__":
    main()
