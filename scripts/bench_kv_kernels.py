"""Time the compressed-KV kernels (offbatch/kernels/kv_triton.py) on CUDA against the HBM floor and the
dense attention path the engine uses today.

Decode attention, one query token per slot, every slot holding L keys, for Llama-3-8B- and Mixtral-like
attention (32 query heads, 8 KV heads, head_dim 128; the two models share it), S slots, bf16:
  kv16 / kv8 / kv4  kv_decode_attention over bf16 KV, int8 rows (group 64) or int4 rows (group 32),
                    all views store[a:a+S, :, :L] of a store with a longer max_len, as the engine passes them;
  dense             offbatch.attention.dense.grouped_attention + grouped_lse over the bf16 views (bits 16).
"GB/s" is the KV bytes a call reads (S * nkv * L * row_bytes * 2) over its time; "of floor" is those
bytes over the HBM rate (--hbm, default an H200's 4.8 TB/s) divided by the time. Slot ranges rotate over
a store larger than twice the L2 cache, so every call reads from HBM. Times are the GPU's, median over
batches of CUDA-graph replays ("eager us": launched call by call, as an eager decode step pays them).
kv_encode is timed on a [16384, 8, 128] bf16 input (a prefill chunk's K), GB/s of bytes read + written.

  python scripts/bench_kv_kernels.py [--json PATH] [--slots 64 256] [--lengths 512 4096] [--sweep]
  python scripts/bench_kv_kernels.py --dry-run    # no GPU: one tiny case under the Triton interpreter

--sweep instead times candidate tiles (BLOCK_L, warps, stages) per bits and both product paths (tl.dot
with padded heads / broadcast multiply-sum) for 1, 2, 4 and 8 query heads per KV head.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv:  # before torch imports Triton: it reads TRITON_INTERPRET when it decorates
    os.environ["TRITON_INTERPRET"] = "1"

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

MODELS = {"llama3-8b": (32, 8, 128), "mixtral-8x7b": (32, 8, 128)}  # (query heads, KV heads, head_dim)
FORMATS = {16: 0, 8: 64, 4: 32}  # bits -> group (offbatch/offload/kv.py: Int8KV, Int4KV)
L2_BYTES = 60 << 20  # H200: 50 MB of L2; rotate over at least twice that
ENCODE_SHAPE = (16384, 8, 128)


# ------------------------------------------------------------------------------------------------ timing

def time_us(fns, device: torch.device, graph: bool = True, batches: int = 7, per_batch: int = 10) -> float:
    """Median over batches of the mean time of one call, cycling through `fns`. CUDA: events around
    graph replays (graph) or eager launches; CPU (dry run): wall time, one batch."""
    for f in fns:  # compiles, allocator warm-up
        f()
    if device.type != "cuda":
        start = time.perf_counter()
        for f in fns:
            f()
        return (time.perf_counter() - start) * 1e6 / len(fns)
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


# ------------------------------------------------------------------------------------------------ inputs

class Case:
    """Stores for one (S, nh, nkv, d, L, bits) and the slot-range views that calls rotate over."""

    def __init__(self, S, nh, nkv, d, L, bits, device, gen, copies=None):
        from offbatch.kernels import kv_reference as ref

        self.S, self.nh, self.nkv, self.d, self.L, self.bits = S, nh, nkv, d, L, bits
        self.group = FORMATS[bits]
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the dry run: fp32 on the CPU
        self.row = d * self.dtype.itemsize if bits == 16 else ref.row_bytes(d, bits, self.group)
        self.kv_bytes = S * nkv * L * self.row * 2
        if copies is None:
            copies = 1 if device.type != "cuda" else max(2, -(-2 * L2_BYTES // self.kv_bytes))
        max_len = L + 64
        slots = copies * S + 1
        self.k_store, self.v_store = (self._store(slots, max_len, device, gen) for _ in "kv")
        self.views = [(self.k_store[1 + c * S:1 + (c + 1) * S, :, :L], self.v_store[1 + c * S:1 + (c + 1) * S, :, :L])
                      for c in range(copies)]  # fmt: skip
        self.q = torch.randn(S, nh, d, device=device, generator=gen).to(self.dtype)
        self.k_len = torch.full((S,), L, dtype=torch.long, device=device)

    def _store(self, slots, max_len, device, gen):
        from offbatch.kernels import kv_reference as ref

        shape = (slots, self.nkv, max_len, self.d)
        if self.bits == 16:
            return torch.randn(*shape, device=device, generator=gen).to(self.dtype)
        # Encoded slot by slot: the float32 values of a whole store would not fit beside it.
        store = torch.empty(*shape[:-1], self.row, dtype=torch.uint8, device=device)
        for s in range(slots):
            x = torch.randn(*shape[1:], device=device, generator=gen).to(self.dtype)
            store[s] = ref.kv_encode(x, self.bits, self.group)
        return store


def check(kt, case: Case) -> float:
    """The kernel against its twin on the first view before anything is timed; the relative error."""
    from offbatch.kernels import kv_reference as ref

    k, v = case.views[0]
    out, lse = kt.kv_decode_attention(case.q, k, v, case.k_len, case.bits, case.group)
    twin, twin_lse = ref.kv_decode_attention(case.q, k, v, case.k_len, case.bits, case.group)
    err = ((out.float() - twin.float()).norm() / twin.float().norm()).item()
    lse_err = ((lse - twin_lse).abs().max()).item()
    if not (err < 2e-2 and lse_err < 2e-2):
        raise SystemExit(f"kv_decode_attention differs from its twin: out {err:.2e}, lse {lse_err:.2e}")
    return err


def dense_path(case: Case):
    """The engine's dense decode: grouped_attention + grouped_lse on the bf16 views."""
    from offbatch.attention.dense import grouped_attention, grouped_lse

    q4 = case.q[:, :, None, :]
    q_pos = (case.k_len - 1)[:, None]

    def call(k, v):
        grouped_attention(q4, k, v, q_pos, case.k_len)
        grouped_lse(q4, k, q_pos, case.k_len)

    return [lambda k=k, v=v: call(k, v) for k, v in case.views]


# ------------------------------------------------------------------------------------------------- bench

def bench_attention(kt, model, S, L, bits, args, device, gen) -> dict:
    nh, nkv, d = MODELS[model]
    case = Case(S, nh, nkv, d, L, bits, device, gen)
    err = check(kt, case)
    fns = [lambda k=k, v=v: kt.kv_decode_attention(case.q, k, v, case.k_len, bits, case.group)
           for k, v in case.views]  # fmt: skip
    us = time_us(fns, device)
    eager = time_us(fns, device, graph=False) if device.type == "cuda" else us
    tiles = kt.INTERPRETER_TILES if kt.INTERPRETED else kt.ATTENTION_TILES[bits]
    splits, _ = kt._splits(S * nkv, L, tiles.l, device, None)
    row = dict(kind="attention", model=model, S=S, nh=nh, nkv=nkv, d=d, L=L, bits=bits, group=case.group,
               kv_bytes=case.kv_bytes, us=us, eager_us=eager, gbps=case.kv_bytes / us / 1e3,
               of_floor=case.kv_bytes / args.hbm * 1e6 / us, splits=splits, twin_rel_err=err)  # fmt: skip
    if bits == 16:
        row["dense_us"] = time_us(dense_path(case), device)
        row["dense_gbps"] = case.kv_bytes / row["dense_us"] / 1e3
    return row


def bench_encode(kt, bits, args, device, gen) -> dict:
    from offbatch.kernels import kv_reference as ref

    shape = ENCODE_SHAPE if device.type == "cuda" else (64, 2, 64)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    group = FORMATS[bits]
    copies = max(2, -(-2 * L2_BYTES // (2 * torch.Size(shape).numel()))) if device.type == "cuda" else 2
    xs = [torch.randn(*shape, device=device, generator=gen).to(dtype) for _ in range(copies)]
    if not torch.equal(kt.kv_encode(xs[0], bits, group), ref.kv_encode(xs[0], bits, group)):
        raise SystemExit(f"kv_encode (bits {bits}) differs from its twin")
    us = time_us([lambda x=x: kt.kv_encode(x, bits, group) for x in xs], device)
    rows = torch.Size(shape[:-1]).numel()
    moved = xs[0].numel() * xs[0].element_size() + rows * ref.row_bytes(shape[-1], bits, group)
    return dict(kind="encode", shape=list(shape), bits=bits, group=group, us=us, bytes=moved,
                gbps=moved / us / 1e3, of_floor=moved / args.hbm * 1e6 / us)


HEADER = (f"{'model':<13} {'S':>4} {'L':>5} {'bits':>4} {'KV MB':>7} {'us':>8} {'GB/s':>6} {'of floor':>8} "
          f"{'eager us':>8} {'splits':>6} {'dense us':>8} {'vs dense':>8}")  # fmt: skip


def format_row(row) -> str:
    if row["kind"] == "encode":
        return (f"{'encode ' + 'x'.join(map(str, row['shape'])):<24} {row['bits']:>4} {row['bytes'] / 1e6:>7.1f} "
                f"{row['us']:>8.1f} {row['gbps']:>6.0f} {row['of_floor']:>8.2f}")  # fmt: skip
    line = (f"{row['model']:<13} {row['S']:>4} {row['L']:>5} {row['bits']:>4} {row['kv_bytes'] / 1e6:>7.1f} "
            f"{row['us']:>8.1f} {row['gbps']:>6.0f} {row['of_floor']:>8.2f} {row['eager_us']:>8.1f} "
            f"{row['splits']:>6}")  # fmt: skip
    if "dense_us" in row:
        line += f" {row['dense_us']:>8.1f} {row['dense_us'] / row['us']:>7.2f}x"
    return line


def sweep(kt, args, device, gen) -> list[dict]:
    """Candidate tiles per bits at S=64, L=4096 (Llama-3-8B heads), then both product paths for 1, 2, 4, 8
    query heads per KV head. (The dry run: tiny shapes; the interpreter ignores the tiles.)"""
    results = []
    S, L, d, nkv = (2, 40, 64, 2) if args.dry_run else (64, 4096, 128, 8)
    candidates = [(16, 1, 1), (32, 1, 1)] if args.dry_run else list(itertools.product((32, 64, 128), (4, 8), (1, 2, 3)))
    defaults = dict(kt.ATTENTION_TILES)
    for bits in args.bits:
        case = Case(S, 4 * nkv, nkv, d, L, bits, device, gen)
        timed = []
        for bl, warps, stages in candidates:
            kt.ATTENTION_TILES[bits] = kt.Tiles(bl, warps, stages)
            try:
                check(kt, case)
                us = time_us([lambda k=k, v=v: kt.kv_decode_attention(case.q, k, v, case.k_len, bits, case.group)
                              for k, v in case.views], device, batches=3)  # fmt: skip
            except Exception as e:  # out of shared memory or registers: skip that tile
                print(f"  skip bits {bits} {(bl, warps, stages)}: {type(e).__name__}")
                continue
            timed.append((us, (bl, warps, stages)))
            results.append(dict(kind="sweep_tiles", bits=bits, tiles=[bl, warps, stages], us=us,
                                gbps=case.kv_bytes / us / 1e3))
        timed.sort()
        runners_up = [(round(t, 1), c) for t, c in timed[1:4]]
        print(f"bits {bits}: best tiles {timed[0][1]} {timed[0][0]:.1f} us; next {runners_up}")
        kt.ATTENTION_TILES[bits] = defaults[bits]
    for bits, nh in itertools.product(args.bits, (nkv, 2 * nkv, 4 * nkv, 8 * nkv)):
        case = Case(S, nh, nkv, d, L, bits, device, gen)
        us = {}
        for use_dot in (True, False):
            us[use_dot] = time_us([lambda k=k, v=v: kt.kv_decode_attention(case.q, k, v, case.k_len, bits, case.group,
                                                                           use_dot=use_dot)
                                   for k, v in case.views], device, batches=3)  # fmt: skip
        results.append(dict(kind="sweep_dot", bits=bits, rep=nh // nkv, dot_us=us[True], broadcast_us=us[False]))
        print(f"bits {bits} rep {nh // nkv}: dot {us[True]:.1f} us, broadcast {us[False]:.1f} us "
              f"-> {'dot' if us[True] <= us[False] else 'broadcast'}")
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slots", type=int, nargs="+", default=[64, 256])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--bits", type=int, nargs="+", default=[16, 8, 4], choices=[16, 8, 4])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--hbm", type=float, default=4.8e12, help="HBM bytes/s for the floor")
    p.add_argument("--json", metavar="PATH", help="write every row (and the sweep) as JSON")
    p.add_argument("--sweep", action="store_true", help="time candidate tiles and product paths instead")
    p.add_argument("--dry-run", action="store_true", help="no GPU: one tiny case per bits, Triton interpreted")
    args = p.parse_args()
    if args.dry_run:
        device = torch.device("cpu")
        args.slots, args.lengths, args.models = [2], [40], ["llama3-8b"]
        MODELS["llama3-8b"] = (4, 2, 64)  # tiny heads: the interpreter is numpy per program
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("needs a CUDA GPU (or --dry-run)")
    from offbatch.kernels import kv_triton as kt

    gen = torch.Generator(device=device).manual_seed(0)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter, dry run)"
    print(f"{name}; KV bf16 / int8 g64 / int4 g32; floor at {args.hbm / 1e12:.2f} TB/s")
    rows: list[dict] = []
    if args.sweep:
        rows = sweep(kt, args, device, gen)
    else:
        print(HEADER)
        for model, S, L, bits in itertools.product(args.models, args.slots, args.lengths, args.bits):
            rows.append(bench_attention(kt, model, S, L, bits, args, device, gen))
            print(format_row(rows[-1]), flush=True)
        for bits in (8, 4):
            rows.append(bench_encode(kt, bits, args, device, gen))
            print(format_row(rows[-1]), flush=True)
    if args.json:
        meta = dict(device=name, hbm=args.hbm, dry_run=args.dry_run, torch=torch.__version__)
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
