"""The Ray cluster a scaled run uses: connected to (`--ray ADDRESS`) or started here (`--workers N`), how
many workers it gets and what each one asks Ray for."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
from dataclasses import dataclass

from offbatch.errors import OffbatchError

START_HINT = "start one with `ray start --head`, which prints its address; or give --workers N alone for one here"
# Ray's object store only carries the job's requests and results here (kilobytes a request), never weights.
OBJECT_STORE_BYTES = 2 * 2**30


@dataclass
class Workers:
    """What the pool is made of: how many workers, GPU or CPU ones, and each one's Ray resources."""

    count: int
    gpu: bool
    cpus: float  # Ray CPUs each worker asks for (GPU workers: 1; CPU workers: a fraction)
    threads: int | None  # torch threads of a CPU worker (None: a GPU worker keeps torch's default)
    gpus_each: int = 1  # GPUs of one worker (--split-stream N: its N GPUs split one weight stream)

    def describe(self, count: int | None = None) -> str:
        each = "one GPU each" if self.gpu else f"{self.cpus:g} CPU and {self.threads} thread(s) each"
        if self.gpu and self.gpus_each > 1:
            each = f"{self.gpus_each} GPUs each, splitting its weight stream"
        return f"{self.count if count is None else count} {'GPU' if self.gpu else 'CPU'} worker(s) ({each})"


class Cluster:
    """`with Cluster(address, workers, device) as c:` connects (or starts a local cluster) and disconnects
    (or stops it) at the end. A process that is already connected (ray.init was called, as in tests) is
    used as it is and left connected."""

    def __init__(self, address: str | None, workers: int | None, device: str | None, notify=None, split: int = 1):
        if workers is not None and workers < 1:
            raise OffbatchError("--workers needs at least 1")
        self.split = max(1, split)  # GPUs per worker (--split-stream)
        if device is not None and device not in ("cpu", "cuda"):
            raise OffbatchError(f"--device {device}: with --ray or --workers each worker computes on its own GPU; "
                                "give --device cuda or cpu")
        self.address, self.asked, self.device = address, workers, device
        self.started = False  # this run connected or started Ray, so it disconnects at the end
        self.notify = notify  # where Ray's messages to the driver go (a worker died, ...): the run's log
        self._restore = None
        self.muted = False  # set while the run stops its workers itself: Ray's news of their end is none

    def connect(self) -> Workers:
        import ray

        if self.address is not None:
            _check_reachable(self.address)
        if not ray.is_initialized():
            # The run's own lines say what happens; the workers' output and Ray's notices stay out of the way
            # (stdout may be the results: -o -). Ray's C++ side logs errors that are not ours to the driver's
            # stderr (Ray Data's every actor pool: "constructor arguments in the object store and max_restarts
            # > 0"); the level set here (RAY_BACKEND_LOG_LEVEL set by the user wins) is announced on stderr
            # as ray.init starts, which is silenced (a failure is raised, and said, all the same).
            os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
            quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
            try:
                with _stderr_silenced():
                    if self.address is None:
                        ray.init(include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES, **quiet)
                    else:
                        ray.init(address=self.address, **quiet)
            except Exception as e:  # noqa: BLE001 - Ray raises many kinds (ConnectionError, RuntimeError, ...)
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray cluster"
                raise OffbatchError(f"cannot connect to {where}: {' '.join(str(e).split())[:300]} ({START_HINT})") from None
            self.started = True
        _quiet_ray_data()
        if self.notify is not None and self._restore is None:
            self._restore = _route_ray_messages(lambda text: None if self.muted else self.notify(text))
        return self.plan_workers(ray.cluster_resources(), [n for n in ray.nodes() if n.get("Alive")])

    def plan_workers(self, resources: dict, nodes: list[dict]) -> Workers:
        gpus = int(resources.get("GPU", 0))
        cpus = float(resources.get("CPU", 0))
        gpu = self.device != "cpu" and gpus >= 1
        if self.device == "cuda" and not gpu:
            raise OffbatchError("--device cuda: the Ray cluster has no GPU")
        if gpu:
            each = self.split
            count = self.asked or gpus // each
            if count < 1 or count * each > gpus:
                takes = "one" if each == 1 else f"{each} (--split-stream {each})"
                raise OffbatchError(f"--workers {max(count, 1)}: the Ray cluster has {gpus} GPU(s), and each worker "
                                    f"takes {takes}")
            return Workers(count, True, 1.0 if cpus >= count else 0.0, None, each)
        count = self.asked or max(1, len(nodes))
        # Fractions of a CPU: Ray Data's own tasks and the collector need a share, else a 2-CPU machine with
        # two 1-CPU workers never schedules them. A worker never asks for more than its largest host has.
        largest = max((float(n.get("Resources", {}).get("CPU", 0)) for n in nodes), default=cpus)
        share = (cpus - min(1.0, cpus / 4)) / count
        share = min(share, largest - min(1.0, largest / 4))
        share = math.floor(share * 100) / 100
        if share < 0.1:
            raise OffbatchError(f"--workers {count}: the Ray cluster has {cpus:g} CPU(s), too few for {count} CPU "
                                "workers; give fewer")
        return Workers(count, False, share, max(1, int(share)))

    def close(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None
        if self.started:
            import ray

            ray.shutdown()
            self.started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT that nothing answers on is one error at once (Ray itself retries for minutes)."""
    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise OffbatchError(f"cannot connect to the Ray cluster at {address}: {getattr(e, 'strerror', None) or e} "
                            f"({START_HINT})") from None


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null for a moment (nothing of offbatch's prints meanwhile: the progress
    display has not started); the processes ray.init starts keep theirs there."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _route_ray_messages(notify):
    """Ray prints the messages its processes send the driver ("A worker died or was killed ...", "... will be
    retried") to stdout, where a run's results may go (-o -). They go to the run's log instead, first line
    each. (ray._private.worker looks print_to_stdstream up at every message; pinned ray[data]==2.60.0.)
    Returns the function that puts Ray's own back."""
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream

    def to_log(data, ignore_prefix=False):
        for line in data.get("lines", []):
            text = " ".join(str(line).strip().splitlines()[:1])
            if text:
                notify(f"ray ({data.get('pid')}): {text[:300]}")

    ray_worker.print_to_stdstream = to_log

    def restore():
        ray_worker.print_to_stdstream = original

    return restore


def _quiet_ray_data() -> None:
    """Ray Data's progress bars and execution logs would mix with the job's own progress on stderr."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    for attr in ("print_on_execution_start", "verbose_stats_logs"):
        if hasattr(ctx, attr):
            setattr(ctx, attr, False)
    for name in ("ray.data", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)
