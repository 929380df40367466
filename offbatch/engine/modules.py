"""A step's module weights from the prefetcher: what the forward and the FFN backends acquire and
release, with the compute stream's waits for copies timed when asked (the benchmark's weight_wait).

In a split weight stream (offload/shard_group.py) every rank must issue the same copies and gathers in
the same order, so a MoE layer's unrouted experts do not leave the schedule there: they are passed over
(fetched, gathered, not computed with) in their place in the order, just before the next module this
rank acquires. (Dropping only the experts no rank routed to would need the ranks to agree before either
issued them: one rank's copy stream may already have, and its gather would then pair with another.)"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from offbatch.models.catalogue import ModuleKey
from offbatch.offload.prefetch import Prefetcher
from offbatch.offload.weights import WeightStore


class StreamedModules:
    def __init__(self, store: WeightStore, pf: Prefetcher, device: torch.device, timing: bool):
        self.store, self.pf, self.device = store, pf, device
        self.group = pf.group  # a ShardGroup, or None
        self.timing = timing  # CUDA events around each streamed acquire
        self.wait_events: list = []  # this step's (before, after) pairs
        self._norms: dict[ModuleKey, dict[str, torch.Tensor]] = {}
        self._position: dict[ModuleKey, int] = {}  # the step's order (split streams: where to pass over)
        self._passing: list[ModuleKey] = []  # modules other ranks use and this one passes over, in order

    def schedule(self, order: list[ModuleKey]) -> None:
        """The step's modules, in the order they will be acquired."""
        if self.group is not None:
            self._position = {k: i for i, k in enumerate(order)}
        self.pf.schedule(order)

    def pass_until(self, key: ModuleKey | None) -> None:
        """Pass over the modules to pass that come before `key` in the step's order (None: all of them)."""
        if not self._passing:
            return
        at = self._position[key] if key is not None else len(self._position)
        while self._passing and self._position[self._passing[0]] < at:
            self.pf.pass_over(self._passing.pop(0))

    def acquire(self, key: ModuleKey) -> Mapping[str, torch.Tensor]:
        self.pass_until(key)
        if not self.timing or self.pf.is_resident(key):
            return self.pf.acquire(key)
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record()
        w = self.pf.acquire(key)
        after.record()
        self.wait_events.append((before, after))
        return w

    def release(self, key: ModuleKey) -> None:
        self.pf.release(key)

    def skip(self, keys: Iterable[ModuleKey]) -> None:
        """Modules of this step that will not be used (a MoE layer's experts no token was routed to)."""
        if self.group is None:
            self.pf.unschedule(set(keys))
            return
        self._passing = sorted(set(self._passing) | set(keys), key=self._position.__getitem__)

    def norms(self, key: ModuleKey) -> Mapping[str, torch.Tensor]:
        # Post-norm needs a module's norm after the module was released: keep a device copy of the
        # (tiny) norm tensors per layer.
        cache = self._norms
        if key not in cache:
            cache[key] = {k: t.to(self.device) for k, t in self.store.norms(key).items()}
        return cache[key]

    def wait_s(self) -> float:
        """Device time this step's compute stream waited for copies (synchronises on the events)."""
        return sum(a.elapsed_time(b) for a, b in self.wait_events) / 1000
