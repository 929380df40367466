"""Large page-locked (pinned) host buffers, made fast.

torch's pinned allocator (cudaHostAlloc) locked 1.8 GB/s on the H200 machine: 11 s of a 35 s model load went
to the weights' buffers and 20 s to the host KV's (scripts/bench_pinned_alloc.py). Anonymous memory whose
pages several threads fault in at once, then registered with CUDA in place (cudaHostRegister), locked 9 GB/s
there, and copies from it ran at the same 55 GB/s. It also takes exactly the bytes asked for (the allocator
rounds each block up to a power of two).

The registration lives as long as the memory: the tensor holds the mapping (torch.frombuffer keeps its
buffer), and the mapping unregisters itself when the last tensor over it is gone, before it is unmapped.
OFFBATCH_PIN_REGISTER=0 takes torch's allocator again (A/B).
"""

from __future__ import annotations

import mmap
import os
from concurrent.futures import ThreadPoolExecutor

import torch

TOUCH_THREADS = max(1, min(16, os.cpu_count() or 1))
TOUCH_CHUNK = 64 << 20  # bytes a thread faults in per task


def registering() -> bool:
    return os.environ.get("OFFBATCH_PIN_REGISTER", "1") != "0"


class _LockedMapping(mmap.mmap):
    """Anonymous memory, registered with CUDA (ptr) until it is collected."""

    ptr = 0

    def __del__(self):
        if self.ptr:
            try:
                torch.cuda.cudart().cudaHostUnregister(self.ptr)
            except Exception:  # noqa: BLE001 - at interpreter exit CUDA may be gone; the process frees it all
                pass
            self.ptr = 0


def _register(ptr: int, nbytes: int) -> int:
    """cudaHostRegister of a host range (mapped into the device's address space); its CUDA error code."""
    return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))


def pin_in_place(t: torch.Tensor) -> bool:
    """Page-lock an existing host tensor's memory where it is, so the GPU may read it (a fresh pinned copy from
    torch's allocator would be rounded up to a power of two: a 392 MB layer would hold 512 MiB). True when this
    call registered it; the caller undoes it with unpin_in_place before the memory goes."""
    if t.is_pinned() or t.numel() == 0:
        return False
    nbytes = t.numel() * t.element_size()
    err = _register(t.data_ptr(), nbytes)
    if err != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed with CUDA error {err}")
    return True


def unpin_in_place(t: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


def pinned_zeros(nbytes: int) -> torch.Tensor:
    """A zeroed uint8 tensor of nbytes in page-locked host memory (see the module's docstring)."""
    if nbytes <= 0 or not registering():
        return torch.zeros(max(0, nbytes), dtype=torch.uint8, pin_memory=True)
    mapping = _LockedMapping(-1, nbytes)  # fresh anonymous pages read as zeros
    t = torch.frombuffer(mapping, dtype=torch.uint8)
    starts = range(0, nbytes, TOUCH_CHUNK)
    with ThreadPoolExecutor(min(TOUCH_THREADS, len(starts))) as pool:  # fault the pages in, several at once
        list(pool.map(lambda s: t[s : s + TOUCH_CHUNK].zero_(), starts))
    if _register(t.data_ptr(), nbytes) != 0:  # this driver refuses to register it: torch's allocator, as before
        del t, mapping
        return torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)
    mapping.ptr = t.data_ptr()
    return t


__all__ = ["pin_in_place", "pinned_zeros", "registering", "unpin_in_place"]
