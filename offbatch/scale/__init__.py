"""Scale-out: one `offbatch run` job over many GPUs and hosts, on Ray Data (`--workers N`, `--ray ADDRESS`).

What runs where:
- the driver (the `offbatch run` process) does everything a plain run does (jobs/runner.py, unchanged):
  reads and checks every line, writes error records, resumes from the output file, holds its lock, and is
  the only process that writes it. In place of an engine it gets a ClusterGenerator (generator.py),
  which follows the same Generator contract: GenRequests in, GenOutputs out, each as soon as it finishes;
- Ray Data carries the job to an actor pool of engine workers (worker.py): one per GPU (`num_gpus=1`), or
  CPU workers at a fraction of a CPU. Each loads the model folder itself (the same path on every host),
  plans for its own GPU and its share of its host's memory (the ordinary planner and engine), and runs the
  shards it is given (shards.py: a shard is a slice of the job's sequences, one per worker unless the job
  is very large);
- a collector actor (collector.py) on the driver's host takes each worker's finished outputs as they come
  and hands them to the driver, which turns them into records in the one output file. It also knows which
  sequences are finished, so a shard that is retried (its worker died) skips them: a worker that dies
  loses only its unfinished sequences, which are redone once, and no record is written twice.

Resume across runs is the output file's own (jobs/ledger.py): every finished result is in it, whichever
worker made it. `plan --workers N` (plan_view.py) shows each worker's plan and the job's predicted time.

Ray is an optional dependency (`pip install offbatch[ray]`): nothing here imports it at module level.
"""

from __future__ import annotations

from offbatch.errors import OffbatchError

RAY_EXTRA = "pip install 'offbatch[ray]'"


def require_ray() -> None:
    """One clear error, before anything is read or written, when Ray Data is not installed."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as e:
        raise OffbatchError(f"--ray and --workers run the job on Ray Data, which is not installed ({e}): "
                            f"{RAY_EXTRA}") from None
