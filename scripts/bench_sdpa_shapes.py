"""Does decode attention pay a one-time cost for every new context length? Runs `grouped_attention` (the
engine's dense attention) over a growing context, as decode steps do, twice: the first pass meets each
length for the first time, the second repeats them. With cuDNN's SDPA backend (torch's choice on an H200
for a boolean mask) each new shape builds an execution plan. Prints ms per call of both passes, with and
without the cuDNN backend allowed.

Usage (CUDA): python scripts/bench_sdpa_shapes.py [--slots 256] [--start 65] [--steps 32]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from offbatch.attention.dense import grouped_attention


def run_pass(args, backends, start):
    nh, nkv, d = 32, 8, 128
    dev, dt = "cuda", torch.bfloat16
    k = torch.randn(args.slots, nkv, start + args.steps, d, device=dev, dtype=dt)
    v = torch.randn_like(k)
    q = torch.randn(args.slots, nh, 1, d, device=dev, dtype=dt)
    times = []
    for L in range(start, start + args.steps):
        q_pos = torch.full((args.slots, 1), L - 1, device=dev)
        k_len = torch.full((args.slots,), L, device=dev)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with sdpa_kernel(backends):
            grouped_attention(q, k[:, :, :L], v[:, :, :L], q_pos, k_len)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sum(times) / len(times) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", type=int, default=256)
    ap.add_argument("--start", type=int, default=65)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    every = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    no_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    for name, backends, start in (("cudnn allowed", every, args.start), ("no cudnn", no_cudnn, args.start + 1000)):
        first = run_pass(args, backends, start)
        second = run_pass(args, backends, start)
        print(f"{name:14s}: first pass {first:8.2f} ms per call, second pass {second:8.2f} ms per call "
              f"({args.steps} lengths from {start}, {args.slots} slots)", flush=True)


if __name__ == "__main__":
    main()
