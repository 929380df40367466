"""Where a decode step's time goes: a bench job whose decode steps STEPS_SKIP .. +STEPS run under
torch.profiler (the build, the prefill and the first steps are not profiled), each of them timed between
two device syncs. Prints, per profiled step: the wall time, the device's busy time on the compute stream
(kernels), the copies' time, and the top kernels by device time per step; writes a Chrome trace.

If the kernels' time is well under the wall time, the step waits on the host (launches, syncs, the host
KV writer) or on copies, not on the GPU's arithmetic.

Usage: python scripts/profile_steps.py --synth llama-3-8b --weights int4 --kv int8 [--layers L]
         [--prompts 1024 --prompt-len 64 --gen-len 16] [--skip 4 --steps 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import gzip
import json
import os
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from offbatch.engine.benchmark import run_bench
from offbatch.errors import OffbatchError
from offbatch.engine.streaming import StreamingEngine
from offbatch.models.spec import spec_from_config
from offbatch.offload.weights import SynthSource
from offbatch.tools.synth import synth_config
from offbatch.units import parse_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synth", required=True)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--weights", default="dense")
    ap.add_argument("--kv", help="KV formats the planner may pick (as bench --kv)")
    ap.add_argument("--gpu-memory", default="8GiB")
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--skip", type=int, default=4, help="decode steps run before profiling")
    ap.add_argument("--steps", type=int, default=3, help="decode steps profiled")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--out", help="a folder for the tables, the step times and the Chrome trace")
    ap.add_argument("--trace", action="store_true", help="also write a Chrome trace of the profiled steps")
    ap.add_argument("--cprofile", action="store_true",
                    help="profile the steps' Python with cProfile instead (where the host thread's time goes)")
    ap.add_argument("--device", default="cuda", help="cpu: check the script itself on a tiny shape")
    args = ap.parse_args()
    if args.steps < 1 or args.skip < 0:
        ap.error("--steps is at least 1 and --skip at least 0")
    if min(args.prompts, args.prompt_len, args.gen_len) < 1:
        ap.error("--prompts, --prompt-len and --gen-len are at least 1")

    try:
        config = synth_config(args.synth, layers=args.layers)
    except OffbatchError as e:  # an unknown preset: its message lists the known ones
        ap.error(str(e))
    source = SynthSource(spec_from_config(config))
    cap = parse_bytes(args.gpu_memory) if args.device != "cpu" else None
    options = {"weights": args.weights}
    if args.kv:
        options["kv_formats"] = args.kv.split(",")
    # Fill Triton's cache first: a compile inside the profiled steps would be timed as the step.
    run_bench(source, args.device, cap, 64, args.prompt_len, 2, default_dtype=torch.bfloat16, **options)

    def sync():
        if args.device != "cpu":
            torch.cuda.synchronize()

    state = {"decode": 0, "prof": None, "walls": [], "unsynced": []}
    original = StreamingEngine.step

    def step(self, dec, pre):
        if pre:
            return original(self, dec, pre)
        state["decode"] += 1
        n = state["decode"]
        if n <= args.skip:
            t = time.perf_counter()
            out = original(self, dec, pre)
            sync()
            state["unsynced"].append(time.perf_counter() - t)
            return out
        if n > args.skip + args.steps:
            return original(self, dec, pre)
        if n == args.skip + 1:
            if args.cprofile:
                state["prof"] = cProfile.Profile()
                state["prof"].enable()
            else:
                state["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                state["prof"].__enter__()
        sync()
        t = time.perf_counter()
        out = original(self, dec, pre)
        sync()
        state["walls"].append((time.perf_counter() - t, len(dec)))
        if n == args.skip + args.steps:
            if args.cprofile:
                state["prof"].disable()
            else:
                state["prof"].__exit__(None, None, None)
        return out

    StreamingEngine.step = step
    try:
        r = run_bench(source, args.device, cap, args.prompts, args.prompt_len, args.gen_len, default_dtype=torch.bfloat16,
                      **options)
    finally:
        StreamingEngine.step = original
    prof = state["prof"]
    if prof is None:
        raise SystemExit(f"only {state['decode']} decode steps ran: lower --skip or raise --gen-len")
    steps = len(state["walls"])
    if args.cprofile:
        walls = ", ".join(f"{w * 1e3:.1f} ({n})" for w, n in state["walls"])
        out = io.StringIO()
        out.write(f"profiled steps (ms, tokens) under cProfile: {walls}\n")
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
        print(out.getvalue())
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"cprofile-{args.synth}-{args.weights}-{args.kv or 'exact'}.txt"), "w") as f:
                f.write(out.getvalue())
        return

    # Device time per kernel name over the profiled steps; copies apart (they run on the copy stream).
    kernels = defaultdict(lambda: [0.0, 0])
    copies = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        bucket = copies if e.name.startswith("Memcpy") or e.name.startswith("Memset") else kernels
        bucket[e.name][0] += us
        bucket[e.name][1] += 1
    kernel_ms = sum(v[0] for v in kernels.values()) / 1e3 / steps
    copy_ms = sum(v[0] for v in copies.values()) / 1e3 / steps
    wall_ms = sum(w for w, _ in state["walls"]) / steps * 1e3
    lines = [f"{args.synth} x{r['layers']} weights {args.weights} kv {args.kv or 'exact'}: plan {r['plan'].get('attention')} "
             f"wave {r['plan'].get('wave_size')}, kv_format {r['plan'].get('kv_format')}, "
             f"{r['plan'].get('resident_modules')} modules resident, attn micro-batch {r['plan'].get('attn_micro_batch')}",
             f"decode {r['decode_tok_s']:.0f} tok/s over the whole job, achieved/floor with KV "
             f"{r['decode_achieved_over_floor_with_kv_copies']:.2f}; KV copied per step "
             f"{r['decode_kv_copied_bytes_per_step'] / 1e9:.2f} GB, weights {r['decode_bytes_per_step'] / 1e9:.2f} GB",
             f"unprofiled steps between syncs (ms): {', '.join(f'{w * 1e3:.1f}' for w in state['unsynced'])}",
             f"profiled steps (ms, tokens): {', '.join(f'{w * 1e3:.1f} ({n})' for w, n in state['walls'])}",
             f"per profiled step: wall {wall_ms:.1f} ms, kernels {kernel_ms:.1f} ms (summed; streams may overlap), "
             f"copies {copy_ms:.1f} ms",
             "", "kernels, ms per step (calls per step):"]
    for name, (us, calls) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[: args.top]:
        lines.append(f"  {us / 1e3 / steps:8.2f}  ({calls / steps:6.1f})  {name[:110]}")
    lines.append("copies, ms per step (calls per step):")
    for name, (us, calls) in sorted(copies.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"  {us / 1e3 / steps:8.2f}  ({calls / steps:6.1f})  {name}")
    lines += ["", "host side (self CPU time over the profiled steps):",
              prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60)]
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        tag = f"{args.synth}-{args.weights}-{args.kv or 'exact'}"
        with open(os.path.join(args.out, f"steps-{tag}.txt"), "w") as f:
            f.write(text)
        with open(os.path.join(args.out, f"steps-{tag}.json"), "w") as f:
            json.dump({"walls_s": state["walls"], "kernel_ms_per_step": kernel_ms, "copy_ms_per_step": copy_ms,
                       "report": {k: v for k, v in r.items() if k != "tokens"}}, f, indent=1, default=str)
        if args.trace:
            path = os.path.join(args.out, f"trace-{tag}.json")
            prof.export_chrome_trace(path)
            with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as z:
                z.write(f.read())
            os.remove(path)


if __name__ == "__main__":
    main()
