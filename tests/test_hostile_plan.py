"""Absurd budgets and plan files through the real `offbatch plan`, `bench` and `run`: each ends in its
documented status (2: a usage error naming the flag; 3: one clear line, PlanFileError or BudgetError),
with no traceback and nothing written.

The issue's failures: a 400-digit `--gpu-memory` overflowed float() into a traceback; `--gpu-memory
100GiB` on the 24 GiB rtx4090 profile planned 40 GiB and `--cpu-memory 10TiB` 155 GiB of pinned memory
on a 64 GiB profile; a plan file with an absurd max_len crashed or allocated. One parse of sizes that
cannot fail (units.parse_bytes), one check of caps against the machine (planner.solve.check_caps and
engine.build.cap_gpu_memory), one validation pass over a plan file (Plan.from_dict, load_plan_file)
and over what a plan would allocate (engine.build.check_plan).
"""

from __future__ import annotations

import json
import os

import pytest
from jobs_support import write_jsonl
from typer.testing import CliRunner

from offbatch.cli.main import app

runner = CliRunner()
PLAN = ["plan", "--synth", "llama", "--hardware", "cpu", "--num-prompts", "5", "--prompt-len", "6", "--gen-len", "3"]
BENCH = ["bench", "--synth", "llama", "--device", "cpu", "--prompts", "5", "--prompt-len", "6", "--gen-len", "3"]
RUN = ["run", "{model}", "{prompts}", "-o", "{out}", "--engine", "streaming", "--device", "cpu", "--max-tokens", "3",
       "--quiet"]
DIGITS_400 = "9" * 400


@pytest.fixture(scope="module")
def saved_plan(tmp_path_factory) -> dict:
    """A real plan file's contents (llama synth, CPU): the cases below break one field each."""
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    r = runner.invoke(app, [*PLAN, "--gpu-memory", "3MiB", "--json", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile_plan") / "m"
    r = runner.invoke(app, ["synth", "llama", str(folder), "--seed", "3", "--quiet"])
    assert r.exit_code == 0, r.output
    return folder


def edited(field: str, value, raw: str | None = None):
    """A saved plan (the whole `plan --json` report) with one field changed or deleted; `raw`: written
    as this JSON text (a number JSON can hold and Python reads as inf)."""
    def edit(report: dict) -> str:
        plan = dict(report["plan"])
        if value is DELETE:
            del plan[field]
        else:
            plan[field] = value
        text = json.dumps({**report, "plan": plan})
        return text.replace(json.dumps(value), raw) if raw else text
    return edit


DELETE = object()

# (id, argv ({plan} {model} {prompts} {out} {hardware} filled in), what the plan file holds (an edit of a
# saved plan, raw bytes, or "dir"/"fifo"), status, words the one line must hold)
CASES = [
    # byte sizes: usage errors naming the flag
    ("gpu_memory_400_digits", [*PLAN, "--gpu-memory", DIGITS_400], None, 2, "--gpu-memory"),
    ("gpu_memory_1e400GiB", [*PLAN, "--gpu-memory", "1e400GiB"], None, 2, "not a byte size: '1e400GiB'"),
    ("gpu_memory_inf", [*PLAN, "--gpu-memory", "inf"], None, 2, "not a byte size: 'inf'"),
    ("gpu_memory_nan", [*PLAN, "--gpu-memory", "nan"], None, 2, "not a byte size: 'nan'"),
    ("gpu_memory_negative", [*PLAN, "--gpu-memory", "-8GiB"], None, 2, "a size has no sign"),
    ("gpu_memory_zero", [*PLAN, "--gpu-memory", "0"], None, 2, "give at least one byte"),
    ("gpu_memory_minus_zero", [*PLAN, "--gpu-memory", "-0"], None, 2, "a size has no sign"),
    ("gpu_memory_two_units", [*PLAN, "--gpu-memory", "8 GiB GiB"], None, 2, "not a byte size: '8 GiB GiB'"),
    ("gpu_memory_above_a_pebibyte", [*PLAN, "--gpu-memory", "2048TiB"], None, 2, "more than 1.00 PiB"),
    ("cpu_memory_400_digits", [*PLAN, "--cpu-memory", DIGITS_400], None, 2, "--cpu-memory"),
    ("bench_gpu_memory_1e400GiB", [*BENCH, "--gpu-memory", "1e400GiB"], None, 2, "--gpu-memory"),
    ("run_gpu_memory_400_digits", [*RUN, "--gpu-memory", DIGITS_400], None, 2, "--gpu-memory"),
    # --out that cannot be written: one line (was: an internal error, 4); bench finds out before it runs
    ("plan_out_a_directory", [*PLAN, "--out", "{plan}"], "dir", 3, "plan.json cannot be written: Is a directory"),
    ("plan_out_missing_folder", [*PLAN, "--out", "{plan}/x.json"], None, 3, "cannot be written: No such file"),
    ("plan_out_disk_full", [*PLAN, "--out", "/dev/full"], None, 3, "writing --out /dev/full failed: No space left"),
    ("bench_out_missing_folder", [*BENCH, "--out", "{plan}/x.json"], None, 3, "cannot be written: No such file"),
    ("bench_prompts_absurd", ["bench", "--synth", "llama", "--device", "cpu", "--prompts", "99999999999",
                              "--prompt-len", "4", "--gen-len", "2"], None, 3,
     "bench builds them all in memory and takes at most"),  # was: a 3.2 TB allocation, an internal error (4)
    # caps above the machine: refused, not planned
    ("gpu_memory_above_the_profile", ["plan", "--synth", "llama-3-8b", "--hardware", "rtx4090", "--gpu-memory",
                                      "100GiB"], None, 3, "more than the rtx4090 profile's 24.00 GiB of GPU memory"),
    ("cpu_memory_above_the_profile", ["plan", "--synth", "mixtral-8x7b", "--hardware", "rtx4090", "--gpu-memory",
                                      "8GiB", "--cpu-memory", "10TiB"], None, 3,
     "--cpu-memory 10.00 TiB is more than the rtx4090 profile's 64.00 GiB of host memory"),
    ("gpu_memory_above_a_hardware_file", [*PLAN[:3], "--hardware", "{hardware}", "--gpu-memory", "20GiB"], None, 3,
     "more than the tiny-card profile's 16.00 GiB"),
    ("hardware_file_rate_a_string", [*PLAN[:3], "--hardware", "{bad_rate}"], None, 3,
     "h2d_pinned_bytes_s is a rate above 0, not 'fast'"),
    ("hardware_file_negative_memory", [*PLAN[:3], "--hardware", "{bad_memory}"], None, 3,
     "gpu_memory_bytes is a whole number above 0, not -1"),
    ("bench_cap_above_this_machine", [*BENCH, "--gpu-memory", "1PiB"], None, 3, "more than this machine's"),
    ("bench_pinned_plan_cap_above_this_machine", [*BENCH, "--plan", "{plan}", "--gpu-memory", "1PiB"],
     edited("wave_size", 5), 3, "more than this machine's"),
    ("run_cap_above_this_machine", [*RUN, "--gpu-memory", "1PiB"], None, 3, "more than this machine's"),
    # plan files: one clear line naming what is wrong
    ("plan_max_len_absurd", [*BENCH, "--plan", "{plan}"], edited("max_len", 10**12), 3,
     "a plan's max_len is 2 to 2097152, not 1000000000000"),
    ("plan_max_len_negative", [*BENCH, "--plan", "{plan}"], edited("max_len", -5), 3, "max_len is 2 to"),
    ("plan_max_len_1e400", [*BENCH, "--plan", "{plan}"], edited("max_len", "@@", raw="1e400"), 3,
     "max_len is a whole number, not inf"),
    ("plan_wave_nan", [*BENCH, "--plan", "{plan}"], edited("wave_size", "@@", raw="NaN"), 3,
     "wave_size is a whole number, not nan"),
    ("plan_max_len_a_string", [*BENCH, "--plan", "{plan}"], edited("max_len", "4096"), 3,
     "max_len is a whole number, not '4096' (a string)"),
    ("plan_wave_fractional", [*BENCH, "--plan", "{plan}"], edited("wave_size", 2.5), 3, "wave_size is a whole number"),
    ("plan_wrong_version", [*BENCH, "--plan", "{plan}"], edited("format", 3), 3, "plan file format 3"),
    ("plan_format_1", [*BENCH, "--plan", "{plan}"], edited("format", 1), 3,
     "plan file format 1 (an older offbatch's plan: it names kv_placement and decode_attention"),
    ("plan_attention_unknown", [*BENCH, "--plan", "{plan}"], edited("attention", "host"), 3,
     "a plan's attention is device-kv or host-kv-gpu or host-kv-cpu or hgca, not 'host'"),
    ("plan_missing_key", [*BENCH, "--plan", "{plan}"], edited("wave_size", DELETE), 3, 'it has no "wave_size"'),
    ("plan_dtype_not_a_dtype", [*BENCH, "--plan", "{plan}"], edited("dtype", "cuda"), 3, "dtype is float32"),
    ("plan_device_bogus", [*BENCH, "--plan", "{plan}"], edited("device", "tpu:0"), 3, "device is cpu, cuda"),
    ("plan_slots_absurd", [*BENCH, "--plan", "{plan}"], edited("slots", {"attn": 10**9, "ffn": 2}), 3,
     "slots['attn'] is 0 to 64"),
    ("plan_resident_not_pairs", [*BENCH, "--plan", "{plan}"], edited("resident", [[0, "attn", 1]]), 3,
     "[layer, module] pairs"),
    ("plan_kv_more_than_the_cap", [*BENCH, "--plan", "{plan}", "--gpu-memory", "1MiB"], edited("wave_size", 60000), 3,
     "more than the --gpu-memory cap, 1.00 MiB"),
    ("plan_context_beyond_the_model", [*BENCH, "--plan", "{plan}"], edited("max_len", 2_000_000), 3,
     "the model's is"),
    ("plan_not_json", [*BENCH, "--plan", "{plan}"], b"{not json", 3, "is not JSON"),
    ("plan_a_list", [*BENCH, "--plan", "{plan}"], b"[1, 2, 3]", 3, "a JSON object is expected"),
    ("plan_nested_deep", [*BENCH, "--plan", "{plan}"], b"[" * 100_000 + b"]" * 100_000, 3, "nested too deeply"),
    ("plan_not_utf8", [*BENCH, "--plan", "{plan}"], b'{"plan": "\xff\xfe"}', 3, "not UTF-8"),
    ("plan_a_directory", [*BENCH, "--plan", "{plan}"], "dir", 3, "not a regular file"),
    ("plan_a_fifo", [*BENCH, "--plan", "{plan}"], "fifo", 3, "not a regular file"),
    ("run_plan_max_len_absurd", [*RUN, "--plan", "{plan}"], edited("max_len", 10**12), 3, "max_len is 2 to"),
    ("run_plan_wrong_version", [*RUN, "--plan", "{plan}"], edited("format", "1"), 3, "plan file format '1'"),
    ("run_plan_kv_more_than_the_cap", [*RUN, "--plan", "{plan}", "--gpu-memory", "1MiB"], edited("wave_size", 2000),
     3, "more than the --gpu-memory cap"),
]


def write_plan_file(path, what, saved_plan) -> None:
    if what == "dir":
        path.mkdir()
    elif what == "fifo":
        os.mkfifo(path)  # reading it would block forever: the file is refused before any read
    elif isinstance(what, bytes):
        path.write_bytes(what)
    else:
        path.write_text(what(saved_plan))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_budget_or_plan_file(case, saved_plan, model, tmp_path):
    name, argv, what, status, words = case
    plan_file = tmp_path / "plan.json"
    if what is not None:
        write_plan_file(plan_file, what, saved_plan)
    hardware = tmp_path / "tiny-card.json"
    hardware.write_text(json.dumps({**saved_plan["hardware"], "name": "tiny-card", "device": "cuda",
                                    "gpu_memory_bytes": 16 << 30}))
    bad_rate, bad_memory = tmp_path / "bad-rate.json", tmp_path / "bad-memory.json"
    bad_rate.write_text(json.dumps({**saved_plan["hardware"], "h2d_pinned_bytes_s": "fast"}))
    bad_memory.write_text(json.dumps({**saved_plan["hardware"], "gpu_memory_bytes": -1}))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}])
    out = tmp_path / "out.jsonl"
    values = {"plan": plan_file, "model": model, "prompts": prompts, "out": out, "hardware": hardware,
              "bad_rate": bad_rate, "bad_memory": bad_memory}
    r = runner.invoke(app, [a.format(**values) for a in argv])
    assert r.exit_code == status, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit))
    assert words in " ".join(r.output.replace("│", " ").split()), r.output  # (click's box wraps usage errors)
    if status == 3:  # exactly one line, ours
        assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("offbatch: error: ")
    assert not out.exists() or out.read_text() == ""  # no result written by a run that could not start
