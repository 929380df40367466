"""Same model, same GPU cap, same run: transformers + accelerate offload against offbatch.

    python scripts/bench_vs_accelerate.py --preset mixtral-8x7b --layers 8 --gpu-memory 8GiB \
        --prompts 1024 --prompt-len 256 --gen-len 64

1. Writes the synth model to --workdir (once).
2. Accelerate, in a subprocess so its memory does not touch ours: `device_map="auto"` with `max_memory`
   giving the GPU the cap minus room for activations; the batch is the largest power of two whose peak
   reserved memory stays under the cap (accelerate keeps no cap itself), found with 2-token runs; then
   decode and end-to-end tok/s over --acc-batches batches of --acc-gen-len new tokens.
3. offbatch's bench on the same folder and cap, with the wave and micro-batches it chooses.
4. One table with both and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GiB = 1 << 30


def accelerate_baseline(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    cap = args.cap
    weight_cap = max(1 * GiB, cap - args.acc_headroom)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16, device_map="auto",
        max_memory={0: weight_cap, "cpu": 400 * GiB})
    model.eval()
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def batch(b):
        return torch.randint(3, vocab - 1, (b, args.prompt_len), generator=g).to("cuda")

    def gen(ids, new):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    trials, best = [], 0
    for b in [1, 2, 4, 8, 16, 32, 64, 128]:
        if b > args.acc_max_batch:
            break
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            gen(batch(b), 2)
            peak = torch.cuda.max_memory_reserved()
        except torch.OutOfMemoryError:
            peak = -1
        trials.append({"batch": b, "peak_reserved": peak})
        print(f"[accelerate] batch {b}: peak reserved {peak / GiB:.2f} GiB", flush=True)
        if peak < 0 or peak > cap:
            break
        best = b
    if best == 0:
        return {"error": "no batch fits under the cap", "trials": trials}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    full = one = 0.0
    for _ in range(args.acc_batches):
        ids = batch(best)
        one += gen(ids, 1)
        full += gen(ids, args.acc_gen_len)
    n = args.acc_batches * best
    return {
        "batch": best, "trials": trials, "load_s": load_s,
        "decode_tok_s": n * (args.acc_gen_len - 1) / max(1e-9, full - one),
        "e2e_tok_s": n * args.acc_gen_len / full,
        "prefill_tok_s": n * args.prompt_len / one,
        "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved(),
        "weight_cap_bytes": weight_cap, "gen_len": args.acc_gen_len, "batches": args.acc_batches,
    }


def offbatch_run(args) -> dict:
    from offbatch.engine.benchmark import run_bench
    from offbatch.models.loader import open_checkpoint
    from offbatch.offload.weights import CheckpointSource

    import torch

    ckpt = open_checkpoint(args.model)
    return run_bench(CheckpointSource(ckpt), args.device, args.cap, args.prompts, args.prompt_len, args.gen_len,
                     default_dtype=torch.bfloat16)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--gpu-memory", default="8GiB")
    p.add_argument("--prompts", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--acc-gen-len", type=int, default=16)
    p.add_argument("--acc-batches", type=int, default=2)
    p.add_argument("--acc-max-batch", type=int, default=128)
    p.add_argument("--acc-headroom", default="3GiB", help="cap minus this is accelerate's GPU weight budget")
    p.add_argument("--workdir", default="/tmp/offbatch-bench")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--role", choices=["main", "accelerate", "offbatch"], default="main")
    p.add_argument("--model", default=None)
    p.add_argument("--skip-accelerate", action="store_true")
    p.add_argument("--device", default="cuda", help="offbatch's compute device (cpu: a smoke test of the script)")
    args = p.parse_args()
    from offbatch.units import parse_bytes

    args.cap = parse_bytes(args.gpu_memory)
    args.acc_headroom = parse_bytes(args.acc_headroom)
    if args.role == "accelerate":
        print("RESULT " + json.dumps(accelerate_baseline(args)), flush=True)
        return
    if args.role == "offbatch":
        print("RESULT " + json.dumps(offbatch_run(args)), flush=True)
        return

    name = f"{args.preset}-{args.layers or 'full'}"
    args.model = str(Path(args.workdir) / name)
    if not (Path(args.model) / "config.json").exists():
        from offbatch.tools.synth import synth_model

        t = time.perf_counter()
        synth_model(args.preset, args.model, layers=args.layers)
        print(f"wrote {args.model} in {time.perf_counter() - t:.0f} s", flush=True)

    def child(role):
        cmd = [sys.executable, __file__, "--role", role, "--model", args.model] + [
            a for a in sys.argv[1:] if a not in ("--skip-accelerate",)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        sys.stderr.write(out.stderr[-3000:])
        for line in out.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:])
            print(line, flush=True)
        return {"error": f"{role} exited {out.returncode}", "stderr_tail": out.stderr[-2000:]}

    acc = {"skipped": True} if args.skip_accelerate else child("accelerate")
    ob = child("offbatch")
    report = {"preset": args.preset, "layers": args.layers, "gpu_memory_cap": args.cap, "prompts": args.prompts,
              "prompt_len": args.prompt_len, "gen_len": args.gen_len, "accelerate": acc, "offbatch": ob}
    if "decode_tok_s" in acc and "decode_tok_s" in ob:
        report["ratio_decode"] = ob["decode_tok_s"] / acc["decode_tok_s"]
        report["ratio_e2e"] = ob["e2e_tok_s"] / acc["e2e_tok_s"]
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print_table(report)


def print_table(r):
    acc, ob = r["accelerate"], r["offbatch"]
    print(f"\n== {r['preset']} x{r['layers'] or 'all'} layers, cap {r['gpu_memory_cap'] / GiB:.0f} GiB, "
          f"{r['prompts']} prompts x {r['prompt_len']} + {r['gen_len']} new ==")
    print(f"{'':28s}{'accelerate':>14s}{'offbatch':>14s}{'ratio':>8s}")
    for key, label in [("decode_tok_s", "decode tok/s"), ("e2e_tok_s", "end-to-end tok/s"),
                       ("prefill_tok_s", "prefill tok/s")]:
        a, o = acc.get(key), ob.get(key)
        ratio = f"{o / a:8.1f}" if a and o else ""
        print(f"{label:28s}{a if a is None else round(a, 1)!s:>14}{o if o is None else round(o, 1)!s:>14}{ratio}")
    for key, label in [("peak_gpu_reserved_bytes", "peak GPU reserved GiB")]:
        a, o = acc.get(key), ob.get(key)
        print(f"{label:28s}{'' if a is None else f'{a / GiB:.2f}':>14s}{'' if o is None else f'{o / GiB:.2f}':>14s}")
    if "batch" in acc:
        print(f"accelerate batch {acc['batch']} (largest under the cap), offbatch wave {ob.get('plan', {}).get('wave_size')}")
    if "decode_floor_tok_s" in ob:
        print(f"offbatch decode floor {ob['decode_floor_tok_s']:.1f} tok/s, achieved/floor "
              f"{ob['decode_achieved_over_floor']:.2f}; weight wait {ob['time_split_s']['weight_wait']:.1f} s of "
              f"{ob['wall_s']:.1f} s; streamed {ob['decode_bytes_per_step'] / GiB:.2f} GiB/decode step")
        if ob.get("decode_kv_copied_bytes_per_step"):
            print(f"with the {ob['decode_kv_copied_bytes_per_step'] / GiB:.2f} GiB of host KV copied per decode step: "
                  f"floor {ob['decode_floor_with_kv_copies_tok_s']:.1f} tok/s, achieved/floor "
                  f"{ob['decode_achieved_over_floor_with_kv_copies']:.2f}")
    for side in ("accelerate", "offbatch"):
        if "error" in r[side]:
            print(f"{side} ERROR: {r[side]['error']}\n{r[side].get('stderr_tail', '')}")


if __name__ == "__main__":
    main()
