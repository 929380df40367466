"""Time the int4 (and int8) weight kernels on CUDA against dense bf16 and the HBM floor, and find the row
count below which the fused kernel beats dequant-to-scratch + cuBLAS (quant_triton.should_fuse).

For each weight shape [N, K] and rows M, bf16 compute:
  dense  F.linear(x, W) with W dense bf16 (what bf16 weights cost);
  split  dequant_int4 into a bf16 scratch [N, K], then F.linear (the large micro-batch path);
  fused  int4_linear (the small micro-batch path);
  (--int8: int8 per-row "split8" / "fused8" likewise.)
Weights rotate among copies that together exceed the L2 cache, so every call reads them from HBM.
Times are the GPU's, from CUDA-graph replays (Python's launch cost excluded); "eager us" is the fused
kernel launched call by call, as an eager decode step pays it. "GB/s" is the weight bytes a call reads
(packed bytes + scales for int4) over its time; "floor" is those bytes over the HBM rate (--hbm, default
an H200's 4.8 TB/s); "of floor" = floor / time.

Shapes: Mixtral-8x7B experts (w1/w3 14336x4096, w2 4096x14336; Llama-3-8B's MLP has the same shapes),
Llama-3-8B attention (q/o 4096x4096, k/v 1024x4096). Prints a table and one JSON line per row, then the
crossover per shape. Finishes in well under a minute on an H200; --sweep (slow: a compile per tile)
instead times the fused kernel's candidate tiles per row class and prints the best.

  python scripts/bench_quant_kernels.py [--group 64] [--asym] [--int8] [--ms 1 8 16 ...] [--sweep]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SHAPES = {"mixtral_w1": (14336, 4096), "mixtral_w2": (4096, 14336), "llama_q": (4096, 4096), "llama_kv": (1024, 4096)}
MS = [1, 8, 16, 32, 64, 128, 256, 1024]
L2_BYTES = 60 << 20  # H200: 50 MB of L2; rotate over at least twice that


def time_us(fns, graph: bool = True, batches: int = 7, per_batch: int = 10) -> float:
    """Median over batches of the mean time of one call, cycling through `fns` (one per weight copy).
    graph: the calls replayed from a CUDA graph (the GPU's time, without Python's launch cost); else
    launched one by one (what an eager decode step pays)."""
    for f in fns:  # compiles, allocator and cuBLAS warm-up
        f()
    torch.cuda.synchronize()

    def launch():
        for i in range(per_batch):
            fns[i % len(fns)]()

    run = launch
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            launch()
        run = g.replay
    run()
    times = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / per_batch)
    return statistics.median(times)


def copies_for(nbytes: int) -> int:
    return max(2, -(-2 * L2_BYTES // max(nbytes, 1)))


def random_int4(n: int, k: int, group: int, asym: bool, copies: int, gen):
    """(q4, scale, minimum) copies with random bytes and scales (values do not change the timing)."""
    out = []
    for _ in range(copies):
        q4 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda", generator=gen)
        scale = (torch.rand(n, k // group, device="cuda", generator=gen) * 0.02).half()
        low = -(torch.rand(n, k // group, device="cuda", generator=gen) * 0.1).half() if asym else None
        out.append((q4, scale, low))
    return out


def random_int8(n: int, k: int, copies: int, gen):
    return [(torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda", generator=gen),
             torch.rand(n, 1, device="cuda", generator=gen) * 0.01) for _ in range(copies)]  # fmt: skip


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def check(qt, ref, x, w4, group: int) -> None:
    """The fused kernel against its twin before anything is timed."""
    y, twin = qt.int4_linear(x, *w4, group), ref.int4_linear(x, *w4, group)
    err = ((y.float() - twin.float()).norm() / twin.float().norm()).item()
    if not err < 1e-2:
        raise SystemExit(f"int4_linear differs from its twin: relative error {err:.2e}")


def bench_shape(name, n, k, args, gen, qt, ref):
    dense = [torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
             for _ in range(copies_for(2 * n * k))]  # fmt: skip
    w4 = random_int4(n, k, args.group, args.asym, copies_for(n * k // 2), gen)
    w8 = random_int8(n, k, copies_for(n * k), gen) if args.int8 else []
    scratch = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
    bytes4, bytes8, bytes_dense = nbytes(*w4[0]), nbytes(*w8[0]) if w8 else 0, 2 * n * k
    check(qt, ref, torch.randn(16, k, device="cuda", generator=gen, dtype=torch.bfloat16), w4[0], args.group)
    rows = []
    for m in args.ms:
        x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
        us = {
            "dense": time_us([lambda w=w: F.linear(x, w) for w in dense]),
            "split": time_us([lambda w=w: F.linear(x, qt.dequant_int4(*w, args.group, k, torch.bfloat16, out=scratch))
                              for w in w4]),
            "fused": time_us([lambda w=w: qt.int4_linear(x, *w, args.group) for w in w4]),
            "fused_eager": time_us([lambda w=w: qt.int4_linear(x, *w, args.group) for w in w4], graph=False),
        }  # fmt: skip
        if w8:
            us["split8"] = time_us([lambda w=w: F.linear(x, qt.dequant_int8(*w, torch.bfloat16, out=scratch)) for w in w8])
            us["fused8"] = time_us([lambda w=w: qt.int8_linear(x, *w) for w in w8])
        row = dict(shape=name, n=n, k=k, m=m, group=args.group, asym=args.asym, us=us,
                   weight_bytes=dict(dense=bytes_dense, int4=bytes4, int8=bytes8),
                   floor_us=dict(dense=bytes_dense / args.hbm * 1e6, int4=bytes4 / args.hbm * 1e6,
                                 int8=bytes8 / args.hbm * 1e6),
                   fused_gbps=bytes4 / us["fused"] / 1e3, dense_gbps=bytes_dense / us["dense"] / 1e3,
                   should_fuse=qt.should_fuse(m, n, k))  # fmt: skip
        rows.append(row)
        print_row(row)
    return rows


HEADER = (f"{'shape':<11} {'M':>5} {'dense us':>9} {'split us':>9} {'fused us':>9} {'fused GB/s':>10} "
          f"{'of floor':>8} {'dense GB/s':>10} {'winner':>6} {'eager us':>9}")  # fmt: skip


def print_row(row) -> None:
    us = row["us"]
    winner = "fused" if us["fused"] <= us["split"] else "split"
    line = (f"{row['shape']:<11} {row['m']:>5} {us['dense']:>9.1f} {us['split']:>9.1f} {us['fused']:>9.1f} "
            f"{row['fused_gbps']:>10.0f} {row['floor_us']['int4'] / us['fused']:>8.2f} {row['dense_gbps']:>10.0f} "
            f"{winner:>6} {us['fused_eager']:>9.1f}")  # fmt: skip
    if "fused8" in us:
        line += f"   int8: split {us['split8']:.1f} fused {us['fused8']:.1f}"
    print(line)
    print("JSON " + json.dumps(row))


def crossover(rows) -> int | None:
    """The largest M measured below which the fused kernel wins at every M (None: it never does)."""
    best = None
    for row in sorted(rows, key=lambda r: r["m"]):
        if row["us"]["fused"] > row["us"]["split"]:
            break
        best = row["m"]
    return best


def sweep(args, gen, qt, ref) -> None:
    """Time candidate tiles of the fused linear kernel per shape and M; print the best per (shape, M)."""
    import itertools

    for name in args.shapes:
        n, k = SHAPES[name]
        w4 = random_int4(n, k, args.group, args.asym, copies_for(n * k // 2), gen)
        check(qt, ref, torch.randn(16, k, device="cuda", generator=gen, dtype=torch.bfloat16), w4[0], args.group)
        for m in [m for m in args.ms if m <= 256]:
            x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
            results = []
            bm_choices = sorted({16, max(16, min(128, 1 << (m - 1).bit_length()))})
            block_ks = [b for b in (32, 64, 128, 256) if b <= args.group]  # a tile never spans two groups
            candidates = itertools.product(bm_choices, (32, 64, 128), block_ks, (4, 8), (3, 4, 6, 8))
            for bm, bn, bk, warps, stages in candidates:
                qt.LINEAR_TILES = [(1 << 62, qt.Tiles(bm, bn, bk, warps, stages))]
                try:
                    check(qt, ref, x, w4[0], args.group)
                    results.append((time_us([lambda w=w: qt.int4_linear(x, *w, args.group) for w in w4], batches=3),
                                    (bm, bn, bk, warps, stages)))
                except Exception as e:  # out of shared memory or registers: skip that tile
                    print(f"  skip {(bm, bn, bk, warps, stages)}: {type(e).__name__}")
            results.sort()
            runners_up = [(round(t, 1), c) for t, c in results[1:4]]
            print(f"{name} M={m}: best {results[0][1]} {results[0][0]:.1f} us; next {runners_up}")
            print("JSON " + json.dumps(dict(sweep=name, m=m, best=results[0][1], us=results[0][0])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--asym", action="store_true", help="int4 with a minimum per group")
    p.add_argument("--int8", action="store_true", help="also time the int8 per-row kernels")
    p.add_argument("--ms", type=int, nargs="+", default=MS)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--hbm", type=float, default=4.8e12, help="HBM bytes/s for the floor")
    p.add_argument("--sweep", action="store_true", help="time the fused kernel's candidate tiles instead")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    from offbatch.kernels import quant_reference as ref
    from offbatch.kernels import quant_triton as qt

    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  int4 group {args.group}{' asym' if args.asym else ''}, bf16; "
          f"floor at {args.hbm / 1e12:.2f} TB/s; should_fuse: M <= {qt.FUSE_MAX_ROWS}")  # fmt: skip
    if args.sweep:
        sweep(args, gen, qt, ref)
        return
    print(HEADER)
    summary = {}
    for name in args.shapes:
        rows = bench_shape(name, *SHAPES[name], args, gen, qt, ref)
        summary[name] = crossover(rows)
    print("\nfused beats dequant + F.linear up to M =", summary)
    print("JSON " + json.dumps(dict(crossover=summary, fuse_max_rows=qt.FUSE_MAX_ROWS)))


if __name__ == "__main__":
    main()
