"""Start-up cost of pinned host memory (the model's weights and the host KV are pinned at load: on the H200
machine 11 s for 22 GB of weights and 20 s for the KV, most of a 35 s load): how fast each way of getting N GiB
of page-locked memory is, and whether copies from it reach the link's rate.

  a. torch.empty(n, pin_memory=True)            (cudaHostAlloc through torch's pinned allocator; today's way)
  b. a. then zero_()                            (the host KV's torch.zeros(..., pin_memory=True))
  c. torch.empty(n), its pages touched by T threads, then cudaHostRegister (offload/pinned.pin_in_place)

  python scripts/bench_pinned_alloc.py [--gib 4] [--threads 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from offbatch.offload.pinned import pin_in_place, unpin_in_place  # noqa: E402


def copy_rate(host: torch.Tensor) -> float:
    dev = torch.empty(host.numel(), dtype=torch.uint8, device="cuda")
    dev.copy_(host[: dev.numel()], non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return host.numel() / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=16)
    a = ap.parse_args()
    n = int(a.gib * 2**30)
    torch.cuda.init()
    torch.empty(1, pin_memory=True)  # the allocator's own start-up, not timed

    t0 = time.perf_counter()
    x = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    ta = time.perf_counter() - t0
    ra = copy_rate(x)
    del x
    torch.cuda.synchronize()
    from offbatch.offload.weights import release_pinned_cache

    release_pinned_cache()
    t0 = time.perf_counter()
    x = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    x.zero_()
    tb = time.perf_counter() - t0
    del x
    release_pinned_cache()

    t0 = time.perf_counter()
    y = torch.empty(n, dtype=torch.uint8)
    step = -(-n // a.threads)
    with ThreadPoolExecutor(a.threads) as pool:
        list(pool.map(lambda i: y[i : i + step].zero_(), range(0, n, step)))
    touched = time.perf_counter() - t0
    pin_in_place(y)
    tc = time.perf_counter() - t0
    rc = copy_rate(y)
    unpin_in_place(y)
    gb = n / 1e9
    print(f"{a.gib:g} GiB pinned: a. cudaHostAlloc {ta:.2f} s ({gb / ta:.1f} GB/s), copies from it {ra:.1f} GB/s; "
          f"b. + zero_ {tb:.2f} s ({gb / tb:.1f} GB/s); c. {a.threads} threads touch {touched:.2f} s + register "
          f"{tc - touched:.2f} s = {tc:.2f} s ({gb / tc:.1f} GB/s), copies from it {rc:.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
