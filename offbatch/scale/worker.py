"""An engine worker: the class Ray Data's actor pool runs, one per GPU (or share of CPUs).

Each loads the model folder and plans for its own device and host share with the ordinary engine
(engine/select.make_generator: the streaming engine on a GPU, the reference one on the CPU), then runs
whole shards: their requests in one generate() call, so they share waves. A finished output goes to the
collector at once (Outbox), not with the shard's end, so a worker that dies mid-shard loses only what it
had not finished. Ray restarts a dead worker and retries its shard; the retry skips what the collector
already has.
"""

from __future__ import annotations

import os
import pickle
import socket
import threading
import time

SEND_EVERY_S = 0.05  # finished outputs wait at most this long in a worker
STATS_EVERY_S = 1.0  # live token counts, for the driver's rates, while nothing finishes


def _exception_payload(e: BaseException) -> tuple[bytes | None, str]:
    """(the pickled exception, when it pickles, and its words): the driver raises it again as itself, so a
    worker's BudgetError is the same one clear error (exit 3) as a plain run's."""
    words = f"{type(e).__name__}: {' '.join(str(e).split())}"
    try:
        return pickle.dumps(e), words
    except Exception:  # noqa: BLE001 - an exception holding something unpicklable still has its words
        return None, words


class Outbox:
    """Finished outputs on their way to the collector, sent from a thread of their own every
    SEND_EVERY_S, so the engine never waits on a remote call; close() sends the rest and waits until the
    collector has everything."""

    def __init__(self, collector, worker: str, stats):
        self.collector, self.worker, self.stats = collector, worker, stats
        self._outputs: list = []
        self._lock = threading.Lock()
        self._sent: list = []  # ObjectRefs of the puts, awaited at close
        self._last_stats = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="offbatch-outbox", daemon=True)
        self._thread.start()

    def add(self, output) -> None:
        with self._lock:
            self._outputs.append(output)

    def _send(self, force_stats: bool = False) -> None:
        with self._lock:
            outputs, self._outputs = self._outputs, []
        now = time.monotonic()
        if not outputs and not force_stats and now - self._last_stats < STATS_EVERY_S:
            return
        self._last_stats = now
        blob = pickle.dumps(outputs) if outputs else None
        self._sent.append(self.collector.put.remote(self.worker, [o.key for o in outputs], blob, self.stats()))

    def _loop(self) -> None:
        while not self._stop.wait(SEND_EVERY_S):
            self._send()

    def close(self) -> None:
        import ray

        self._stop.set()
        self._thread.join()
        self._send(force_stats=True)
        ray.get(self._sent)


class EngineWorker:
    def __init__(self, model_dir: str, options: dict, collector, gpu: bool, threads: int | None, host_share: int):
        import ray

        self.collector = collector
        self.worker = f"{socket.gethostname()}:{os.getpid()}"  # a restarted worker is a new process: a new id
        self.generator = self.tokenizer = None
        self.failed = False
        actor = ray.get_runtime_context().current_actor
        # First of all, so that the driver can stop this worker whatever happens to it next.
        ray.get(collector.event.remote("started", self.worker, {"actor": actor}))
        try:
            info = self._load(model_dir, options, gpu, threads, host_share)
        except Exception as e:  # noqa: BLE001 - every failure goes to the driver as it is
            # Reported, not raised: Ray would start the worker again and again on a failure that repeats.
            self.failed = True
            blob, words = _exception_payload(e)
            ray.get(collector.event.remote("failed", self.worker, {"error": blob, "words": words}))
            return
        ray.get(collector.event.remote("ready", self.worker, info))

    def _load(self, model_dir: str, options: dict, gpu: bool, threads: int | None, host_share: int) -> dict:
        import torch

        from offbatch.engine.select import EngineOptions, make_generator
        from offbatch.jobs.progress import describe_device
        from offbatch.models.tokenizer import load_tokenizer

        if threads is None:
            # A GPU worker's host side (sampling, host KV, CPU attention where planned) gets its host share of
            # the cores torch would take in a plain run: Ray sets OMP_NUM_THREADS to the worker's 1 CPU.
            import psutil

            threads = max(1, (psutil.cpu_count(logical=False) or os.cpu_count() or 1) // host_share)
        torch.set_num_threads(threads)
        opts = EngineOptions(**options)
        opts.device = "cuda" if gpu else "cpu"
        if opts.cpu_memory is None and host_share > 1:  # the host's memory is shared by its workers
            from offbatch.planner.probe import host_memory_bytes
            from offbatch.planner.solve import HOST_SHARE

            opts.cpu_memory = int(HOST_SHARE * host_memory_bytes() / host_share)
        t0 = time.monotonic()
        self.tokenizer = load_tokenizer(model_dir)
        self.generator = make_generator(model_dir, self.tokenizer, opts)
        plan = getattr(self.generator, "plan", None)
        return {"host": socket.gethostname(), "pid": os.getpid(), "load_s": time.monotonic() - t0,
                "startup": dict(getattr(self.generator, "startup", None) or {}),
                "planned_for": len(opts.prompt_lens or []),  # sequences: a shard's, not the job's
                "device": describe_device("cuda" if gpu else "cpu"),
                "plan": plan.summary() if plan is not None else None,
                "plan_fields": plan.describe() if plan is not None else None}

    def _stats(self) -> dict:
        stats = self.generator.stats
        peak = getattr(stats, "peak_gpu_reserved_bytes", 0) or 0
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                peak = max(peak, torch.cuda.max_memory_reserved())
        except Exception:  # noqa: BLE001 - a counter is not worth failing a shard for
            pass
        return {"prompt_tokens": stats.prompt_tokens, "generated_tokens": stats.generated_tokens,
                "peak_gpu_bytes": peak}

    def __call__(self, batch: dict) -> dict:
        if self.failed:
            raise RuntimeError(f"worker {self.worker} failed to load the model (the driver reports why)")
        shards = [int(s) for s in batch["shard"]]
        ran, skipped = [], []
        for shard in shards:
            r, s = self._run_shard(shard)
            ran.append(r)
            skipped.append(s)
        return {"shard": shards, "ran": ran, "skipped": skipped}

    def _run_shard(self, shard: int) -> tuple[int, int]:
        import ray

        from offbatch.engine.api import GenRequest
        from offbatch.jobs.stops import make_stop_check

        (ref,) = ray.get(self.collector.shard.remote(shard))
        requests = ray.get(ref)  # [(key, prompt ids, SamplingParams, stop strings, skip_special_tokens)]
        done = set(ray.get(self.collector.done_among.remote([r[0] for r in requests])))
        if done:  # a retry: the worker that ran this shard before died
            ray.get(self.collector.event.remote("resumed", self.worker,
                                                {"shard": shard, "done": len(done), "total": len(requests)}))
        todo = [r for r in requests if r[0] not in done]
        feed = (GenRequest(key=key, prompt_ids=list(ids), params=params,
                           stop_check=make_stop_check(self.tokenizer, stops, params, skip),
                           stops=stops, skip_special_tokens=skip)
                for key, ids, params, stops, skip in todo)
        outbox = Outbox(self.collector, self.worker, self._stats)
        try:
            for output in self.generator.generate(feed):
                outbox.add(output)
        finally:
            outbox.close()
        return len(todo), len(done)
