"""The shard plan: which worker-sized slices a job's sequences are cut into, and what each worker plans for.

A shard is what one worker runs in one engine.generate() call: its sequences share waves, so a shard must
be large. A streaming engine's decode step costs about the same for a wave of 64 as for one of 1024 (it
streams the same weights), and a shard smaller than the wave the worker planned leaves that wave part
empty. So a job is cut into one shard per worker, and into more only when a shard would pass
MAX_SHARD_SEQUENCES (then a worker runs several one after another, and a faster worker takes more of them).
Sequences go to shards round robin, so every shard sees the same mix of prompt lengths as the job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Four of the planner's largest waves (planner.solve.MAX_WAVE): a shard's last wave, draining, is a small
# share of it, and a retried shard (its worker died) redoes at most this many sequences' worth of planning.
MAX_SHARD_SEQUENCES = 16384


@dataclass(frozen=True)
class ShardPlan:
    sequences: int  # GenRequests in the job (a request with n > 1 is n sequences)
    workers: int

    @property
    def shards(self) -> int:
        if self.sequences <= 0:
            return 0
        per_worker = math.ceil(self.sequences / (self.workers * MAX_SHARD_SEQUENCES))
        return min(self.sequences, self.workers * per_worker)

    @property
    def pool_size(self) -> int:
        """Workers worth starting: never more than there are shards."""
        return max(1, min(self.workers, self.shards))

    def shard_of(self, index: int) -> int:
        """The shard of the job's index-th sequence (the GenRequest key the runner gives it)."""
        return index % self.shards

    def members(self, shard: int) -> range:
        return range(shard, self.sequences, self.shards)

    def worker_lengths(self, prompt_lens: list[int], gen_lens: list[int]) -> tuple[list[int], list[int]]:
        """The workload each worker plans for: the largest shard's lengths, with the job's longest prompt
        and longest context in it, so every worker's plan fits every shard it may be given."""
        idx = list(self.members(0))
        longest_prompt = max(range(len(prompt_lens)), key=lambda i: prompt_lens[i])
        longest_context = max(range(len(prompt_lens)), key=lambda i: prompt_lens[i] + gen_lens[i])
        missing = [i for i in dict.fromkeys((longest_prompt, longest_context)) if i not in idx]
        if missing:  # in place of the shard's last ones (its size stays), or added to a shard of one
            idx = (idx[: len(idx) - len(missing)] if len(idx) > len(missing) else idx) + missing
        return [prompt_lens[i] for i in idx], [gen_lens[i] for i in idx]


def host_share(workers: int, node_gpus: float, node_cpus: float, worker_cpus: float, gpu: bool) -> int:
    """How many workers share one host's memory: one per GPU there (GPU workers), else as many as its
    CPUs hold at each worker's fraction; never more than the job has."""
    if gpu:
        fit = int(node_gpus) if node_gpus >= 1 else 1
    else:
        fit = int(node_cpus // worker_cpus) if worker_cpus > 0 else 1
    return max(1, min(workers, fit))
