"""The GPUs of one host that split an engine's weight stream (`run --split-stream N`).

Each of the group's processes runs its own streaming engine over its own share of the job's sequences
(its own wave and KV), but the weight bytes of every streamed module cross PCIe only once for the whole
group: rank r copies chunk r of the module's bytes from its host memory over its own link into its
device slot, and an all-gather over the GPUs' interconnect (NVLink) fills in the other chunks. With W
GPUs each link carries 1/W of the weights a step, so a job bound by the weight stream runs up to W
times as fast, where data parallelism (one engine per GPU, `--workers`) would stream the whole model
over every link for a share of the wave.

The ranks therefore step in lockstep: every rank acquires the same modules in the same order every
step. This file holds what they agree on:
  - `gather`: the weight chunks (NCCL between GPUs; gloo on CPU processes, where CI runs it);
  - `any_work`: whether any rank still has a sequence (a rank with none runs idle steps: it streams and
    gathers its chunks for the others, computing nothing).
Control messages go through a gloo group of their own, so a host-blocking control call never waits
behind a weight gather in flight.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.distributed as dist

# Chunk boundaries on this many bytes: every chunk of a module starts aligned for the copy engines and
# NCCL (a module's bytes hold several tensors; the chunks cut through them, the all-gather restores them).
CHUNK_ALIGN = 512


class ShardGroup:
    def __init__(self, rank: int, world: int, device: torch.device, weights_group=None, control_group=None):
        self.rank, self.world = rank, world
        self.device = torch.device(device)
        self.weights_group = weights_group  # NCCL between GPUs, gloo between CPU processes
        self.control_group = control_group  # gloo: host-side agreement
        self.cuda = self.device.type == "cuda"
        self.gather_stream = torch.cuda.Stream(self.device) if self.cuda else None

    @classmethod
    def connect(cls, rank: int, world: int, device, init_method: str) -> "ShardGroup":
        """Join the group (every rank calls this with the same init_method, e.g. tcp://127.0.0.1:PORT or
        file://PATH): the default process group carries the weights, a gloo group the control."""
        device = torch.device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        # No NVLink SHARP (multicast): an all-gather of a few GPUs gains little from it, its buffers take GPU
        # memory outside the caching allocator (beyond what --gpu-memory accounts for), and on shared hosts
        # multicast objects have put GPUs out of service. The user's own setting wins.
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, **kwargs)
        control = dist.new_group(backend="gloo")
        return cls(rank, world, device, dist.group.WORLD, control)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- the weight stream -----------------------------------------------------------------------
    def chunk(self, n: int) -> int:
        """Bytes of each rank's chunk of an n-byte module (the last ranks' chunks may be partly padding)."""
        return CHUNK_ALIGN * math.ceil(n / self.world / CHUNK_ALIGN)

    def padded(self, n: int) -> int:
        """Bytes a device slot needs for an n-byte module: every rank's chunk, padding included."""
        return self.chunk(n) * self.world

    def own_range(self, n: int) -> tuple[int, int]:
        """The bytes [lo, hi) of an n-byte module this rank copies over its link (hi <= lo: none)."""
        c = self.chunk(n)
        lo = self.rank * c
        return lo, min(n, lo + c)

    def gather(self, buf: torch.Tensor, n: int):
        """Fill buf[:padded(n)] from every rank's chunk (this rank's is in place). Asynchronous: on a GPU
        it is queued after the work already on the current stream, and the current stream waits for it;
        on CPU processes it returns the gloo work to wait for. (A group of one rank still makes the call
        when it was connected: the GPU tests run the NCCL path that way on one GPU.)"""
        if self.weights_group is None:
            return None
        c = self.chunk(n)
        out = buf[: c * self.world]
        mine = out[self.rank * c : (self.rank + 1) * c]
        with warnings.catch_warnings():  # torch 2.13 renames it; 2.11 (the GPU image) has only this name
            warnings.simplefilter("ignore", FutureWarning)
            work = dist.all_gather_into_tensor(out, mine, group=self.weights_group, async_op=not self.cuda)
        return None if self.cuda else work

    # ---- control -----------------------------------------------------------------------------------
    def any_work(self, mine: bool) -> bool:
        """Whether any rank has a sequence to run (every rank calls it once per step)."""
        if self.world == 1:
            return mine
        flag = torch.tensor([1 if mine else 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control_group)
        return bool(flag.item())
