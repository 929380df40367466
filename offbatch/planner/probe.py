"""Measure the machine: host-to-device copy rates and matrix-multiply rates, the ceilings of a step."""

from __future__ import annotations

import time

import torch


def _timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of fn() over reps runs after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def copy_rate(device: torch.device, nbytes: int = 1 << 30, pinned: bool = True, reps: int = 5) -> float:
    """Bytes per second from host memory to the device (pinned or pageable source)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned and device.type == "cuda")
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return nbytes / _timed(lambda: dst.copy_(src, non_blocking=True), device, reps)


def gemm_rate(device: torch.device, m: int, k: int = 4096, n: int = 14336, dtype=torch.bfloat16, reps: int = 10) -> float:
    """FLOP/s of an [m, k] x [k, n] product (random data, not zeros)."""
    if device.type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(n, k, device=device, dtype=dtype)
    return 2 * m * k * n / _timed(lambda: torch.nn.functional.linear(a, b), device, reps)
