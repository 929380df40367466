"""Time host decode attention (offbatch/attention/host_attention.py) on this machine's CPU threads.

For a few decode shapes and KV formats (bf16 dense, int8 groups of 64, int4 groups of 32) it reports ms
per call and GB/s of KV bytes read, next to this machine's memory bandwidth (a sum and a copy of a
256 MiB tensor) and the plain-torch twin (kernels/kv_reference.py) for scale.

    .venv/bin/python scripts/bench_host_attention.py                  # the default shapes
    .venv/bin/python scripts/bench_host_attention.py --slots 64 --length 4000 --top-k 128
Bytes read: host_decode_attention reads K and V of every valid position; topk_attention reads K of its
range and the V rows it keeps (at most the range's). G values/s: the K/V values behind those bytes per
second (packed formats hold more values per byte: on a CPU whose float32 products, not its memory,
set the pace, this is the rate that stays about level across formats).
"""

from __future__ import annotations

import argparse
import time

import torch

from offbatch.attention.host_attention import host_decode_attention, topk_attention
from offbatch.kernels import kv_reference

FORMATS = {"bf16": (16, 0), "int8": (8, 64), "int4": (4, 32)}


def best_seconds(fn, repeat: int) -> float:
    fn()  # warm: first-touch of buffers, thread pool start
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memory_bandwidth(repeat: int) -> tuple[float, float]:
    """GB/s of a sum (bytes read) and of a copy (bytes read + written) of 256 MiB of float32."""
    x = torch.rand(64 << 20)
    y = torch.empty_like(x)
    nbytes = x.numel() * 4
    return nbytes / best_seconds(x.sum, repeat) / 1e9, 2 * nbytes / best_seconds(lambda: y.copy_(x), repeat) / 1e9


def store_views(S: int, nkv: int, L: int, d: int, fmt: str, seed: int = 0):
    """K and V views [S, nkv, L, row] of a larger host store (as the backends pass them), and row bytes."""
    bits, group = FORMATS[fmt]
    g = torch.Generator().manual_seed(seed)
    shape = (S + 2, nkv, L + 64, d)
    k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    if bits == 16:
        k, v = k.bfloat16(), v.bfloat16()
    else:
        k, v = kv_reference.kv_encode(k, bits, group), kv_reference.kv_encode(v, bits, group)
    row_bytes = k.shape[-1] * k.element_size()
    return k[1 : S + 1, :, :L], v[1 : S + 1, :, :L], row_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--rep", type=int, default=4, help="query heads per KV head")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--sinks", type=int, default=4, help="topk: positions before the range (the GPU's sinks)")
    ap.add_argument("--window", type=int, default=256, help="topk: positions after the range (the GPU's window)")
    ap.add_argument("--top-k", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-reference", action="store_true", help="skip timing the plain-torch twin")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    S, nkv, rep, d, L = args.slots, args.kv_heads, args.rep, args.head_dim, args.length
    nh = nkv * rep

    read_gb, copy_gb = memory_bandwidth(args.repeat)
    print(f"torch threads {torch.get_num_threads()}; memory: sum {read_gb:.1f} GB/s read, "
          f"copy {copy_gb:.1f} GB/s read+written")
    print(f"shape: S={S} nkv={nkv} rep={rep} d={d} L={L}")
    print(f"{'function':<34}{'format':<7}{'ms/call':>9}{'KV MB':>9}{'GB/s':>8}{'% of sum':>10}{'G values/s':>12}")

    def report(name, fmt, row, fn, nbytes, repeat=args.repeat):
        seconds = best_seconds(fn, repeat)
        gbs = nbytes / seconds / 1e9
        values = nbytes / row * d  # K/V values behind those bytes (a row holds d values)
        print(f"{name:<34}{fmt:<7}{seconds * 1e3:9.2f}{nbytes / 1e6:9.1f}{gbs:8.2f}{100 * gbs / read_gb:9.1f}%"
              f"{values / seconds / 1e9:12.2f}")

    g = torch.Generator().manual_seed(1)
    for fmt in args.formats:
        bits, group = FORMATS[fmt]
        k, v, row = store_views(S, nkv, L, d, fmt)
        q = torch.randn(S, nh, d, generator=g).bfloat16()
        full = torch.full((S,), L)
        ragged = torch.randint(L // 2, L + 1, (S,), generator=g)
        report("host_decode_attention", fmt, row, lambda: host_decode_attention(q, k, v, full, bits, group),
               2 * S * nkv * L * row)
        report("host_decode_attention (ragged)", fmt, row,
               lambda: host_decode_attention(q, k, v, ragged, bits, group), 2 * nkv * int(ragged.sum()) * row)
        if not args.no_reference:
            report("kv_reference.kv_decode_attention", fmt, row,
                   lambda: kv_reference.kv_decode_attention(q, k, v, full, bits, group), 2 * S * nkv * L * row, 2)
        lo, hi = torch.full((S,), args.sinks), torch.full((S,), L - args.window)
        n = L - args.window - args.sinks
        for top_k in args.top_k:
            kept = S * nh * min(top_k, n)  # V rows gathered: each query head's own, or the range in one pass
            report(f"topk_attention k={top_k}", fmt, row,
                   lambda: topk_attention(q, k, v, lo, hi, top_k, bits, group),
                   S * nkv * n * row + min(kept, S * nkv * n) * row)

if __name__ == "__main__":
    main()
