"""`offbatch plan` and `offbatch bench --plan FILE` through the CLI."""

import json

import pytest
from typer.testing import CliRunner

from offbatch.cli.main import app

runner = CliRunner()


def plan_json(*args):
    r = runner.invoke(app, ["plan", *args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_plan_json_for_another_machine():
    rep = plan_json("--synth", "mixtral-8x7b", "--layers", "8", "--gpu-memory", "8GiB", "--hardware", "h200",
                    "--num-prompts", "1024", "--prompt-len", "256", "--gen-len", "64")
    pred = rep["predicted"]
    assert pred["prefill_tok_s"] > 0 and pred["decode_tok_s"] > 0 and pred["e2e_tok_s"] > 0
    assert pred["decode_tok_s"] >= 0.8 * 688.8  # at least the rules' measured plan, give or take the model
    assert rep["bottleneck"] and rep["bottleneck_kind"] in ("pcie", "gpu", "cpu-attention", "host")
    plan = rep["plan"]
    assert plan["budget_bytes"] == 8 << 30 and sum(plan["memory"].values()) <= 0.9 * (8 << 30)
    assert plan["attention"] in ("device-kv", "host-kv-gpu", "host-kv-cpu") and plan["format"] == 2
    assert rep["hardware"]["name"] == "h200" and rep["workload"]["num_requests"] == 1024


def test_plan_table_says_the_bottleneck_in_words():
    r = runner.invoke(app, ["plan", "--synth", "llama-3-8b", "--gpu-memory", "12GiB", "--hardware", "rtx3060-12g",
                            "--num-prompts", "200", "--gen-len", "128", "--cpu-memory", "30GiB"])
    assert r.exit_code == 0, r.output
    for words in ("decode tok/s", "memory per tier", "bottleneck:", "wave"):
        assert words in r.output


def test_plan_reads_a_prompts_file(tmp_path):
    from offbatch.tools.synth import synth_model

    synth_model("llama", tmp_path / "m")
    prompts = tmp_path / "p.jsonl"
    lines = [{"id": i, "prompt": "hello world " * (i + 1)} for i in range(5)] + [{"id": 9, "prompt": "x", "max_tokens": 40}]
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    rep = plan_json(str(tmp_path / "m"), "--prompts", str(prompts), "--gen-len", "8", "--hardware", "cpu")
    wl = rep["workload"]
    assert wl["num_requests"] == 6  # the bad line is not planned for
    assert wl["max_len"] >= 40 and wl["gen_len"] == pytest.approx((5 * 8 + 40) / 6)
    assert rep["plan"]["device"] == "cpu" and rep["plan"]["max_len"] == wl["max_len"]


@pytest.mark.parametrize("args,words", [
    (["--synth", "llama-3-8b", "--gpu-memory", "64MiB", "--hardware", "rtx4090"], "at least"),
    (["--synth", "llama-3-8b", "--gpu-memory", "8GiB", "--hardware", "gtx-none"], "unknown hardware"),
    (["--gpu-memory", "8GiB"], "MODEL_DIR or --synth"),
    (["--synth", "llama", "--prompts", "x.jsonl"], "needs MODEL_DIR"),
])
def test_plan_errors_are_one_clear_line(args, words):
    r = runner.invoke(app, ["plan", *args])
    assert r.exit_code == 3
    assert words in r.output and "Traceback" not in r.output


def test_bench_pins_a_saved_plan(tmp_path):
    out = tmp_path / "plan.json"
    common = ["--synth", "llama", "--gen-len", "3"]
    r = runner.invoke(app, ["plan", *common, "--num-prompts", "5", "--prompt-len", "6", "--gpu-memory", "3MiB",
                            "--hardware", "cpu", "--json", "--out", str(out)])
    assert r.exit_code == 0, r.output
    saved = json.loads(out.read_text())["plan"]
    r = runner.invoke(app, ["bench", *common, "--prompts", "5", "--prompt-len", "6", "--device", "cpu",
                            "--plan", str(out), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["plan"]["wave_size"] == saved["wave_size"] and rep["plan"]["chosen_by"] == "file"
    assert rep["predicted"]["decode_tok_s"] > 0 and set(rep["prediction_error"]) == {"prefill_tok_s", "decode_tok_s",
                                                                                        "e2e_tok_s"}
    # The saved plan's context is 9 tokens: a longer job cannot run on it.
    r = runner.invoke(app, ["bench", *common, "--prompts", "5", "--prompt-len", "20", "--device", "cpu",
                            "--plan", str(out)])
    assert r.exit_code == 3 and "context" in r.output


def test_plan_with_little_host_memory_shows_the_disk_tier():
    args = ["plan", "--synth", "mixtral-8x7b", "--layers", "8", "--gpu-memory", "8GiB", "--hardware", "h200",
            "--num-prompts", "256", "--gen-len", "32", "--cpu-memory", "12GiB"]
    r = runner.invoke(app, args, terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "disk tier" in r.output and "staging" in r.output and "disk reads" in r.output
    rep = plan_json(*args[1:])
    assert rep["plan"]["disk_modules"] > 0 and sum(rep["plan"]["host_memory"].values()) <= 12 << 30
    assert rep["bottleneck_kind"] == "disk"
    r = runner.invoke(app, [*args[:-1], "2GiB"])
    assert r.exit_code != 0 and "even with its weights read from disk" in r.output


def test_plans_hold_what_fits_in_either_residency_order(tmp_path):
    # Qwen1.5-MoE on a 12 GiB card's rates budgeted 16 GiB (a profile with the card's rates and more
    # memory: a cap above the card is refused), KV in host memory: the link is busy with KV copies
    # all step. In layer order only the resident stretch before the first streamed module is exposed (less
    # a ring fill), so holding more saves copies in either order and the GPU is filled; spread, the
    # default, predicts no slower with the same bytes held.
    import dataclasses

    import torch

    from offbatch.tools.synth import synth_config
    from offbatch.models.spec import spec_from_config
    from offbatch.planner.hardware import PROFILES
    from offbatch.planner.solve import make_plan
    from offbatch.planner.workload import Workload

    card = PROFILES["rtx3060-12g"]
    hw = dataclasses.replace(card, name="rtx3060-roomy", gpu_memory_bytes=16 << 30,
                             host=dataclasses.replace(card.host, memory_bytes=512 << 30))
    hw_file = tmp_path / "roomy.json"
    hw_file.write_text(json.dumps(hw.to_dict()))
    spec = spec_from_config(synth_config("qwen1.5-moe-a2.7b"))
    wl = Workload.uniform(5000, 64, 512)
    plans = {o: make_plan(spec, torch.bfloat16, "cuda", 16 << 30, wl, hardware=hw, cpu_memory=512 << 30,
                          residency_order=o) for o in ("layer", "spread")}
    for plan in plans.values():
        assert plan.memory["resident_weights"] > 4 << 30
        assert sum(plan.memory.values()) <= 0.9 * (16 << 30)
    assert plans["spread"].predicted["e2e_tok_s"] >= plans["layer"].predicted["e2e_tok_s"] * (1 - 1e-9)
    rep = plan_json("--synth", "qwen1.5-moe-a2.7b", "--gpu-memory", "16GiB", "--hardware", str(hw_file),
                    "--num-prompts", "5000", "--prompt-len", "64", "--gen-len", "512", "--cpu-memory", "512GiB")
    assert rep["plan"]["residency_order"] == "spread"
    assert rep["plan"]["memory"]["resident_weights"] == plans["spread"].memory["resident_weights"]


def test_bench_reports_where_the_host_was_blocked():
    r = runner.invoke(app, ["bench", "--synth", "mixtral", "--device", "cpu", "--prompts", "4", "--prompt-len", "6",
                            "--gen-len", "3", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    split = rep["time_split_s"]
    # How even the decode steps were: 2 decode steps per prompt (3 new tokens, the first from the prompt's step).
    steps = rep["decode_step_s"]
    assert rep["decode_steps"] >= 2 and 0 < steps["median"] <= steps["max"] and steps["beyond_twice_median"] >= 0
    # They are the decode steps' own times: half of them at least the median, none above the slowest.
    decode_wall = rep["decode_steps"] * rep["decode_tokens_per_step"] / rep["decode_tok_s"]
    assert rep["decode_steps"] // 2 * steps["median"] <= decode_wall * (1 + 1e-9)
    assert decode_wall <= rep["decode_steps"] * steps["max"] * (1 + 1e-9)
    # A MoE model syncs once per layer and step for its routing; the CPU engine has no CPU attention
    # beside a device and no host KV writer.
    assert split["host_router_sync"] > 0 and split["host_cpu_attention"] == 0 == split["host_kv_store_wait"]
    assert split["host_router_sync"] < split["other (compute, host)"] + split["weight_wait"]
    assert 0 < split["host_router_sync_in_prefill_steps"] < split["host_router_sync"]


def test_plan_and_bench_pack_the_weights_in_the_format_asked():
    shape = ["--synth", "mixtral-8x7b", "--layers", "8", "--gpu-memory", "8GiB", "--hardware", "h200",
             "--num-prompts", "1024", "--prompt-len", "256", "--gen-len", "64"]
    dense, int4 = plan_json(*shape), plan_json(*shape, "--weights", "int4")
    assert dense["plan"]["weights"] == "dense" and int4["plan"]["weights"] == "int4"
    # The planner sized the modules as the format stores them (embedding and head stay bf16), and fewer bytes
    # stream per step (how many fewer is the plan's choice: with the expansion priced, it keeps more KV).
    assert int4["weight_bytes"] < int4["dense"]["weight_bytes"] / 3.5
    streamed = lambda rep: rep["predicted"]["decode_step"]["weight_bytes"]  # noqa: E731
    assert 0 < streamed(int4) < streamed(dense) / 3
    common = ["--synth", "mixtral", "--gen-len", "3", "--prompts", "4", "--prompt-len", "6", "--device", "cpu"]
    r = runner.invoke(app, ["bench", *common, "--weights", "int4", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["plan"]["weights"] == "int4" and rep["decode_tok_s"] > 0
    r = runner.invoke(app, ["bench", *common, "--weights", "int3"])
    assert r.exit_code == 2 and "int4" in r.output  # names the formats it knows
