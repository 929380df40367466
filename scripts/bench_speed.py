"""Speed checks that used to be test assertions (a loaded CI machine failed them: tests assert values,
never wall-clock times). Prints each figure beside the bound the old test held it to.

    python scripts/bench_speed.py            # both
    python scripts/bench_speed.py planner    # a 64-layer model's plans (old bound: under 1 s each)
    python scripts/bench_speed.py synth      # `offbatch synth` write rate (old bound: over 50 MB/s)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from offbatch.models.spec import spec_from_config  # noqa: E402
from offbatch.tools.synth import synth_config, write_model  # noqa: E402
from offbatch.planner.solve import make_plan  # noqa: E402
from offbatch.planner.workload import Workload  # noqa: E402

GiB = 1 << 30
JOBS = [Workload.uniform(1024, 256, 64), Workload.uniform(100, 1000, 300), Workload.uniform(5000, 64, 512)]


def planner() -> None:
    spec = spec_from_config(synth_config("llama-3-70b", layers=64))
    make_plan(spec_from_config(synth_config("llama-3-8b", layers=2)), torch.bfloat16, "cuda", 8 * GiB, JOBS[0],
              hardware="h200")  # imports and caches warm
    for wl in JOBS:
        t = time.perf_counter()
        plan = make_plan(spec, torch.bfloat16, "cuda", 24 * GiB, wl, hardware="h200", cpu_memory=120 * GiB)
        seconds = time.perf_counter() - t
        print(f"planner: llama-3-70b x64 layers, 24 GiB on h200, {wl.num_requests} x {wl.prompt_len:.0f} + "
              f"{wl.gen_len:.0f}: {seconds:.2f} s (old bound 1 s); wave {plan.wave_size}, {plan.attention}")


def synth() -> None:
    cfg = synth_config("llama", hidden_size=1024, intermediate_size=4096, layers=3, heads=8, kv_heads=8,
                       vocab_size=32000, dtype="bfloat16")
    with tempfile.TemporaryDirectory() as folder:
        t = time.perf_counter()
        result = write_model(cfg, Path(folder), shard_size=100_000_000)
        seconds = time.perf_counter() - t
    print(f"synth: {result.weight_bytes / 1e6:.0f} MB in {seconds:.2f} s = {result.weight_bytes / seconds / 1e6:.0f} MB/s "
          "(old bound 50 MB/s)")


if __name__ == "__main__":
    which = sys.argv[1:] or ["planner", "synth"]
    for name in which:
        {"planner": planner, "synth": synth}[name]()
