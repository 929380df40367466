"""Time the bitmap-sparse weight expansion (offbatch/kernels/bitmap_triton.py) on CUDA against the HBM floor
and against a dense copy of the same dense bytes.

For each Llama-3-8B weight shape [N, K] (q/o 4096x4096, up/gate 14336x4096, down 4096x14336) at --sparsity
(default 0.5; every row keeps the same count unless --varying) in bf16:
  expand  bitmap_expand(bits, values, K, bf16, out=dense): reads bits (N*K/8 bytes) and the kept values,
          writes the dense [N, K];
  copy    dense.copy_(other dense): reads and writes N*K*2 bytes each (what moving the dense weight costs).
"GB/s" is those bytes over the time; "of floor" = (bytes / --hbm, default an H200's 4.8 TB/s) / time.
Times are CUDA-event medians over --runs samples (after --warmup calls), each sample the mean of --batch
calls replayed from a CUDA graph (--eager: launched one by one), cycling through input copies that
together exceed the L2 cache. The kernel's output is checked against the torch twin before timing.

  python scripts/bench_bitmap_kernel.py [--sparsity 0.5] [--varying] [--block-n 8 --block-k 256 --splits 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SHAPES = {"llama_q": (4096, 4096), "llama_up": (14336, 4096), "llama_down": (4096, 14336)}
L2_BYTES = 60 << 20  # H200: 50 MB of L2; rotate over at least twice that


def time_us(fns, args) -> float:
    """Median over args.runs samples of the mean time of one call, cycling through `fns`."""
    for _ in range(args.warmup):  # compiles, allocator warm-up
        for f in fns:
            f()
    torch.cuda.synchronize()

    def launch():
        for i in range(args.batch):
            fns[i % len(fns)]()

    run = launch
    if not args.eager:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            launch()
        run = g.replay
        run()
    times = []
    for _ in range(args.runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / args.batch)
    return statistics.median(times)


def copies_for(nbytes: int) -> int:
    return max(2, -(-2 * L2_BYTES // max(nbytes, 1)))


def sparse_weight(n: int, k: int, sparsity: float, varying: bool, gen, ref):
    """(bits, values) of a random bf16 [n, k] weight with `sparsity` of it pruned."""
    w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    r = torch.rand(n, k, device="cuda", generator=gen)
    if varying:
        keep = r < 1.0 - sparsity
    else:
        keep = torch.zeros(n, k, dtype=torch.bool, device="cuda")
        keep.scatter_(1, r.argsort(1)[:, : round((1.0 - sparsity) * k)], True)
    return ref.bitmap_pack(w, keep)


def bench_shape(name: str, n: int, k: int, args, gen, bt, ref) -> dict:
    dtype = torch.bfloat16
    bits, values = sparse_weight(n, k, args.sparsity, args.varying, gen, ref)
    kept = int(ref.popcount(bits).sum())
    expand_bytes = bits.numel() + kept * values.element_size() + n * k * 2  # bits + kept values read, dense written
    copy_bytes = 2 * n * k * 2
    copies = copies_for(expand_bytes)
    weights = [(bits, values)] + [(bits.clone(), values.clone()) for _ in range(copies - 1)]
    outs = [torch.empty(n, k, dtype=dtype, device="cuda") for _ in range(2)]
    blocks = dict(block_n=args.block_n or bt.GPU_BLOCKS["block_n"], block_k=args.block_k or bt.GPU_BLOCKS["block_k"])

    def expand(b, v, y):
        return bt.launch(b, v, k, y, **blocks, splits=args.splits, num_warps=args.warps)

    y = expand(bits, values, outs[0])
    if not torch.equal(y, ref.bitmap_expand(bits, values, k, dtype)):
        raise SystemExit(f"{name}: the kernel differs from its twin")
    dense_src = [torch.randn(n, k, device="cuda", generator=gen, dtype=dtype) for _ in range(copies_for(copy_bytes))]

    us_expand = time_us([lambda i=i: expand(*weights[i], outs[i % 2]) for i in range(copies)], args)
    us_copy = time_us([lambda i=i: outs[i % 2].copy_(dense_src[i]) for i in range(len(dense_src))], args)
    us = dict(expand=us_expand, copy=us_copy)
    nbytes = dict(expand=expand_bytes, copy=copy_bytes)
    row = dict(shape=name, n=n, k=k, sparsity=args.sparsity, varying=args.varying, blocks=blocks,
               splits=args.splits, us=us, bytes=nbytes,
               gbps={key: nbytes[key] / us[key] / 1e3 for key in us},
               of_floor={key: nbytes[key] / args.hbm * 1e6 / us[key] for key in us})  # fmt: skip
    gbps, floor = row["gbps"], row["of_floor"]
    print(f"{name:<11} {n:>6}x{k:<6} {us_expand:>10.1f} {gbps['expand']:>9.0f} {floor['expand']:>8.2f} "
          f"{us_copy:>9.1f} {gbps['copy']:>9.0f} {floor['copy']:>8.2f} {us_expand / us_copy:>9.2f}")  # fmt: skip
    print("JSON " + json.dumps(row))
    return row


HEADER = (f"{'shape':<11} {'N x K':>13} {'expand us':>10} {'GB/s':>9} {'of floor':>8} {'copy us':>9} {'GB/s':>9} "
          f"{'of floor':>8} {'exp/copy':>9}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of each row pruned")
    p.add_argument("--varying", action="store_true", help="rows keep random counts (default: the same count)")
    p.add_argument("--block-n", type=int, default=None, help="rows a program (default: bitmap_triton.GPU_BLOCKS)")
    p.add_argument("--block-k", type=int, default=None, help="columns a step (a power of two >= 8)")
    p.add_argument("--splits", type=int, default=None, help="segments per row (default: enough to fill the GPU)")
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--runs", type=int, default=20, help="timed samples (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds over the copies first")
    p.add_argument("--batch", type=int, default=10, help="calls a sample")
    p.add_argument("--eager", action="store_true", help="launch call by call instead of replaying a CUDA graph")
    p.add_argument("--hbm", type=float, default=4.8e12, help="HBM bytes/s for the floor")
    args = p.parse_args()
    if not 0.0 <= args.sparsity <= 1.0:
        p.error("--sparsity must lie in [0, 1]")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    from offbatch.kernels import bitmap_reference as ref
    from offbatch.kernels import bitmap_triton as bt

    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  bitmap expand, bf16, sparsity {args.sparsity}"
          f"{' (varying per row)' if args.varying else ''}; floor at {args.hbm / 1e12:.2f} TB/s")
    print(HEADER)
    for name in args.shapes:
        bench_shape(name, *SHAPES[name], args, gen, bt, ref)


if __name__ == "__main__":
    main()
