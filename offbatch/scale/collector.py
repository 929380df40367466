"""The collector: one small actor on the driver's host between the workers and the driver.

A driver cannot be called by actors, and Ray Data hands back a shard's result only when the whole shard is
done; a worker that died mid-shard would take every output it had finished with it. So workers send their
finished outputs here as they come (worker.Outbox), and the driver takes them from here every fraction of
a second and writes them out. The collector also
- knows which sequences are finished (their keys), so a retried shard skips them: a worker that died loses
  only what it had not sent;
- passes the shards from the driver to the workers: a worker's task names only its shard's number, and
  waits here until the driver publishes that shard's requests (the pool starts, and loads the model,
  before the driver has built the requests: see generator.ClusterGenerator);
- passes events to the driver: a worker ready (with its plan), a worker failed, a shard resumed.

Outputs travel as the worker's pickled bytes: this actor never unpickles them, so it imports nothing of
the engine.
"""

from __future__ import annotations

import asyncio


class Collector:
    def __init__(self):
        self._pending: list[bytes] = []  # pickled lists of GenOutputs, not yet taken by the driver
        self._events: list[tuple] = []  # (kind, worker id, payload), not yet taken
        self._stats: dict[str, dict] = {}  # worker id -> its latest counters (GenStats as a dict)
        self._done: set[int] = set()  # keys of every sequence whose output arrived
        self._shards: dict[int, list] = {}  # shard -> [ObjectRef of its requests]
        self._published: dict[int, asyncio.Event] = {}
        self._wake = asyncio.Event()

    def _event_for(self, shard: int) -> asyncio.Event:
        return self._published.setdefault(shard, asyncio.Event())

    # ---- workers ------------------------------------------------------------------------------------
    async def event(self, kind: str, worker: str, payload) -> None:
        """'ready' (payload: what the worker says of itself), 'failed' (the pickled exception and its
        words), 'resumed' (a shard retried: how much of it was already done)."""
        self._events.append((kind, worker, payload))
        self._wake.set()

    async def shard(self, shard: int) -> list:
        """[ObjectRef of the shard's requests], once the driver has published it."""
        await self._event_for(shard).wait()
        return self._shards[shard]

    async def done_among(self, keys: list[int]) -> list[int]:
        return [k for k in keys if k in self._done]

    async def put(self, worker: str, keys: list[int], outputs: bytes | None, stats: dict) -> None:
        if outputs is not None:
            self._done.update(keys)
            self._pending.append(outputs)
        self._stats[worker] = stats
        self._wake.set()

    # ---- the driver ---------------------------------------------------------------------------------
    async def publish(self, shard: int, ref_box: list) -> None:
        self._shards[shard] = ref_box
        self._event_for(shard).set()

    async def take(self, timeout: float) -> tuple[list[bytes], list[tuple], dict[str, dict]]:
        """(outputs, events, every worker's counters) since the last take; waits up to `timeout` seconds
        for something to arrive."""
        if not self._pending and not self._events:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        outputs, events = self._pending, self._events
        self._pending, self._events = [], []
        return outputs, events, dict(self._stats)
