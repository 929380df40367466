"""Streaming modules into device slots ahead of use, on a copy stream, ordered by events.

The engine tells the prefetcher the order in which it will use modules (`schedule`). Copies are
issued in that order into rings of device slots, one ring per module kind. A copy into a slot waits
(on the device, through an event, never on the host) for the compute that last read the slot; the
compute waits for the copy's event. So the host never blocks in the layer loop; the copy stream runs
as far ahead as there are free slots.

On the CPU (compute device "cpu") the same code runs with plain synchronous copies, so CI exercises
the scheduling, slot reuse and views.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from offbatch.offload.weights import ModuleKey, WeightStore, module_kind


@dataclass
class Slot:
    buf: torch.Tensor
    key: ModuleKey | None = None
    busy: bool = False  # holds a module that was scheduled and not yet released
    ready: object = None  # event: the copy into this slot finished
    free: object = None  # event: the compute reading this slot finished


@dataclass
class PrefetchStats:
    bytes_copied: int = 0
    copies: int = 0
    wasted_bytes: int = 0  # fetched, then not needed (speculative expert fetches)
    per_step_bytes: list[int] = field(default_factory=list)


class Prefetcher:
    def __init__(self, store: WeightStore, device: torch.device, slots_per_kind: dict[str, int],
                 resident: set[ModuleKey]):
        self.store = store
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        # Resident modules: copied once, never evicted.
        self.resident: dict[ModuleKey, dict[str, torch.Tensor]] = {}
        for key in resident:
            flat = store.host[key].to(self.device)
            self.resident[key] = store.layouts[key].views(flat)
        # Slot rings, each slot as large as the largest module of its kind.
        self.rings: dict[str, list[Slot]] = {}
        self.next_slot: dict[str, int] = {}
        for kind, count in slots_per_kind.items():
            size = max((store.nbytes(k) for k in store.keys() if module_kind(k[1]) == kind and k not in resident), default=0)
            if size == 0 or count == 0:
                continue
            self.rings[kind] = [Slot(torch.empty(size, dtype=torch.uint8, device=self.device)) for _ in range(count)]
            self.next_slot[kind] = 0
        self.queue: deque[ModuleKey] = deque()
        self.in_slot: dict[ModuleKey, Slot] = {}
        self.stats = PrefetchStats()
        self._step_bytes = 0

    # ---- planning --------------------------------------------------------
    def is_resident(self, key: ModuleKey) -> bool:
        return key in self.resident

    def schedule(self, keys: list[ModuleKey]) -> None:
        """Append modules in the order they will be acquired; resident ones are skipped."""
        self.queue.extend(k for k in keys if k not in self.resident)
        self.pump()

    def unschedule(self, keys: set[ModuleKey]) -> None:
        """Drop modules that turned out not to be needed (experts no token was routed to). Ones already
        copied stay in their slot until acquired-and-released or evicted."""
        self.queue = deque(k for k in self.queue if k not in keys)
        for k in keys:
            slot = self.in_slot.get(k)
            if slot is not None and slot.busy:
                self.stats.wasted_bytes += self.store.nbytes(k)
                self._release_slot(slot)

    def pump(self) -> None:
        """Issue copies for queued modules while the head's ring has a free slot (in order: the copy
        stream executes in issue order, so issuing out of order could stall a needed copy)."""
        while self.queue:
            key = self.queue[0]
            if key in self.in_slot and self.in_slot[key].busy:
                self.queue.popleft()  # already there (scheduled twice)
                continue
            ring = self.rings[module_kind(key[1])]
            idx = self.next_slot[module_kind(key[1])]
            slot = ring[idx]
            if slot.busy:
                return
            self.queue.popleft()
            self.next_slot[module_kind(key[1])] = (idx + 1) % len(ring)
            self._copy_into(slot, key)

    def _copy_into(self, slot: Slot, key: ModuleKey) -> None:
        if slot.key is not None and self.in_slot.get(slot.key) is slot:
            del self.in_slot[slot.key]  # (a later copy of the same module may sit in another slot)
        n = self.store.nbytes(key)
        src = self.store.host[key]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                if slot.free is not None:
                    self.copy_stream.wait_event(slot.free)
                slot.buf[:n].copy_(src, non_blocking=True)
                slot.ready = torch.cuda.Event()
                slot.ready.record(self.copy_stream)
        else:
            slot.buf[:n].copy_(src)
        slot.key, slot.busy = key, True
        self.in_slot[key] = slot
        self.stats.bytes_copied += n
        self.stats.copies += 1
        self._step_bytes += n

    # ---- use -------------------------------------------------------------
    def acquire(self, key: ModuleKey) -> dict[str, torch.Tensor]:
        """Device tensors of a module; the current stream waits for its copy."""
        if key in self.resident:
            return self.resident[key]
        self.pump()
        slot = self.in_slot.get(key)
        if slot is None or not slot.busy:
            raise RuntimeError(f"module {key} acquired before it was scheduled (or its ring is too small)")
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        return self.store.layouts[key].views(slot.buf)

    def release(self, key: ModuleKey) -> None:
        """The compute that reads this module has been issued; its slot may be refilled after it runs."""
        if key in self.resident:
            return
        self._release_slot(self.in_slot[key])
        self.pump()

    def _release_slot(self, slot: Slot) -> None:
        if self.cuda:
            slot.free = torch.cuda.Event()
            slot.free.record(torch.cuda.current_stream(self.device))
        slot.busy = False

    def end_step(self) -> int:
        n, self._step_bytes = self._step_bytes, 0
        self.stats.per_step_bytes.append(n)
        return n

    @property
    def device_bytes(self) -> int:
        slots = sum(s.buf.numel() for ring in self.rings.values() for s in ring)
        resident = sum(self.store.nbytes(k) for k in self.resident)
        return slots + resident
