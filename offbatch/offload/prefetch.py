"""Streaming modules into device slots ahead of use, on a copy stream, ordered by events.

The engine tells the prefetcher the order in which it will use modules (`schedule`). Copies are
issued in that order into rings of device slots, one ring per module kind. A copy into a slot waits
(on the device, through an event, never on the host) for the compute that last read the slot; the
compute waits for the copy's event. So the host never blocks in the layer loop; the copy stream runs
as far ahead as there are free slots.

Each ring is one device buffer [count, slot_bytes] whose rows are the slots, and the resident modules
of one kind in one layer share one buffer the same way (a "bank"). Modules of a kind have one layout up
to their names, so a bank seen through that layout is a strided stack of each weight over its rows:
the grouped expert kernels take a chunk of experts as one [rows, N, K] tensor and a row per group.

Modules of the disk tier (offload/disk.py) are read ahead by a reader thread into pinned staging
buffers and copied from there. Their copies are issued in the same order as the others; when the one at
the head of the queue is not read yet, issuing stops there, and only `acquire` of a module behind it
waits (on the host) for the read: then the disk is the bottleneck and there is nothing better to do.

On the CPU (compute device "cpu") the same code runs with plain synchronous copies, so CI exercises
the scheduling, slot reuse and views.

With a shard group (offload/shard_group.py: `run --split-stream N`) each copy moves only this rank's
chunk of the module over the link, and an all-gather (on a stream of its own, behind the copy) fills in
the other ranks' chunks; the slot is ready when the gather is. Every rank issues the same copies in the
same order (the ranks' schedules are the same), so the gathers pair up.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from offbatch.formats import ModuleWeights
from offbatch.models.catalogue import ModuleKey, module_kind
from offbatch.offload.disk import DiskReader, read_module_now
from offbatch.offload.weights import WeightStore


@dataclass
class Slot:
    buf: torch.Tensor  # row `index` of its ring's bank
    index: int = 0
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
                 resident: set[ModuleKey], staging: int = 2, group=None):
        self.store = store
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.group = group  # a ShardGroup: this rank copies its chunk of each module (the store has no disk tier then)
        # Resident modules: copied once, never evicted; those of one kind in one layer (a layer's
        # resident experts) as the rows of one bank.
        self.resident: dict[ModuleKey, ModuleWeights] = {}
        self.resident_rows: dict[ModuleKey, tuple[torch.Tensor, int]] = {}
        groups: dict[tuple[int, str], list[ModuleKey]] = {}
        for key in sorted(resident):
            groups.setdefault((key[0], module_kind(key[1])), []).append(key)
        for members in groups.values():
            if group is not None:  # each rank holds its share in host memory: gathered once, here
                bank = torch.empty(len(members), group.padded(max(store.nbytes(k) for k in members)),
                                   dtype=torch.uint8, device=self.device)
                for row, key in enumerate(members):
                    self._gather_resident(key, bank[row])
            elif len(members) == 1:
                bank = self._host_bytes(members[0]).to(self.device).unsqueeze(0)  # on the CPU: the host buffer itself
            else:
                bank = torch.empty(len(members), max(store.nbytes(k) for k in members), dtype=torch.uint8,
                                   device=self.device)
                for row, key in enumerate(members):
                    bank[row, : store.nbytes(key)].copy_(self._host_bytes(key))
            for row, key in enumerate(members):
                self.resident[key] = self._weights(key, bank[row])
                self.resident_rows[key] = (bank, row)
        # Slot rings, each slot as large as the largest module of its kind.
        self.banks: dict[str, torch.Tensor] = {}
        self.rings: dict[str, list[Slot]] = {}
        self.next_slot: dict[str, int] = {}
        for kind, count in slots_per_kind.items():
            size = max((store.nbytes(k) for k in store.keys() if module_kind(k[1]) == kind and k not in resident), default=0)
            if size == 0 or count == 0:
                continue
            if group is not None:  # room for every rank's chunk, padding included
                size = group.padded(size)
            bank = torch.empty(count, size, dtype=torch.uint8, device=self.device)
            self.banks[kind] = bank
            self.rings[kind] = [Slot(bank[j], j) for j in range(count)]
            self.next_slot[kind] = 0
        self.queue: deque[ModuleKey] = deque()
        self.in_slot: dict[ModuleKey, Slot] = {}
        self.stats = PrefetchStats()
        self._step_bytes = 0
        # Disk-tier modules that stream (resident ones were read once, above).
        self.disk = {k for k in getattr(store, "disk", {}) if k not in self.resident}
        self.reader = None
        if self.disk:
            self.reader = DiskReader(store, staging, pin=self.cuda)

    def _weights(self, key: ModuleKey, buf: torch.Tensor) -> ModuleWeights:
        """A module's weights over the device bytes holding it, as its format computes with them."""
        return self.store.format.weights(self.store.layouts[key].views(buf))

    def _gather_resident(self, key: ModuleKey, row: torch.Tensor) -> None:
        """A resident module of a split stream into its bank row: this rank's share copied, the rest gathered."""
        n = self.store.nbytes(key)
        lo, hi = self.group.own_range(n)
        if hi > lo:
            row[lo:hi].copy_(self.store.host_share(key, lo, hi))
        work = self.group.gather(row, n)
        if work is not None:
            work.wait()

    def _host_bytes(self, key: ModuleKey) -> torch.Tensor:
        if key in getattr(self.store, "disk", {}):
            return read_module_now(self.store, key)
        return self.store.host[key]

    def close(self) -> None:
        """Stop the disk reader (if any); the engine calls this when it is done."""
        if self.reader is not None:
            self.reader.close()

    # ---- planning --------------------------------------------------------
    def is_resident(self, key: ModuleKey) -> bool:
        return key in self.resident

    def schedule(self, keys: list[ModuleKey]) -> None:
        """Append modules in the order they will be acquired; resident ones are skipped."""
        keys = [k for k in keys if k not in self.resident]
        self.queue.extend(keys)
        if self.reader is not None:
            self.reader.request([k for k in keys if k in self.disk])
        self.pump()

    def unschedule(self, keys: set[ModuleKey]) -> None:
        """Drop modules that turned out not to be needed (experts no token was routed to). Ones already
        copied stay in their slot until acquired-and-released or evicted."""
        if self.reader is not None:
            for k in self.queue:
                if k in keys and k in self.disk:
                    self.reader.cancel(k)
        self.queue = deque(k for k in self.queue if k not in keys)
        for k in keys:
            slot = self.in_slot.get(k)
            if slot is not None and slot.busy:
                self.stats.wasted_bytes += self.store.nbytes(k)
                self._release_slot(slot)

    def pump(self, until: ModuleKey | None = None) -> None:
        """Issue copies for queued modules while the head's ring has a free slot (in order: the copy
        stream executes in issue order, so issuing out of order could stall a needed copy). A disk
        module not read yet stops the issuing, unless `until` is behind it: then wait for the read."""
        while self.queue:
            key = self.queue[0]
            if key in self.in_slot and self.in_slot[key].busy:
                self.queue.popleft()  # already there (scheduled twice)
                if key in self.disk:
                    self.reader.cancel(key)
                continue
            kind = module_kind(key[1])
            ring, start = self.rings[kind], self.next_slot[kind]
            # The first free slot in ring order from the last fill: usually the next one, but unused
            # experts (unschedule) free slots out of order, and a grouped chunk holds several slots
            # at once while it waits for the next expert.
            idx = next((j % len(ring) for j in range(start, start + len(ring)) if not ring[j % len(ring)].busy), None)
            if idx is None:
                return
            staged = None
            if key in self.disk:
                wait = until is not None and not self._issued(until)
                staged = self.reader.take(key, block=wait)
                if staged is None:
                    return
            self.queue.popleft()
            self.next_slot[kind] = (idx + 1) % len(ring)
            self._copy_into(ring[idx], key, staged)

    def _issued(self, key: ModuleKey) -> bool:
        slot = self.in_slot.get(key)
        return slot is not None and slot.busy

    def _copy_into(self, slot: Slot, key: ModuleKey, staged: tuple[int, torch.Tensor] | None = None) -> None:
        if slot.key is not None and self.in_slot.get(slot.key) is slot:
            del self.in_slot[slot.key]  # (a later copy of the same module may sit in another slot)
        n = self.store.nbytes(key)
        lo, hi = (0, n) if self.group is None else self.group.own_range(n)
        if staged is not None:
            src = staged[1][lo:hi]
        else:  # a rank's store holds only its share of the module
            src = self.store.host[key] if self.group is None else self.store.host_share(key, lo, hi)
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                if slot.free is not None:
                    self.copy_stream.wait_event(slot.free)
                if hi > lo:
                    slot.buf[lo:hi].copy_(src, non_blocking=True)
                slot.ready = torch.cuda.Event()
                slot.ready.record(self.copy_stream)
            if self.group is not None:
                stream = self.group.gather_stream
                with torch.cuda.stream(stream):
                    stream.wait_event(slot.ready)
                    self.group.gather(slot.buf, n)
                    slot.ready = torch.cuda.Event()
                    slot.ready.record(stream)
        else:
            if hi > lo:
                slot.buf[lo:hi].copy_(src)
            slot.ready = self.group.gather(slot.buf, n) if self.group is not None else None
        if staged is not None:  # the staging buffer may be refilled once this copy has run
            self.reader.give_back(staged[0], slot.ready if self.cuda else None)
        slot.key, slot.busy = key, True
        self.in_slot[key] = slot
        self.stats.bytes_copied += max(0, hi - lo)
        self.stats.copies += 1
        self._step_bytes += max(0, hi - lo)

    # ---- use -------------------------------------------------------------
    def acquire(self, key: ModuleKey) -> ModuleWeights:
        """A module's weights on the device; the current stream waits for its copy."""
        if key in self.resident:
            return self.resident[key]
        self.pump(until=key if self.reader is not None else None)
        slot = self._issued_slot(key)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        return self._weights(key, slot.buf)

    def _issued_slot(self, key: ModuleKey) -> Slot:
        slot = self.in_slot.get(key)
        if slot is None or not slot.busy:
            raise RuntimeError(f"module {key} acquired before it was scheduled (or its ring is too small)")
        if not self.cuda and slot.ready is not None:  # a CPU rank's gather
            slot.ready.wait()
            slot.ready = None
        return slot

    def pass_over(self, key: ModuleKey) -> None:
        """A split stream's module this rank does not compute with this step (the others do): its chunk is
        copied and gathered like any other, and its slot is refilled once the gather is done."""
        if key in self.resident:
            return
        self.pump(until=key if self.reader is not None else None)
        slot = self._issued_slot(key)
        slot.free = slot.ready if self.cuda else None  # no compute reads it: the gather's end frees it
        slot.busy = False
        self.pump()

    def row_of(self, key: ModuleKey) -> tuple[torch.Tensor, int]:
        """(bank, row): the byte buffer [rows, row_bytes] that holds an acquired or resident module as
        one of its rows. Read other rows only for modules acquired and not yet released."""
        if key in self.resident_rows:
            return self.resident_rows[key]
        slot = self.in_slot.get(key)
        if slot is None or not slot.busy:
            raise RuntimeError(f"module {key} is neither resident nor held in a slot")
        return self.banks[module_kind(key[1])], slot.index

    def bank_of(self, key: ModuleKey) -> torch.Tensor | None:
        """The bank a module will be read from: its resident bank, or its kind's ring (None: neither)."""
        if key in self.resident_rows:
            return self.resident_rows[key][0]
        return self.banks.get(module_kind(key[1]))

    def ring_size(self, kind: str) -> int:
        return len(self.rings.get(kind, ()))

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
        slots = sum(bank.numel() for bank in self.banks.values())
        resident = sum(bank.numel() for bank in {id(b): b for b, _ in self.resident_rows.values()}.values())
        return slots + resident
