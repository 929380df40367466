"""A step's module weights from the prefetcher: what the forward and the FFN backends acquire and
release, with the compute stream's waits for copies timed when asked (the benchmark's weight_wait)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from offbatch.models.catalogue import ModuleKey
from offbatch.offload.prefetch import Prefetcher
from offbatch.offload.weights import WeightStore


class StreamedModules:
    def __init__(self, store: WeightStore, pf: Prefetcher, device: torch.device, timing: bool):
        self.store, self.pf, self.device = store, pf, device
        self.timing = timing  # CUDA events around each streamed acquire
        self.wait_events: list = []  # this step's (before, after) pairs
        self._norms: dict[ModuleKey, dict[str, torch.Tensor]] = {}

    def acquire(self, key: ModuleKey) -> Mapping[str, torch.Tensor]:
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
        self.pf.unschedule(set(keys))

    def norms(self, key: ModuleKey) -> Mapping[str, torch.Tensor]:
        # Post-norm needs a module's norm after the module was released: keep a device copy of the
        # (tiny) norm tensors per layer.
        cache = self._norms
        if key not in cache:
            host = self.store.host_views(key)
            cache[key] = {k: t.to(self.device) for k, t in host.items() if "norm" in k}
        return cache[key]

    def wait_s(self) -> float:
        """Device time this step's compute stream waited for copies (synchronises on the events)."""
        return sum(a.elapsed_time(b) for a, b in self.wait_events) / 1000
