"""What a machine can do, as the cost model needs it: memory sizes and the rates of copies, GEMMs,
CPU attention and disk reads. A `Hardware` comes from the probe (this machine, cached), from a
built-in profile (`--hardware rtx4090`: plan for a machine you do not have), or from a JSON file.

Built-in figures: `h200` is what offbatch measured on that machine (2026-11-28 bench runs); the
others are public specifications turned into achievable rates (pinned PCIe copies reach ~80% of the
link; bf16 GEMMs with fp32 accumulation reach ~90% of the dense tensor-core peak at large M, and at
small M are bound by reading the weight, M x memory bandwidth). The host-side constants (per-sequence
host work of a step) were calibrated on the H200 runs and are used for every profile.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from offbatch.errors import OffbatchError, PlanFileError
from offbatch.units import MAX_BYTES

GiB = 1 << 30


@dataclass(frozen=True)
class Host:
    threads: int
    memory_bytes: int
    cpu_attn_bytes_s: float  # KV bytes/s read by torch attention on the host threads, alone
    cpu_attn_contended_bytes_s: float  # the same while pinned copies to the GPU run (they share DRAM)
    disk_read_bytes_s: float  # model folder, cold cache
    # Serial host work of a step: sampling, bookkeeping, tensor set-up per sampled sequence, and a
    # fixed part per step. Fitted (with prefill_token_s, launch_s, attn_call_s) to the 20 grid points
    # measured on the H200 at 71f97a5 (benchmarks/2026-11-28c), the first engine without a wait per layer;
    # the earlier, larger values had absorbed those waits.
    seq_s: float = 1.0e-5
    step_s: float = 2.0e-3
    # Per prompt token of a prefill step, beyond copies and compute (building the step's ids and
    # positions, embedding on the host).
    prefill_token_s: float = 3.0e-6
    # Issuing one kernel from Python, the module code around it included: with every weight resident
    # nothing else bounds a small step (Llama-3-8B, wave 147: 45 ms a decode step, 10 of them GEMMs).
    launch_s: float = 2e-5
    sync_s: float = 3e-5  # one host <-> device synchronisation
    # One decode attention micro-batch call: its Python and launches are not hidden (the router's
    # sync in every MoE layer, and the copies issued from the same thread, tie the host to the device).
    attn_call_s: float = 5e-5
    # One decode micro-batch of host KV attended on the GPU, beyond attn_call_s: its copy issued on the
    # fetch stream, the step's new tokens patched into the copy, the buffer's events. Issued from the host
    # thread like launches, it bounds the step where nothing slower does (every weight resident: Llama-3-8B
    # int4 + int8 KV, wave 1024 at 8 GiB, 180 / 155 / 125 ms a decode step with 4 / 2 / 1 micro-batches a
    # layer, benchmarks/2026-11-30-e).
    kv_fetch_range_s: float = 5.7e-4
    # Cold FFN neurons the host threads gather and multiply per second for the hybrid FFN (bf16 products,
    # 16 threads, beside the copies): 8.7-15 GB/s in the engine on the H200 host (2026-11-30); a machine is
    # taken at this or half its CPU-attention rate, whichever is lower (both gather rows and multiply them).
    cpu_ffn_bytes_s: float = 11e9


@dataclass(frozen=True)
class Hardware:
    name: str
    device: str  # "cuda" or "cpu": where the engine computes
    gpu_name: str
    gpu_memory_bytes: int
    pcie: str  # e.g. "5.0 x16"; "" on the CPU
    h2d_pinned_bytes_s: float
    h2d_pageable_bytes_s: float
    d2h_bytes_s: float
    gemm_flop_s: dict[int, float]  # bf16 GEMM rate by M (tokens), K and N ~ 4096..14336
    mem_bytes_s: float  # device memory bandwidth as attention / elementwise kernels reach it
    host: Host
    # Elements/s of the MoE output scatter (index_add_ of bf16 rows): about memory-bound on the H200
    # (the 71f97a5 runs; the earlier 1.5e9 had absorbed the per-layer waits of older engines), scaled by
    # memory bandwidth elsewhere.
    scatter_elems_s: float = 4.5e11
    source: str = "built-in"
    # How far apart two probes of this machine put host CPU attention (the least repeatable rate a plan
    # hangs on), as a fraction; 0 for the calibrated built-in profiles. Between a placement that runs
    # decode attention on the CPU and one that does not, the solver counts predictions within this (or
    # its TIE_TOLERANCE, whichever is larger) as a tie, so the choice cannot flip from probe to probe.
    cpu_attn_noise: float = 0.0
    # GPU-to-GPU copies between two GPUs of the host (NVLink, else PCIe peer), bytes/s one way: what a split
    # weight stream's all-gather moves (`run --split-stream`). 0: not measured (one GPU, or a profile without
    # it): priced at the pinned host link's rate.
    peer_bytes_s: float = 0.0

    @property
    def peer_rate(self) -> float:
        return self.peer_bytes_s or self.h2d_pinned_bytes_s

    # ---- rates -------------------------------------------------------------------------------------
    def gemm_rate(self, m: float) -> float:
        """FLOP/s of a GEMM with m rows: log-log interpolation between the measured points; below the
        smallest, proportional to m (bound by reading the weight); above the largest, flat."""
        cache = self.__dict__.get("_gemm_cache")
        if cache is None:  # frozen dataclass: set the memo table once, behind its back
            cache = {}
            object.__setattr__(self, "_gemm_cache", cache)
            object.__setattr__(self, "_gemm_pts", sorted(self.gemm_flop_s.items()))
        key = round(max(1.0, float(m)), 1)
        rate = cache.get(key)
        if rate is None:
            rate = cache[key] = self._interpolate(key)
        return rate

    def gemm_rates(self, m):
        """gemm_rate over an array of M (the same interpolation, vectorised)."""
        import numpy as np

        tab = self.__dict__.get("_gemm_logs")
        if tab is None:
            pts = sorted(self.gemm_flop_s.items())
            tab = (np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), pts[0])
            object.__setattr__(self, "_gemm_logs", tab)
        lm, lr, (m0, r0) = tab
        m = np.maximum(np.asarray(m, dtype=np.float64), 1.0)
        inside = np.exp(np.interp(np.log(m), lm, lr))  # flat beyond the last point
        return np.where(m < m0, r0 * m / m0, inside)

    def _interpolate(self, m: float) -> float:
        pts = self._gemm_pts
        if m in self.gemm_flop_s:
            return self.gemm_flop_s[m]
        if m <= pts[0][0]:
            return pts[0][1] * m / pts[0][0]
        for (m0, r0), (m1, r1) in zip(pts, pts[1:]):
            if m <= m1:
                f = math.log(m / m0) / math.log(m1 / m0)
                return math.exp(math.log(r0) + f * (math.log(r1) - math.log(r0)))
        return pts[-1][1]

    # ---- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["gemm_flop_s"] = {str(k): v for k, v in sorted(self.gemm_flop_s.items())}
        return d

    @staticmethod
    def from_dict(d: dict, source: str | None = None) -> "Hardware":
        """A profile from its JSON form (`plan --json` prints one under "hardware"), every field checked:
        a PlanFileError naming the first that is wrong (a rate of "fast", 0 GiB, a NaN)."""
        if not isinstance(d, dict) or not isinstance(d.get("host"), dict):
            raise PlanFileError("not a hardware profile: an object with a \"host\" object is expected; write one "
                                "with `offbatch plan --hardware h200 --json` as an example")
        try:
            host = Host(**d["host"])
            fields = {k: v for k, v in d.items() if k != "host"}
            points = d["gemm_flop_s"]
            if not isinstance(points, dict):
                raise TypeError("gemm_flop_s is not an object")
            fields["gemm_flop_s"] = {_whole_key(k): v for k, v in points.items()}
            hw = Hardware(host=host, **fields)
        except (KeyError, TypeError, ValueError) as e:
            raise PlanFileError(f"not a hardware profile ({type(e).__name__}: {e}); write one with "
                                "`offbatch plan --hardware h200 --json` as an example") from None
        hw.check()
        return replace(hw, source=source) if source else hw

    def check(self) -> None:
        """Types and ranges of every field, or one PlanFileError naming the field."""
        for name in ("name", "device", "gpu_name", "pcie", "source"):
            if not isinstance(getattr(self, name), str):
                raise PlanFileError(f"a hardware profile's {name} is a string, not {getattr(self, name)!r}")
        if self.device not in ("cuda", "cpu"):
            raise PlanFileError(f"a hardware profile's device is cuda or cpu, not {self.device!r}")
        if not self.gemm_flop_s:
            raise PlanFileError("a hardware profile needs gemm_flop_s points (GEMM FLOP/s by rows)")
        rates = {"h2d_pinned_bytes_s": self.h2d_pinned_bytes_s, "h2d_pageable_bytes_s": self.h2d_pageable_bytes_s,
                 "d2h_bytes_s": self.d2h_bytes_s, "mem_bytes_s": self.mem_bytes_s, "scatter_elems_s": self.scatter_elems_s,
                 **{f"gemm_flop_s[{m}]": r for m, r in self.gemm_flop_s.items()},
                 **{f"host.{k}": getattr(self.host, k) for k in ("cpu_attn_bytes_s", "cpu_attn_contended_bytes_s",
                                                                "disk_read_bytes_s", "cpu_ffn_bytes_s")}}
        for name, value in rates.items():
            if not _number(value) or not 0 < value < 1e18:
                raise PlanFileError(f"a hardware profile's {name} is a rate above 0, not {value!r}")
        for name in ("seq_s", "step_s", "prefill_token_s", "launch_s", "sync_s", "attn_call_s",
                     "kv_fetch_range_s"):
            value = getattr(self.host, name)
            if not _number(value) or not 0 <= value < 3600:
                raise PlanFileError(f"a hardware profile's host.{name} is seconds from 0, not {value!r}")
        for name, value in (("gpu_memory_bytes", self.gpu_memory_bytes), ("host.memory_bytes", self.host.memory_bytes),
                            ("host.threads", self.host.threads)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_BYTES:
                raise PlanFileError(f"a hardware profile's {name} is a whole number above 0, not {value!r}")
        if not _number(self.cpu_attn_noise) or not 0 <= self.cpu_attn_noise <= 1:
            raise PlanFileError(f"a hardware profile's cpu_attn_noise is a fraction from 0 to 1, not {self.cpu_attn_noise!r}")
        if any(m < 1 or m > 1 << 24 for m in self.gemm_flop_s):
            raise PlanFileError("a hardware profile's gemm_flop_s rows are 1 to 16777216")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole_key(key) -> int:
    """A gemm_flop_s key ("1024" in JSON): a whole number of rows."""
    if isinstance(key, bool) or not isinstance(key, (str, int)) or not str(key).isdigit():
        raise ValueError(f"gemm_flop_s row count {key!r}")
    return int(key)


def _gemm_curve(peak: float, mem_bytes_s: float) -> dict[int, float]:
    """GEMM rate by M from a peak and a memory bandwidth: a bf16 weight of K x N is 2KN bytes and
    2MKN FLOPs, so at small M the product is bound by reading it (M x bandwidth FLOP/s)."""
    return {m: 1.0 / (1.0 / (0.9 * peak) + 1.0 / (m * 0.8 * mem_bytes_s)) for m in (16, 64, 256, 1024, 4096)}


def _consumer(name, gpu, mem_gib, pcie, link_gb_s, peak_tflops, mem_gb_s, host: Host) -> Hardware:
    return Hardware(
        name=name, device="cuda", gpu_name=gpu, gpu_memory_bytes=int(mem_gib * GiB), pcie=pcie,
        h2d_pinned_bytes_s=0.8 * link_gb_s * 1e9, h2d_pageable_bytes_s=0.45 * link_gb_s * 1e9,
        d2h_bytes_s=0.8 * link_gb_s * 1e9, gemm_flop_s=_gemm_curve(peak_tflops * 1e12, mem_gb_s * 1e9),
        mem_bytes_s=0.75 * mem_gb_s * 1e9, host=host, scatter_elems_s=4.5e11 * mem_gb_s / 4800,
    )


DESKTOP_8C = Host(threads=16, memory_bytes=32 * GiB, cpu_attn_bytes_s=14e9, cpu_attn_contended_bytes_s=7e9,
                  disk_read_bytes_s=3e9)
DESKTOP_16C = Host(threads=32, memory_bytes=64 * GiB, cpu_attn_bytes_s=25e9, cpu_attn_contended_bytes_s=12e9,
                   disk_read_bytes_s=5e9)
CLOUD_16V = Host(threads=16, memory_bytes=64 * GiB, cpu_attn_bytes_s=14e9, cpu_attn_contended_bytes_s=7e9,
                 disk_read_bytes_s=1e9)

PROFILES: dict[str, Hardware] = {
    # GeForce bf16 tensor rates are with fp32 accumulation (half the fp16-accumulate figure).
    "rtx3060-12g": _consumer("rtx3060-12g", "NVIDIA GeForce RTX 3060", 12, "4.0 x16", 31.5, 25.6, 360, DESKTOP_8C),
    "rtx4060ti-16g": _consumer("rtx4060ti-16g", "NVIDIA GeForce RTX 4060 Ti 16GB", 16, "4.0 x8", 15.75, 44.0, 288,
                               DESKTOP_8C),
    "rtx4090": _consumer("rtx4090", "NVIDIA GeForce RTX 4090", 24, "4.0 x16", 31.5, 165.0, 1008, DESKTOP_16C),
    "l4": _consumer("l4", "NVIDIA L4", 22.5, "4.0 x16", 31.5, 121.0, 300, CLOUD_16V),
    "a10": _consumer("a10", "NVIDIA A10", 22.5, "4.0 x16", 31.5, 125.0, 600, CLOUD_16V),
    # Measured (benchmarks/2026-11-28): pinned copy 54.7 GB/s; GEMM [M x 4096] x [4096 x 14336] bf16,
    # the mean of the two runs. CPU attention (16 threads): the engine's host-KV decode steps at 71f97a5
    # imply ~24 GB/s beside the copies (the probe there measured ~26; a bare prototype saw 11).
    "h200": Hardware(
        name="h200", device="cuda", gpu_name="NVIDIA H200", gpu_memory_bytes=139 * GiB, pcie="5.0 x16",
        h2d_pinned_bytes_s=54.7e9, h2d_pageable_bytes_s=20e9, d2h_bytes_s=54.0e9,
        gemm_flop_s={16: 33.7e12, 64: 127.9e12, 256: 435.5e12, 1024: 664.0e12},
        mem_bytes_s=3.6e12,
        host=Host(threads=16, memory_bytes=128 * GiB, cpu_attn_bytes_s=28e9, cpu_attn_contended_bytes_s=24e9,
                  disk_read_bytes_s=2e9),
    ),
    # The engine with the CPU as compute device (CI): "copies" are host memcpys, GEMMs on the cores.
    "cpu": Hardware(
        name="cpu", device="cpu", gpu_name="cpu", gpu_memory_bytes=16 * GiB, pcie="",
        h2d_pinned_bytes_s=8e9, h2d_pageable_bytes_s=8e9, d2h_bytes_s=8e9,
        gemm_flop_s={16: 20e9, 64: 50e9, 256: 80e9, 1024: 100e9}, mem_bytes_s=10e9, scatter_elems_s=0.5e9,
        # Python and per-op costs of torch on the CPU: rough (the CPU engine is the correctness path).
        host=Host(threads=2, memory_bytes=16 * GiB, cpu_attn_bytes_s=5e9, cpu_attn_contended_bytes_s=5e9,
                  disk_read_bytes_s=1e9, seq_s=2e-4, step_s=5e-3, launch_s=3e-5, sync_s=0.0),
    ),
}


def load_hardware(name_or_file: str) -> Hardware:
    """A built-in profile by name, or a JSON file (as `offbatch plan --json` prints under "hardware")."""
    if name_or_file in PROFILES:
        return PROFILES[name_or_file]
    path = Path(name_or_file).expanduser()
    if not path.is_file():
        raise OffbatchError(f"unknown hardware {name_or_file!r}: give a profile name ({', '.join(PROFILES)}) "
                            "or a JSON file")
    try:
        if path.stat().st_size > 1 << 20:
            raise PlanFileError(f"the hardware file {path} is larger than a profile can be (1 MiB)")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # unreadable, not UTF-8 or not JSON, nested too deep
        raise PlanFileError(f"cannot read the hardware file {path}: {type(e).__name__}: {str(e)[:200]}") from None
    if isinstance(data, dict) and "hardware" in data and isinstance(data["hardware"], dict):
        data = data["hardware"]  # a whole `plan --json` report
    return Hardware.from_dict(data, source=str(path))
