"""Where a weight format's decode steps spend GPU time: a short bench job under torch.profiler, the top
kernels by CUDA time. For finding what keeps a compressed format off its PCIe floor.

Usage: python scripts/profile_format.py --synth mixtral-8x7b --layers 2 --weights int4 [--expert-rows N]
  --expert-rows N: experts with more than N rows each (on average) expand into the dense grouped kernels,
  fewer run the fused grouped kernel (default: the formats' own threshold).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import offbatch.formats.int4 as int4_format
import offbatch.formats.int8 as int8_format
from offbatch.engine.benchmark import run_bench
from offbatch.models.spec import spec_from_config
from offbatch.offload.weights import SynthSource
from offbatch.tools.synth import synth_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synth", required=True)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--weights", default="int4")
    ap.add_argument("--gpu-memory", default="8GiB")
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=8)
    ap.add_argument("--expert-rows", type=int)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", help="also write the tables to this file")
    args = ap.parse_args()
    if args.expert_rows is not None:
        int4_format.FUSE_MAX_ROWS = int8_format.FUSE_MAX_ROWS = args.expert_rows
    from offbatch.units import parse_bytes

    source = SynthSource(spec_from_config(synth_config(args.synth, layers=args.layers)))
    cap = parse_bytes(args.gpu_memory)
    run_bench(source, "cuda", cap, 64, args.prompt_len, 2, default_dtype=torch.bfloat16, weights=args.weights)  # compile
    plain = run_bench(source, "cuda", cap, args.prompts, args.prompt_len, args.gen_len, default_dtype=torch.bfloat16,
                      weights=args.weights)
    print(f"without the profiler: decode {plain['decode_tok_s']:.0f} tok/s, "
          f"{plain['decode_tokens_per_step'] / max(plain['decode_tok_s'], 1e-9) * 1e3:.1f} ms per step of "
          f"{plain['decode_tokens_per_step']:.0f} tokens", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        r = run_bench(source, "cuda", cap, args.prompts, args.prompt_len, args.gen_len, default_dtype=torch.bfloat16,
                      weights=args.weights)
    print(f"{args.synth} x{args.layers} {args.weights} expert_rows={args.expert_rows}: decode {r['decode_tok_s']:.0f} "
          f"tok/s, prefill {r['prefill_tok_s']:.0f}, plan {r['plan'].get('attention')} wave {r['plan'].get('wave_size')}, "
          f"achieved/floor {r['decode_achieved_over_floor_with_kv_copies']:.2f}")
    text = [f"decode {r['decode_tok_s']:.0f} tok/s, {r['decode_tokens_per_step']:.0f} tokens per step: "
            f"{r['decode_tokens_per_step'] / max(r['decode_tok_s'], 1e-9) * 1e3:.1f} ms per step (under the profiler)",
            prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=60),
            # Host time per call: a step whose kernels are short can be bound by the thread that issues them.
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60)]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
