"""Synthetic weights have no disk tier: the planner then holds every weight in host memory and gives way on
the wave instead of placing modules on a disk that is not there (issue 15: OPT-30B, 512 prompts, a 100 GiB
host budget planned 2 modules on disk, and the synthetic run failed); a model folder may still use disk."""

import pytest
import torch

from offbatch.errors import BudgetError
from offbatch.models.spec import spec_from_config
from offbatch.planner.solve import make_plan
from offbatch.planner.workload import Workload
from offbatch.tools.synth import synth_config
from offbatch.units import parse_bytes

SPEC = spec_from_config(synth_config("opt-6.7b"))  # 13.3 GB of bf16 weights, 0.5 MB of KV per token
JOB = Workload.uniform(512, 256, 32)


def plan(host: str, disk_tier: bool):
    return make_plan(SPEC, torch.bfloat16, "cuda", parse_bytes("8GiB"), JOB, hardware="h200",
                     cpu_memory=parse_bytes(host), disk_tier=disk_tier)


def test_without_a_disk_tier_every_weight_stays_in_host_memory_and_the_wave_gives_way():
    roomy, tight = plan("120GiB", False), plan("40GiB", False)
    assert not roomy.disk and not tight.disk
    assert tight.wave_size < roomy.wave_size
    assert sum(tight.host_memory.values()) <= parse_bytes("40GiB")
    assert tight.host_memory["weights"] == roomy.host_memory["weights"]  # all of them, in both


def test_a_model_folder_may_leave_weights_on_disk_under_the_same_budget():
    # At 40 GiB the folder's plan keeps some weights on disk for a larger wave (predicted faster); without a
    # disk tier the wave is smaller and every weight is pinned.
    folder, synth = plan("40GiB", True), plan("40GiB", False)
    assert folder.disk and not synth.disk and synth.wave_size < folder.wave_size
    # At 14 GiB the weights fit only with some on disk: a folder runs, synthetic weights cannot.
    assert plan("14GiB", True).disk
    with pytest.raises(BudgetError, match="synthetic weights have no disk tier"):
        plan("14GiB", False)


def test_bench_on_synthetic_weights_plans_without_disk(monkeypatch):
    from offbatch.engine import build

    seen = {}
    real = build.make_plan

    def spy(*args, **kwargs):
        seen["disk_tier"] = kwargs.get("disk_tier")
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "make_plan", spy)
    from offbatch.offload.weights import SynthSource

    source = SynthSource(spec_from_config(synth_config("llama")))
    eng = build.build_engine(source, device="cpu", dtype="float32", num_requests=2, max_len=16)
    eng.close()
    assert seen["disk_tier"] is False and not eng.plan.disk
