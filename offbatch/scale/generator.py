"""The driver's side of a scaled run: a Generator (engine/api.py) whose engines are Ray actors.

jobs/runner.py runs a scaled job exactly as a plain one (resume, records, error records, progress, signals,
exit statuses); only the generator it is handed differs. Construction (inside the runner's timed model
load, before the output file is touched) connects to Ray, starts the Ray Data pipeline over the shards'
numbers and waits until every worker has loaded the model and made its plan: a bad folder or an impossible
budget is one clear error there, with the output left as it was. generate() then cuts the requests into
shards, publishes them to the collector, and yields every output the workers send, each exactly once.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
import warnings
from dataclasses import asdict

from offbatch.engine.api import GenStats
from offbatch.errors import OffbatchError
from offbatch.jobs.progress import startup_words
from offbatch.scale.cluster import Cluster, Workers
from offbatch.scale.shards import ShardPlan, host_share

POLL_S = 0.1  # the driver takes finished outputs from the collector this often (at most)
# A worker process that dies (killed, out of memory, a crash) is started again and its shard retried this
# often; a shard that kills every worker it meets fails the run instead of looping.
MAX_RESTARTS = 3
STOP_WAIT_S = 30.0
WAIT_NOTICE_S = 120.0


class WorkerError(OffbatchError):
    """A worker failed with an error that did not survive the trip as itself."""


# Ray's words for a worker process that is gone (killed, out of memory, its machine lost).
WORKER_LOST = ("ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError", "OutOfMemoryError",
               "RayActorError")


def pipeline_error(error: BaseException) -> BaseException:
    """What the run raises for the Ray pipeline's failure: an offbatch error raised in a worker as itself;
    workers lost more often than Ray restarts them as one clear error (exit 3: the run cannot finish here,
    and every result that arrived is in the output); anything else as an internal error."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    for e in chain:
        if isinstance(e, OffbatchError):
            return e
    lost = next((e for e in chain if any(t.__name__ in WORKER_LOST for t in type(e).__mro__)), None)
    if lost is not None:
        return WorkerError(f"Ray lost a worker more often than it restarts one ({MAX_RESTARTS} times): "
                           f"{' '.join(str(lost).split())[:300]}; every result that arrived is in the output: "
                           "rerun the same command to resume")
    root = chain[-1]  # the first cause: what went wrong, not the layers that carried it
    return RuntimeError(f"the Ray pipeline failed: {type(root).__name__}: {' '.join(str(root).split())[:400]}")


class ClusterPlan:
    """What the runner logs and predicts from in place of one engine's Plan: the workers' plans together."""

    def __init__(self, plans: list[dict]):
        self.plans = plans
        rate = sum((p.get("predicted") or {}).get("e2e_tok_s", 0.0) for p in plans)
        self.predicted = {"e2e_tok_s": rate} if rate else {}

    def summary(self) -> str:
        rate = self.predicted.get("e2e_tok_s")
        together = f"; predicted {rate:,.0f} tok/s end to end together" if rate else ""
        return f"plan: {len(self.plans)} workers, each its own plan (above){together}"

    def describe(self) -> dict:
        return {"workers": self.plans, "predicted": self.predicted}


class ClusterGenerator:
    def __init__(self, cluster: Cluster, model_dir, tokenizer, options, progress):
        import ray

        self.cluster, self.progress = cluster, progress
        self.plan = None  # a ClusterPlan once every worker has made its plan (streaming engines)
        self.stats = GenStats()
        self._handles: list = []  # the workers' actor handles, to stop them if the run stops early
        self._ready: dict[str, dict] = {}
        self._worker_stats: dict[str, dict] = {}
        self._thread = None
        self._thread_error: BaseException | None = None
        self._finished = threading.Event()
        self._complete = False
        self._published: set[int] = set()
        self.collector = None
        try:
            workers = cluster.connect()
            prompt_lens, gen_lens = options.prompt_lens or [], options.gen_lens or []
            self.shards = ShardPlan(len(prompt_lens), workers.count)
            self.collector = self._start_collector(ray)
            self._start_pipeline(ray, str(model_dir), options, workers, prompt_lens, gen_lens)
            self._await_workers()
        except BaseException:
            self.close()
            raise

    # ---- starting -----------------------------------------------------------------------------------
    @staticmethod
    def _start_collector(ray):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from offbatch.scale.collector import Collector

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        return ray.remote(num_cpus=0)(Collector).options(scheduling_strategy=here).remote()

    def _start_pipeline(self, ray, model_dir: str, options, workers: Workers, prompt_lens, gen_lens) -> None:
        plan = self.shards
        lens = plan.worker_lengths(prompt_lens, gen_lens)
        worker_options = {**asdict(options), "prompt_lens": lens[0], "gen_lens": lens[1], "device": None}
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        share = host_share(plan.pool_size, max((n["Resources"].get("GPU", 0) for n in nodes), default=0) / workers.gpus_each,
                           max((n["Resources"].get("CPU", 0) for n in nodes), default=1), workers.cpus, workers.gpu)
        self.workers = workers
        self.progress.info(f"ray: {workers.describe(plan.pool_size)}, {plan.shards} shard(s) of about "
                           f"{plan.sequences // max(plan.shards, 1)} sequences; each worker loads the model",
                           workers=plan.pool_size, shards=plan.shards, gpu=workers.gpu)
        resources = {"num_gpus": workers.gpus_each} if workers.gpu else {}
        ds = ray.data.from_items([{"shard": s} for s in range(plan.shards)], override_num_blocks=plan.shards)
        with warnings.catch_warnings():
            # Ray 2.60 names max_restarts / max_task_retries deprecated (to go in 2.64, with infinite retries the
            # only behaviour); the pinned version takes them, and a bound is what keeps a shard that kills every
            # worker from looping.
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = self._map(ds, workers, plan, model_dir, worker_options, share, resources)
        self._thread = threading.Thread(target=self._drive, args=(ds,), name="offbatch-ray-data", daemon=True)
        self._thread.start()

    def _map(self, ds, workers: Workers, plan, model_dir: str, worker_options: dict, share: int, resources: dict):
        from ray.data import ActorPoolStrategy

        from offbatch.scale.worker import EngineWorker

        return ds.map_batches(
            EngineWorker, batch_size=1, batch_format="numpy",
            fn_constructor_kwargs={"model_dir": model_dir, "options": worker_options, "collector": self.collector,
                                   "gpu": workers.gpu, "threads": workers.threads, "host_share": share},
            # One shard at a time per worker: a second one queued behind a busy worker would wait there while
            # another worker idles.
            compute=ActorPoolStrategy(size=plan.pool_size, max_tasks_in_flight_per_actor=1),
            num_cpus=workers.cpus, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS, **resources)

    def _drive(self, ds) -> None:
        """Pulls the pipeline (Ray Data runs only while its output is consumed); a shard's row comes back
        once its outputs are all with the collector."""
        try:
            for _ in ds.iter_batches(batch_size=None, batch_format="numpy"):
                pass
        except BaseException as e:  # noqa: BLE001 - raised again in the driver's own thread
            self._thread_error = e
        finally:
            self._finished.set()

    def _await_workers(self) -> None:
        started, told = time.monotonic(), False
        while len(self._ready) < self.shards.pool_size:
            self._poll(wait=0.5)
            self._raise_if_broken()
            if not told and time.monotonic() - started > WAIT_NOTICE_S:  # a large model loads for minutes
                told = True
                self.progress.warn(f"{len(self._ready)} of {self.shards.pool_size} workers have loaded the model "
                                   f"after {WAIT_NOTICE_S:.0f} s; if the cluster lacks free GPUs or CPUs for them, "
                                   "`ray status` shows it")
        plans = [info.get("plan_fields") for info in self._ready.values()]
        if plans and all(plans):  # streaming engines: the job's prediction, for the log and the first ETA
            self.plan = ClusterPlan(plans)
        names = sorted({info["device"] for info in self._ready.values()})
        what = "cpu" if not self.workers.gpu else ", ".join(names)
        self.progress.device = f"{what}: {len(self._ready)} Ray worker(s)" if not self.workers.gpu else \
            f"{len(self._ready)} Ray worker(s) on {what}"

    # ---- running ------------------------------------------------------------------------------------
    def generate(self, requests):
        import ray

        requests = list(requests)  # the runner's feed: every sequence of the job (fewer after a signal)
        signal_probe = requests[0].stop_check if requests else None
        shards: list[list] = [[] for _ in range(self.shards.shards)]
        for r in requests:
            shards[self.shards.shard_of(r.key)].append(
                (r.key, r.prompt_ids, r.params, tuple(r.stops), r.skip_special_tokens))
        for number, payload in enumerate(shards):
            self._publish(number, payload)
        expected = {r.key for r in requests}
        seen: set[int] = set()
        while len(seen) < len(expected):
            # Read before the poll: a worker sends every output it finished before its task ends, failed or
            # not, so once the pipeline has ended this poll takes the last of them.
            finished = self._finished.is_set()
            for output in self._poll(wait=0.0 if finished else POLL_S):
                if output.key in expected and output.key not in seen:  # a retried shard's repeat never passes
                    seen.add(output.key)
                    yield output
            if signal_probe is not None:
                # The runner's stop_check raises its StopRun once a signal asked the run to stop: that is how
                # a generator learns it (no token is checked here).
                signal_probe([])
            if finished:
                self._raise_if_broken()
                if len(seen) < len(expected):
                    raise RuntimeError(f"the Ray pipeline finished with {len(expected) - len(seen)} sequence(s) "
                                       "never sent back")
        self._complete = True  # the workers are returning their last shards: close() lets them

    def _publish(self, shard: int, payload: list) -> None:
        import ray

        self._published.add(shard)
        self.collector.publish.remote(shard, [ray.put(payload)])

    def _poll(self, wait: float) -> list:
        """Take what the collector has (waiting up to `wait` s for something): handle events and counters,
        return the outputs."""
        import ray

        blobs, events, stats = ray.get(self.collector.take.remote(wait))
        for kind, worker, payload in events:
            self._on_event(kind, worker, payload)
        self._worker_stats.update(stats)
        live = list(self._worker_stats.values())
        self.stats.prompt_tokens = sum(s["prompt_tokens"] for s in live)
        self.stats.generated_tokens = sum(s["generated_tokens"] for s in live)
        self.stats.peak_gpu_reserved_bytes = max((s["peak_gpu_bytes"] for s in live), default=0)
        return [output for blob in blobs for output in pickle.loads(blob)]

    def _on_event(self, kind: str, worker: str, payload) -> None:
        if kind == "started":
            self._handles.append(payload["actor"])
        elif kind == "failed":
            blob, words = payload["error"], payload["words"]
            error = None
            if blob is not None:
                try:
                    error = pickle.loads(blob)
                except Exception:  # noqa: BLE001 - its words are enough
                    error = None
            if isinstance(error, OffbatchError):
                raise type(error)(f"worker {worker}: {error}") from None
            raise WorkerError(f"worker {worker} failed to load the model: {words}")
        elif kind == "ready":
            self._ready[worker] = payload
            n = len(self._ready)
            plan = f"; {payload['plan']}" if payload.get("plan") else ""
            again = " (restarted)" if n > self.shards.pool_size else ""
            parts = startup_words(payload.get("startup") or {})
            self.progress.info(f"worker {n}{again}: {payload['host']} pid {payload['pid']}, {payload['device']}: "
                               f"model loaded in {payload['load_s']:.1f}s{f' ({parts})' if parts else ''}{plan}", worker=worker,
                               load_s=round(payload["load_s"], 2), planned_for=payload["planned_for"],
                               plan=payload.get("plan_fields"))
        elif kind == "resumed":
            self.progress.warn(f"shard {payload['shard']} restarted on worker {worker} (the worker that ran it "
                               f"stopped): {payload['done']} of its {payload['total']} sequences were finished "
                               "and are kept; the rest are redone")

    def _raise_if_broken(self) -> None:
        error = self._thread_error
        if error is not None:
            self._thread_error = None
            raise pipeline_error(error) from None

    # ---- stopping -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the workers if the pipeline is still running (the run stopped early), then disconnect."""
        import ray

        try:
            if self._thread is not None and self._complete:
                self._thread.join(STOP_WAIT_S)
            if self._thread is not None and not self._finished.is_set():
                # Stopped early (a signal, an error): the pipeline's complaints about the workers it loses
                # are no news.
                data_log = logging.getLogger("ray.data")
                level, self.cluster.muted = data_log.level, True
                data_log.setLevel(logging.CRITICAL)
                if self.collector is not None:
                    for shard in range(self.shards.shards):  # a worker that starts now finds nothing to do
                        if shard not in self._published:
                            self._publish(shard, [])
                    _, events, _ = ray.get(self.collector.take.remote(0.0))  # workers not heard of yet
                    self._handles += [p["actor"] for kind, _, p in events if kind == "started"]
                for handle in self._handles:
                    if handle is not None:
                        try:
                            ray.kill(handle, no_restart=True)
                        except Exception:  # noqa: BLE001 - already gone
                            pass
                self._thread.join(STOP_WAIT_S)
                data_log.setLevel(level)
            if self.collector is not None:
                try:
                    ray.kill(self.collector)
                except Exception:  # noqa: BLE001
                    pass
                self.collector = None
        finally:
            self.cluster.close()
