"""Measure the machine: copy rates, GEMM rates, CPU attention, disk reads, memory sizes. A few seconds;
the result is cached per machine under the user cache directory, `--reprobe` measures again."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from offbatch.planner.hardware import PROFILES, Hardware, Host

CACHE_VERSION = 2  # 2: cpu_attn_noise
# Probed rates are snapped to a geometric grid of RATE_STEP steps (then 3 significant digits): two probes
# of one machine differ by a few percent (copy rates, CPU attention beside copies), and a plan made
# from one must be the plan made from the other. Noise that straddles a grid line still moves a rate by
# one step; the solver's tie tolerance (planner.solve.TIE_TOLERANCE) absorbs what that changes.
RATE_STEP = 1.05
# Host CPU attention is the one probed rate that does not repeat: two series of five fresh probes of one
# H200 put its median 48-66 GB/s alone and 26-41 GB/s beside copies (up to 38% apart), and medians over
# fresh buffers inside one probe did not narrow that (their own spread was 10-50%). A probed machine
# therefore declares this much noise on it (Hardware.cpu_attn_noise): the solver keeps GPU attention
# unless CPU attention is predicted faster by more (BENCHMARKS.md, sixth session).
PROBED_CPU_ATTN_NOISE = 0.4


def _timed(fn, device: torch.device, reps: int, inner: int = 1) -> float:
    """Median seconds of fn() over reps runs after one warm-up; on a GPU each run times `inner` calls
    back to back (a lone small GEMM is a few microseconds, below the events' resolution and noise)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(inner):
                fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1000 / inner)
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


def d2h_rate(device: torch.device, nbytes: int = 1 << 28, reps: int = 3) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    return nbytes / _timed(lambda: dst.copy_(src, non_blocking=True), device, reps)


def gemm_rate(device: torch.device, m: int, k: int = 4096, n: int = 14336, dtype=torch.bfloat16, reps: int = 10) -> float:
    """FLOP/s of an [m, k] x [k, n] product (random data, not zeros)."""
    if device.type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(n, k, device=device, dtype=dtype)
    inner = max(1, min(50, (1 << 16) // m)) if device.type == "cuda" else 1
    return 2 * m * k * n / _timed(lambda: torch.nn.functional.linear(a, b), device, reps, inner)


def memory_bandwidth(device: torch.device, nbytes: int = 1 << 28, reps: int = 3) -> float:
    """Device memory bytes/s of a large copy (read + write)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _timed(lambda: dst.copy_(src), device, reps)


def cpu_attention_rate(seqs: int = 32, kv_heads: int = 8, length: int = 1024, head_dim: int = 128,
                       dtype=torch.bfloat16, reps: int = 11, during=None) -> float:
    """KV bytes/s that decode attention on the host threads reads (the engine's own attention code).
    `during`: a callable started before each timed call (e.g. issuing GPU copies) to measure the
    contended rate. The KV read per call (128 MiB by default) is far beyond the caches, as the engine's
    is, and the median of many calls is taken: a few-MiB best-of-three, as before, moved by 10-20%
    from one probe to the next and flipped the plan between CPU and GPU attention."""
    from offbatch.attention.dense import grouped_attention

    q = torch.randn(seqs, kv_heads * 4, 1, head_dim, dtype=dtype)
    k = torch.randn(seqs, kv_heads, length, head_dim, dtype=dtype)
    v = torch.randn_like(k)
    q_pos = torch.full((seqs, 1), length - 1)
    k_len = torch.full((seqs,), length)
    for _ in range(2):  # warm-up: thread pool, page faults
        grouped_attention(q, k, v, q_pos, k_len)
    times = []
    for _ in range(reps):
        if during is not None:
            during()
        t = time.perf_counter()
        grouped_attention(q, k, v, q_pos, k_len)
        times.append(time.perf_counter() - t)
    return 2 * k.numel() * k.element_size() / sorted(times)[len(times) // 2]


def disk_read_rate(folder: str | Path, limit_bytes: int = 256 << 20, limit_s: float = 1.5) -> float | None:
    """Bytes/s reading the largest weight file of a model folder, with its pages dropped from the page
    cache first (so it is the disk, not memory, that is measured). None when there is nothing to read."""
    files = sorted(Path(folder).glob("*.safetensors"), key=lambda p: (-p.stat().st_size, p.name))
    if not files:
        return None
    path = files[0]
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(16 << 20)
        view = memoryview(buf)
        done, t0 = 0, time.perf_counter()
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            while done < limit_bytes and time.perf_counter() - t0 < limit_s:
                n = f.readinto(view)
                if not n:
                    break
                done += n
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
    return done / elapsed if done and elapsed > 0 else None


def host_memory_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # no psutil: the POSIX way
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory_bytes(device: str) -> int:
    """Bytes of memory the compute device has: the GPU's, or the host's for the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory
    return host_memory_bytes()


def release_probe_memory(dev: torch.device) -> None:
    """Give back what the probe left in the caching allocator - its buffers and the cuBLAS workspaces of
    its GEMMs, which empty_cache keeps - so that none of it counts against the engine's cap afterwards (a
    probe run inside a capped build left a 64 MiB cap with 250 MiB already reserved)."""
    torch.cuda.synchronize(dev)
    clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear_workspaces is not None:
        clear_workspaces()
    torch.cuda.empty_cache()


def peer_rate(dev: torch.device, nbytes: int = 1 << 28, reps: int = 3) -> float:
    """Bytes/s of a copy from this GPU to the next one (a split weight stream's all-gather rides the same
    path); 0 with one GPU visible."""
    if torch.cuda.device_count() < 2:
        return 0.0
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    other = torch.device("cuda", (index + 1) % torch.cuda.device_count())
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=other)
    dst.copy_(src)  # the peer mapping and its first touch, untimed
    torch.cuda.synchronize(dev)
    torch.cuda.synchronize(other)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(dev)
        torch.cuda.synchronize(other)
        times.append(time.perf_counter() - t0)
    del src, dst
    with torch.cuda.device(other):
        torch.cuda.empty_cache()
    release_probe_memory(dev)
    return nbytes / _median(times)


# ---- the whole probe ----------------------------------------------------------------------------
def measure(device: str | None = None) -> Hardware:
    """Probe this machine with `device` as the compute device (cuda when present)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    host_mem = host_memory_bytes()
    if dev.type == "cuda":
        base = Host(threads=threads, memory_bytes=host_mem, cpu_attn_bytes_s=0.0, cpu_attn_contended_bytes_s=0.0,
                    disk_read_bytes_s=PROFILES["h200"].host.disk_read_bytes_s)  # the calibrated host constants
        props = torch.cuda.get_device_properties(dev)
        pinned = copy_rate(dev, 1 << 28, pinned=True, reps=3)
        pageable = copy_rate(dev, 1 << 27, pinned=False, reps=2)
        d2h = d2h_rate(dev)
        gemm = {m: gemm_rate(dev, m, k=4096, n=8192, reps=5) for m in (16, 64, 256, 1024, 4096)}
        membw = memory_bandwidth(dev)
        alones = [cpu_attention_rate() for _ in range(3)]  # fresh buffers each time: placement varies
        src = torch.empty(1 << 28, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
        stream = torch.cuda.Stream(dev)

        def copies():  # keep PCIe busy (and the host's DRAM) while the host attends
            torch.cuda.synchronize(dev)
            with torch.cuda.stream(stream):
                for _ in range(4):
                    dst.copy_(src, non_blocking=True)

        contendeds = [cpu_attention_rate(during=copies) for _ in range(3)]
        torch.cuda.synchronize(dev)
        del src, dst
        release_probe_memory(dev)
        peer = peer_rate(dev)
        hw = Hardware(
            name=f"probed:{props.name}", device="cuda", gpu_name=props.name, gpu_memory_bytes=props.total_memory,
            pcie="", h2d_pinned_bytes_s=pinned, h2d_pageable_bytes_s=pageable, d2h_bytes_s=d2h, gemm_flop_s=gemm,
            mem_bytes_s=0.75 * membw,
            host=replace(base, threads=threads, memory_bytes=host_mem, cpu_attn_bytes_s=_median(alones),
                         cpu_attn_contended_bytes_s=min(_median(alones), _median(contendeds))),
            peer_bytes_s=peer,
            cpu_attn_noise=PROBED_CPU_ATTN_NOISE,
        )
    else:
        base = PROFILES["cpu"].host
        # The CPU as compute device: a "copy" into a device slot is a host memcpy.
        memcpy = copy_rate(dev, 1 << 26, pinned=False, reps=3)
        gemm = {m: gemm_rate(dev, m, k=1024, n=1024, reps=3) for m in (16, 64, 256, 1024)}
        attn = cpu_attention_rate(seqs=4, length=256)
        hw = Hardware(
            name="probed:cpu", device="cpu", gpu_name=platform.processor() or "cpu", gpu_memory_bytes=host_mem,
            pcie="", h2d_pinned_bytes_s=memcpy, h2d_pageable_bytes_s=memcpy, d2h_bytes_s=memcpy, gemm_flop_s=gemm,
            mem_bytes_s=memcpy,
            host=replace(base, threads=threads, memory_bytes=host_mem, cpu_attn_bytes_s=attn,
                         cpu_attn_contended_bytes_s=attn),
        )
    return replace(hw, source=f"probed {time.strftime('%Y-%m-%d %H:%M')}")


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def snap_rate(rate: float) -> float:
    """A measured rate on the probe's grid (idempotent: a snapped rate snaps to itself)."""
    if not math.isfinite(rate) or rate <= 0:
        return rate
    return float(f"{RATE_STEP ** round(math.log(rate, RATE_STEP)):.3g}")


def snapped(hw: Hardware) -> Hardware:
    """The probed profile with every measured rate on the grid (sizes and the calibrated host constants
    as they are)."""
    host = replace(hw.host, cpu_attn_bytes_s=snap_rate(hw.host.cpu_attn_bytes_s),
                   cpu_attn_contended_bytes_s=snap_rate(hw.host.cpu_attn_contended_bytes_s),
                   disk_read_bytes_s=snap_rate(hw.host.disk_read_bytes_s))
    return replace(hw, h2d_pinned_bytes_s=snap_rate(hw.h2d_pinned_bytes_s),
                   h2d_pageable_bytes_s=snap_rate(hw.h2d_pageable_bytes_s), d2h_bytes_s=snap_rate(hw.d2h_bytes_s),
                   gemm_flop_s={m: snap_rate(r) for m, r in hw.gemm_flop_s.items()},
                   mem_bytes_s=snap_rate(hw.mem_bytes_s), host=host)


def machine_key(device: str) -> str:
    """Names this machine and compute device: a cache entry is reused only where it was measured."""
    parts = [platform.node(), platform.machine(), str(os.cpu_count()), str(host_memory_bytes() >> 30), device,
             torch.__version__]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts += [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def cache_file(device: str) -> Path:
    from offbatch.tools.default_model import cache_root

    return cache_root() / "hardware" / f"{machine_key(device)}.json"


def read_cache(path: Path) -> dict:
    """The cached probe, or {} when there is none or it cannot be used (another version, not JSON, a
    profile that does not check out): then the machine is measured again and the cache rewritten."""
    from offbatch.errors import OffbatchError

    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            return {}
        if "hardware" in data:
            Hardware.from_dict(data["hardware"])
        disks = data.get("disk_read_bytes_s", {})
        if not isinstance(disks, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in disks.values()):
            data["disk_read_bytes_s"] = {}
        return data
    except (OSError, ValueError, RecursionError, OffbatchError):
        return {}


def probe_hardware(device: str | None = None, model_dir: str | Path | None = None, reprobe: bool = False) -> Hardware:
    """This machine's Hardware, from the cache when it was measured before. With a model folder, the
    disk read rate of the file system it is on is measured too (once per file system)."""
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = cache_file(dev)
    data = {} if reprobe else read_cache(path)
    # Every plan on this machine starts from the one cached measurement (a fresh probe per run would
    # bring its noise into every plan), its rates on the grid.
    base = snapped(Hardware.from_dict(data["hardware"]) if "hardware" in data else measure(dev))
    hw = base
    disks = data.get("disk_read_bytes_s", {})
    if model_dir is not None and Path(model_dir).is_dir():
        fs = str(os.stat(model_dir).st_dev)
        if fs not in disks:
            rate = disk_read_rate(model_dir)
            if rate:
                disks[fs] = snap_rate(rate)
        if fs in disks:
            hw = replace(hw, host=replace(hw.host, disk_read_bytes_s=snap_rate(disks[fs])))
    new = {"version": CACHE_VERSION, "hardware": base.to_dict(), "disk_read_bytes_s": disks}
    if new != data:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(new, indent=2))
            tmp.replace(path)
        except OSError:
            pass  # a read-only cache only costs a probe next time
    return hw
