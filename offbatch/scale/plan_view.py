"""`offbatch plan ... --workers N`: the plan each worker of a scaled run would make for its shards, and the
job's predicted time (the slowest worker's: its model load, then its shards one after another), against the
same job on one worker.

The workers are alike (the machine planned for, probed or --hardware): the job is cut as a run cuts it
(shards.py), and each worker plans for its largest shard and its share of its host's memory, as a worker
of a run does (worker.py).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from offbatch.planner.workload import Workload
from offbatch.scale.shards import ShardPlan


@dataclasses.dataclass
class ClusterView:
    workload: Workload  # the whole job
    workers: int
    per_host: int  # workers sharing one host's memory
    host_bytes: int  # one host's memory
    cpu_memory: int | None  # --cpu-memory: each worker's (None: its share of its host's)

    @property
    def shards(self) -> ShardPlan:
        return ShardPlan(self.workload.num_requests, self.workers)

    def worker_cpu_memory(self) -> int | None:
        if self.cpu_memory is not None or self.per_host <= 1:
            return self.cpu_memory
        from offbatch.planner.solve import HOST_SHARE

        return int(HOST_SHARE * self.host_bytes / self.per_host)

    def shard_sizes(self) -> list[int]:
        plan = self.shards
        return [len(plan.members(s)) for s in range(plan.shards)]

    def worker_shards(self) -> list[list[int]]:
        """Each worker's shard sizes, as the pool deals them out (round robin while all are alike)."""
        sizes, n = self.shard_sizes(), self.shards.pool_size
        return [sizes[w::n] for w in range(n)]

    def worker_workload(self) -> Workload:
        """What the first worker plans for (its largest shard; a run's worker plans so)."""
        return dataclasses.replace(self.workload, num_requests=max(self.shard_sizes()))

    def report(self, plan_for: Callable) -> dict:
        """plan_for(workload, cpu_memory) -> Plan. Each worker's shards and predicted time, the job's, and
        the same job on one worker."""
        cpu = self.worker_cpu_memory()
        plans = {size: plan_for(dataclasses.replace(self.workload, num_requests=size), cpu)
                 for size in sorted(set(self.shard_sizes()))}
        rows = []
        for number, sizes in enumerate(self.worker_shards(), start=1):
            load = plans[sizes[0]].predicted["load_s"]
            run = sum(plans[s].predicted["total_s"] for s in sizes)
            tokens = sum(s * self.workload.gen_len for s in sizes)
            rows.append({"worker": number, "shards": len(sizes), "sequences": sum(sizes),
                         "wave": plans[sizes[0]].wave_size, "e2e_tok_s": tokens / run if run else 0.0,
                         "load_s": load, "run_s": run, "total_s": load + run})
        one = plan_for(self.workload, self.cpu_memory)
        one_total = one.predicted["load_s"] + one.predicted["total_s"]
        slowest = max(rows, key=lambda r: r["total_s"])
        speedup_run = one.predicted["total_s"] / max(r["run_s"] for r in rows) if rows else 0.0
        return {
            "workers": self.shards.pool_size, "workers_per_host": self.per_host,
            "worker_cpu_memory": cpu, "shards": self.shards.shards, "per_worker": rows,
            "job_s": slowest["total_s"], "job_run_s": max(r["run_s"] for r in rows),
            "one_worker": {"wave": one.wave_size, "load_s": one.predicted["load_s"], "run_s": one.predicted["total_s"],
                           "total_s": one_total},
            "speedup": one_total / slowest["total_s"] if slowest["total_s"] else 0.0,
            "speedup_run": speedup_run,
            "note": small_wave_note(rows, one.wave_size, self.shards.pool_size, speedup_run),
        }


def small_wave_note(rows: list[dict], one_wave: int, workers: int, speedup_run: float) -> str | None:
    """Why a streaming job gains less than the workers' count, where that is so: each worker decodes its whole
    share as a smaller wave than one GPU runs, yet streams the whole model every decode step."""
    wave = min((r["wave"] for r in rows), default=0)
    if workers < 2 or not wave or wave >= one_wave or speedup_run >= 0.8 * workers:
        return None
    return (f"each worker decodes a wave of {wave} sequences where one GPU runs {one_wave}, and streams the whole "
            f"model every decode step for them: generation {speedup_run:.2f}x, not {workers}x. A streaming job gains "
            "more from workers where each worker's wave stays as large as one GPU's: a larger job, or a host (and "
            "its memory) per worker")


def print_cluster(cluster: dict, console) -> None:
    from rich.table import Table

    from offbatch.units import format_bytes

    cpu = cluster["worker_cpu_memory"]
    t = Table(title=f"{cluster['workers']} workers ({cluster['workers_per_host']} per host"
                    + (f", {format_bytes(cpu)} of host memory each" if cpu else "") + f"), {cluster['shards']} shard(s)")
    for col in ("worker", "shards", "sequences", "wave", "predicted tok/s", "load s", "run s", "total s"):
        t.add_column(col, justify="right")
    for r in cluster["per_worker"]:
        t.add_row(str(r["worker"]), str(r["shards"]), str(r["sequences"]), str(r["wave"]), f"{r['e2e_tok_s']:,.0f}",
                  f"{r['load_s']:.1f}", f"{r['run_s']:.1f}", f"{r['total_s']:.1f}")
    console.print(t)
    one = cluster["one_worker"]
    console.print(f"job: predicted {cluster['job_s']:.1f} s on {cluster['workers']} workers (each loads the model "
                  f"at once), against {one['total_s']:.1f} s on one (wave {one['wave']}): {cluster['speedup']:.2f}x; "
                  f"generation alone {cluster['speedup_run']:.2f}x")
    if cluster.get("note"):
        console.print(f"note: {cluster['note']}")
