"""Where should the wave's KV live? Same model, cap and job; three placements, one run:
  gpu-kv   : the rule plan (KV on the device, the wave sized to fit beside the weight slots);
  host-gpu : KV in pinned host memory, a wave of --host-wave, each attention micro-batch's KV copied over;
  host-cpu : KV in pinned host memory, decode attention on the host threads.

    python scripts/bench_kv_modes.py --synth mixtral-8x7b --layers 8 --gpu-memory 8GiB --prompts 1024
"""

import argparse
import json

import torch

from offbatch.engine.benchmark import run_bench
from offbatch.models.spec import spec_from_config
from offbatch.tools.synth import synth_config
from offbatch.offload.weights import SynthSource
from offbatch.units import parse_bytes

p = argparse.ArgumentParser()
p.add_argument("--synth", default="mixtral-8x7b")
p.add_argument("--layers", type=int, default=8)
p.add_argument("--gpu-memory", default="8GiB")
p.add_argument("--prompts", type=int, default=1024)
p.add_argument("--prompt-len", type=int, default=256)
p.add_argument("--gen-len", type=int, default=64)
p.add_argument("--host-wave", type=int, default=1024)
p.add_argument("--modes", default="host-gpu,host-cpu")
p.add_argument("--device", default="cuda")
p.add_argument("--out", default=None)
args = p.parse_args()

spec = spec_from_config(synth_config(args.synth, layers=args.layers))
modes = {"gpu-kv": {}, "host-gpu": {"attention": "host-kv-gpu", "wave_size": args.host_wave},
         "host-cpu": {"attention": "host-kv-cpu", "wave_size": args.host_wave}}
results = {}
for name in args.modes.split(","):
    r = run_bench(SynthSource(spec), args.device, parse_bytes(args.gpu_memory), args.prompts, args.prompt_len,
                  args.gen_len, default_dtype=getattr(torch, spec.torch_dtype), plan_overrides=modes[name])
    results[name] = r
    print(f"{name:9s} wave {r['plan']['wave_size']:5d} decode {r['decode_tok_s']:8.1f} tok/s  e2e {r['e2e_tok_s']:8.1f}"
          f"  prefill {r['prefill_tok_s']:8.1f}  floor {r['decode_floor_tok_s']:8.1f}  peak GPU "
          f"{r['peak_gpu_reserved_bytes'] / 2**30:.2f} GiB  wall {r['wall_s']:.0f} s", flush=True)
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
if args.out:
    open(args.out, "w").write(json.dumps(results, indent=2))
