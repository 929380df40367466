"""One engine over several GPUs of one host that split the weight stream (`run --split-stream N`).

The planner plans once, for one rank: a share of the job's sequences, of the host's memory, and a
weight stream of which each link carries 1/N (offload/shard_group.py). N processes (one per GPU; on
the CPU, where CI runs it, N processes with gloo) each build a streaming engine over that one plan and
their rank of the group, and run the requests dealt to them (request i goes to rank i mod N). The ranks
step in lockstep; outputs come back to the caller as each rank finishes them, so the jobs layer writes,
resumes and reports exactly as with one engine.

A rank that fails ends the job with its error (the others are stopped): the group cannot go on without
one of its ranks, and nothing a finished request wrote is lost (the jobs layer flushed it).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import socket
import tempfile
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path

from offbatch.engine.api import GenOutput, GenRequest, GenStats
from offbatch.errors import OffbatchError

POLL_S = 0.5  # how often the caller looks whether a rank died while it waits for outputs
STOP_WAIT_S = 3.0  # after a rank failed: how long the others get to end before they are killed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device: str, rank: int) -> str:
    """Rank r's device: the r-th visible GPU (each rank one), or the CPU."""
    return f"cuda:{rank}" if device.startswith("cuda") else "cpu"


def _rank_main(rank: int, world: int, init_method: str, model_dir: str, device: str, plan_dict: dict,
               build: dict, threads: int | None, inbox, outbox) -> None:
    """A rank's process: join the group, build the engine over the one plan, run what the caller sends."""
    engine = group = None
    try:
        import torch

        from offbatch.engine.build import engine_for_folder
        from offbatch.jobs.stops import make_stop_check
        from offbatch.models.tokenizer import load_tokenizer
        from offbatch.offload.shard_group import ShardGroup
        from offbatch.plan import Plan

        if threads:
            torch.set_num_threads(threads)
        dev = rank_device(device, rank)
        if dev.startswith("cuda"):
            torch.cuda.set_device(torch.device(dev))
        group = ShardGroup.connect(rank, world, dev, init_method)
        plan = dataclasses.replace(Plan.from_dict(plan_dict), device=dev)
        tokenizer = load_tokenizer(model_dir)
        if build.pop("kv_balance", False):
            from offbatch.attention.key_balance import key_scales_for_folder

            build["key_scales"] = key_scales_for_folder(model_dir)
        engine = engine_for_folder(model_dir, device=dev, plan=plan, group=group,
                                   eos_token_ids=tokenizer.eos_token_ids, **build)
        outbox.put(("ready", rank, {**engine.startup, "host_weight_bytes": engine.store.host_bytes(),
                                    "model_bytes": engine.store.total_bytes}))
        while True:
            job = inbox.get()
            if job is None:
                break
            feed = (GenRequest(key=key, prompt_ids=list(ids), params=params,
                               stop_check=make_stop_check(tokenizer, stops, params, skip), stops=stops,
                               skip_special_tokens=skip)
                    for key, ids, params, stops, skip in job)
            for out in engine.generate(feed):
                outbox.put(("out", rank, out))
            stats = engine.stats
            outbox.put(("done", rank, {"prompt_tokens": stats.prompt_tokens,
                                       "generated_tokens": stats.generated_tokens,
                                       "peak_gpu_reserved_bytes": stats.peak_gpu_reserved_bytes,
                                       "idle_steps": engine.idle_steps}))
    except BaseException as e:  # noqa: BLE001 - every failure goes to the caller, with its words
        outbox.put(("error", rank, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if engine is not None:
            engine.close()
        if group is not None:
            group.close()


class SplitStreamGenerator:
    """A Generator (engine/api.py) over `world` rank processes that split one weight stream."""

    def __init__(self, model_dir: str | Path, plan, world: int, device: str, build: dict | None = None,
                 threads: int | None = None):
        import torch.multiprocessing as mp

        if world < 2:
            raise OffbatchError("--split-stream needs at least 2 GPUs to split the weight stream over")
        if plan.dense_ffn == "hybrid":
            raise OffbatchError("--split-stream runs dense FFN layers; drop --ffn hybrid")
        if plan.disk:
            raise OffbatchError(f"--split-stream streams every weight from host memory; the plan leaves "
                                f"{len(plan.disk)} modules on the disk tier (give it more --cpu-memory)")
        if device.startswith("cuda"):
            import torch

            if torch.cuda.device_count() < world:
                raise OffbatchError(f"--split-stream {world}: {torch.cuda.device_count()} GPU(s) visible")
        self.plan, self.world = plan, world
        self.busy = False  # a job dealt to the ranks and not finished: closing then cannot wait for them
        self.stats = GenStats()
        self.startup: dict = {}
        ctx = mp.get_context("spawn")
        if device.startswith("cuda"):
            init = f"tcp://127.0.0.1:{_free_port()}"
        else:  # gloo over a rendezvous file: no port to race for on a shared CI machine
            fd, self._rendezvous = tempfile.mkstemp(prefix="offbatch-split-")
            os.close(fd)
            os.unlink(self._rendezvous)
            init = f"file://{self._rendezvous}"
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(world)]
        self.procs = [ctx.Process(target=_rank_main, name=f"offbatch-rank{r}", daemon=True,
                                  args=(r, world, init, str(model_dir), device, plan.to_dict(), dict(build or {}),
                                        threads, self.inboxes[r], self.outbox))
                      for r in range(world)]
        for p in self.procs:
            p.start()
        self.rank_stats: list[dict] = [{} for _ in range(world)]
        self.rank_startup: list[dict] = [{} for _ in range(world)]
        ready = 0
        while ready < world:
            kind, rank, payload = self._next()
            if kind == "ready":
                ready += 1
                self.rank_startup[rank] = payload
                self.startup = self.startup or payload
            else:
                raise OffbatchError(f"split stream: rank {rank} sent {kind} before it was ready")

    def _next(self):
        """The next message of any rank; a rank's error, or a rank that died without one, ends the job."""
        while True:
            try:
                kind, rank, payload = self.outbox.get(timeout=POLL_S)
            except queue.Empty:
                dead = [p for p in self.procs if p.exitcode is not None and p.exitcode != 0]
                if dead:
                    self.close(wait_s=STOP_WAIT_S)
                    raise OffbatchError(f"split stream: rank process {dead[0].name} died (exit code {dead[0].exitcode})")
                continue
            if kind == "error":
                self.close(wait_s=STOP_WAIT_S)  # the others wait in a collective for it: they will not end alone
                raise OffbatchError(f"split stream: rank {rank} failed: {payload}")
            return kind, rank, payload

    def generate(self, requests: Iterable[GenRequest]) -> Iterator[GenOutput]:
        jobs: list[list] = [[] for _ in range(self.world)]
        for i, r in enumerate(requests):
            jobs[i % self.world].append((r.key, list(r.prompt_ids), r.params, tuple(r.stops), r.skip_special_tokens))
        for inbox, job in zip(self.inboxes, jobs):
            inbox.put(job)
        self.busy = True
        done = 0
        while done < self.world:
            kind, rank, payload = self._next()
            if kind == "out":
                self.stats.prompt_tokens += payload.prompt_tokens
                self.stats.generated_tokens += len(payload.token_ids)
                yield payload
            elif kind == "done":
                done += 1
                self.rank_stats[rank] = payload
        self.busy = False
        self.stats.peak_gpu_reserved_bytes = max(s.get("peak_gpu_reserved_bytes", 0) for s in self.rank_stats)

    def close(self, wait_s: float = 30.0) -> None:
        """End the ranks: each finishes when it reads the end of its inbox; ranks in the middle of a job
        (the run stopped, a rank failed) would not read it, so they get only a moment before they are killed."""
        if self.busy:
            wait_s = min(wait_s, STOP_WAIT_S)
        for inbox in self.inboxes:
            try:
                inbox.put(None)
            except Exception:  # noqa: BLE001 - a closed queue: the rank is gone already
                pass
        for p in self.procs:
            p.join(timeout=wait_s)
            if p.is_alive():
                p.kill()
                p.join()
        rendezvous = getattr(self, "_rendezvous", None)
        if rendezvous and os.path.exists(rendezvous):
            os.unlink(rendezvous)


def rank_workload(whole, world: int):
    """One rank's job (a Workload) for the planner: its share of the whole job's requests (dealt round robin:
    at most ceil(N / world)), the job's mean lengths, and the job's longest context (any rank may get the
    longest request)."""
    import math

    return dataclasses.replace(whole, num_requests=math.ceil(whole.num_requests / world))


def host_share(cpu_memory: int | None, world: int, memory_bytes: int | None = None) -> int:
    """Each rank's host budget: its share of --cpu-memory, else of the default share of the host's memory
    (memory_bytes: a hardware profile's; None: this machine's). Every rank holds its share of the weights
    and its sequences' host KV."""
    from offbatch.planner.probe import host_memory_bytes
    from offbatch.planner.solve import HOST_SHARE

    if cpu_memory is None:
        cpu_memory = int(HOST_SHARE * (memory_bytes if memory_bytes is not None else host_memory_bytes()))
    return cpu_memory // world


def make_split_generator(model_dir, tokenizer, options, device: str, plan, pinned: dict) -> SplitStreamGenerator:
    """`run --split-stream N`: plan once for one rank (unless a plan is pinned), then start the ranks."""
    import torch

    from offbatch.engine.build import engine_for_folder
    from offbatch.planner.workload import Workload

    world = options.split_stream
    if plan is None:
        workload = None
        if options.prompt_lens:
            workload = rank_workload(Workload.from_lengths(options.prompt_lens, options.gen_lens), world)
        rank0 = rank_device(device, 0)
        plan = engine_for_folder(model_dir, device=rank0, dtype=options.dtype, gpu_memory=options.gpu_memory,
                                 cpu_memory=host_share(options.cpu_memory, world), workload=workload,
                                 num_requests=workload.num_requests if workload else 64,
                                 max_len=workload.max_len if workload else 2048, weights=options.weights,
                                 split_stream=world, plan_only=True, **pinned)
    else:
        plan = dataclasses.replace(plan, split_stream=world)
    build = {"dtype": options.dtype, "gpu_memory": options.gpu_memory, "kv_balance": options.kv_balance}
    # The host's threads (or a Ray worker's share of them) shared by the ranks' host work.
    return SplitStreamGenerator(model_dir, plan, world, device, build, threads=max(1, torch.get_num_threads() // world))
