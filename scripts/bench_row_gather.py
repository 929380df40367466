"""Issue 17's fetch path on the GPU: how fast a sparse set of FFN neuron rows crosses from pinned host memory.

Rows of an OPT-30B-shaped cold part (hidden 7168, bf16) chosen at random, three ways, each timed with CUDA
events after a warm-up, against the floor (the rows' bytes over the pinned copy rate measured here):
  zero-copy  kernels.gather_rows: the GPU reads the rows in place (offbatch/kernels/rows_triton.py);
  host+copy  the twin's path: torch.index_select on the host threads into a pinned buffer, then one copy;
  contiguous one copy of the same number of bytes, contiguous (the link's rate: the floor).

  python scripts/bench_row_gather.py [--rows 28672] [--hidden 7168] [--picks 512,1827,4096,8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from offbatch import kernels  # noqa: E402


def timed(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, max(start.elapsed_time(end) / 1e3, 0.0) or (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=28672)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--picks", default="512,1827,4096,8192")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    src = torch.empty(a.rows, a.hidden, dtype=torch.bfloat16).pin_memory()
    src.view(torch.int16).random_(generator=g)
    report = {"rows": a.rows, "hidden": a.hidden, "gpu": torch.cuda.get_device_name(), "points": []}
    for n in (int(p) for p in a.picks.split(",")):
        idx_h = torch.randperm(a.rows, generator=g)[:n].sort().values
        idx = idx_h.cuda()
        out = torch.empty(n, a.hidden, dtype=torch.bfloat16, device="cuda")
        staging = torch.empty(n, a.hidden, dtype=torch.bfloat16).pin_memory()
        flat = src.view(-1)[: n * a.hidden]
        flat_out = out.view(-1)
        nbytes = n * a.hidden * 2

        def zero_copy():
            kernels.gather_rows(src, idx, out=out)

        def host_then_copy():
            torch.index_select(src, 0, idx_h, out=staging)
            out.copy_(staging, non_blocking=True)

        def contiguous():
            flat_out.copy_(flat, non_blocking=True)

        zero_copy()
        torch.cuda.synchronize()
        # Compared as bits: the random bit patterns include NaNs, which torch.equal never finds equal.
        assert torch.equal(out.cpu().view(torch.int16), src[idx_h].view(torch.int16)), "zero-copy gather differs"
        t = {name: timed(fn) for name, fn in (("zero_copy", zero_copy), ("host_then_copy", host_then_copy),
                                               ("contiguous", contiguous))}
        point = {"picks": n, "bytes": nbytes, **{f"{k}_s": v for k, v in t.items()},
                 **{f"{k}_gb_s": nbytes / v / 1e9 for k, v in t.items()},
                 "zero_copy_over_floor": t["contiguous"] / t["zero_copy"]}
        report["points"].append(point)
        print(f"{n:>6} rows ({nbytes / 2**20:7.1f} MiB): zero-copy {point['zero_copy_gb_s']:6.1f} GB/s, host gather + copy "
              f"{point['host_then_copy_gb_s']:6.1f} GB/s, contiguous copy {point['contiguous_gb_s']:6.1f} GB/s "
              f"(zero-copy at {point['zero_copy_over_floor']:.2f} of it)", flush=True)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
