"""Hostile output situations for the real `offbatch run` (reference engine, a tiny llama written by
`offbatch synth`): each case reproduces a failure the issue found (a notes file or the input itself as
-o, two runs on one output, /dev/stdout as a pipe, /dev/null, a FIFO, --overwrite interrupted, stale
results after a model or settings change, records of removed ids, a file-size limit, a full disk, an
unwritable folder) and asserts on what the files hold afterwards: nothing lost, nothing duplicated, the
documented exit status, one clear line instead of a traceback.

CASES is the table: (id, scenario, expected exit status of the run under test, what its stderr says).
A scenario runs the command (and what leads up to it), checks the files, and returns the run's
(exit status, stderr)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from jobs_support import WORDS, read_jsonl, write_jsonl
from typer.testing import CliRunner

from offbatch.cli.main import app
from offbatch.jobs.ledger import header_path_for
from offbatch.jobs.lock import lock_path_for

REPO = Path(__file__).resolve().parents[1]
ROWS = [{"id": f"r{i}", "prompt": " ".join(WORDS[3 * i:3 * i + 3])} for i in range(6)]
JOB = ["--max-tokens", "4", "--ignore-eos"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny llamas of one shape and tokenizer, with other weights (synth seeds 3 and 4)."""
    root = tmp_path_factory.mktemp("hostile_out")
    out = {}
    for name, seed in (("m", 3), ("m2", 4)):
        r = CliRunner().invoke(app, ["synth", "llama", str(root / name), "--seed", str(seed), "--quiet"])
        assert r.exit_code == 0, r.output
        out[name] = root / name
    return out


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def clean(models, tmp_path_factory):
    """The texts of one uninterrupted run of the job on an empty output."""
    folder = tmp_path_factory.mktemp("clean")
    prompts = write_jsonl(folder / "p.jsonl", ROWS)
    r = run(models["m"], prompts, "-o", folder / "out.jsonl", *JOB)
    assert r.exit_code == 0, r.output
    return complete(folder / "out.jsonl")


@dataclass
class Env:
    model: Path
    other_model: Path
    tmp: Path
    clean: dict

    @property
    def prompts(self) -> Path:
        return write_jsonl(self.tmp / "p.jsonl", ROWS)


def run(*args, input=None):
    return CliRunner().invoke(app, ["run", *map(str, args)], input=input)


def outcome(r) -> tuple[int, str]:
    return r.exit_code, r.stderr


def process(*args, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "offbatch.cli.main", "run", *map(str, args)], cwd=REPO, env=env,
                            stdout=popen.pop("stdout", subprocess.PIPE), stderr=subprocess.PIPE, **popen)


def complete(out: Path, ids=tuple(r["id"] for r in ROWS), tokens: int = 4) -> dict:
    """Every id exactly once, all successes of `tokens` tokens, no torn line: {id: text}."""
    data = out.read_bytes()
    assert data.endswith(b"\n")
    recs = [json.loads(line) for line in data.splitlines()]
    assert sorted(r["id"] for r in recs) == sorted(ids)
    assert all(r["error"] is None and r["completion_tokens"] == tokens for r in recs)
    return {r["id"]: r["text"] for r in recs}


def left_nothing_behind(out: Path) -> None:
    assert not lock_path_for(out).exists()
    assert not list(out.parent.glob("*.offbatch-tmp"))


# ---- files that are not this job's results ------------------------------------------------------

def notes_file(env: Env):
    out = env.tmp / "notes.txt"
    out.write_text("my notes\nshopping list: milk")
    r = run(env.model, env.prompts, "-o", out, *JOB)
    assert out.read_text() == "my notes\nshopping list: milk"  # not one byte lost (the tail is no torn record)
    assert not header_path_for(out).exists()
    left_nothing_behind(out)
    return outcome(r)


def other_prompts(env: Env):
    out = write_jsonl(env.tmp / "other_prompts.jsonl", [{"prompt": "x"}, {"messages": [{"role": "user",
                                                                                      "content": "y"}]}])
    before = out.read_bytes()
    r = run(env.model, env.prompts, "-o", out, *JOB)
    assert out.read_bytes() == before
    return outcome(r)


def input_through_stdin(env: Env):
    """`offbatch run - -o prompts.jsonl < prompts.jsonl`: the output is the input, reached through stdin."""
    prompts = env.prompts
    before = prompts.read_bytes()
    r = run(env.model, "-", "-o", prompts, *JOB, input=before)
    assert prompts.read_bytes() == before
    return outcome(r)


def other_jobs_results(env: Env):
    out = env.tmp / "out.jsonl"
    other = write_jsonl(env.tmp / "other.jsonl", [{"id": "x1", "prompt": "sky blue"}, {"id": "x2", "prompt": "a"}])
    assert run(env.model, other, "-o", out, *JOB).exit_code == 0
    before = out.read_bytes()
    r = run(env.model, env.prompts, "-o", out, *JOB)
    assert out.read_bytes() == before
    return outcome(r)


# ---- two runs, interrupted runs -----------------------------------------------------------------

def second_run_while_locked(env: Env):
    """Another process holds the output's lock (as a running job does): the second run fails at once and
    writes nothing; once the first is gone, the same command resumes to each result exactly once."""
    out = env.tmp / "out.jsonl"
    first_two = write_jsonl(env.tmp / "two.jsonl", ROWS[:2])
    assert run(env.model, first_two, "-o", out, *JOB).exit_code == 0
    before = out.read_bytes()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from offbatch.jobs.lock import OutputLock\n"
         f"lock = OutputLock({str(out)!r}).acquire(); print('locked', flush=True); sys.stdin.read()"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = run(env.model, env.prompts, "-o", out, *JOB)
        assert f"(pid {holder.pid})" in r.stderr
        assert out.read_bytes() == before  # nothing written twice, nothing cut
    finally:
        holder.communicate(timeout=30)
    again = run(env.model, env.prompts, "-o", out, *JOB)
    assert again.exit_code == 0, again.output
    assert out.read_bytes().startswith(before) and complete(out) == env.clean
    left_nothing_behind(out)
    return outcome(r)


def overwrite_sigterm_rerun(env: Env):
    """`run --overwrite` on a notes file, a second run of it while it works (refused: it holds the lock),
    SIGTERM, then the same --overwrite command again: it resumes, the finished results are kept."""
    rows = [{"id": f"k{i}", "prompt": " ".join(WORDS[i % 40:i % 40 + 3])} for i in range(120)]
    prompts = write_jsonl(env.tmp / "many.jsonl", rows)
    out = env.tmp / "out.jsonl"
    out.write_text("notes, to be replaced\n")
    job = ["--max-tokens", "12", "--ignore-eos", "--overwrite"]
    proc = process(env.model, prompts, "-o", out, *job, "--max-batch", "1", "--log-format", "json",
                   "--log-interval", "0.5", text=True)
    try:
        # No deadline: the run either writes its first results or ends (120 requests), and ending fails here.
        while not (out.exists() and out.read_bytes().count(b"\n") >= 4 and b"notes" not in out.read_bytes()):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        second = run(env.model, prompts, "-o", out, *job)
        assert second.exit_code == 3 and f"(pid {proc.pid})" in second.stderr
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    finished = out.read_bytes()
    n = finished.count(b"\n")
    assert 4 <= n < len(rows) and b"notes" not in finished
    r = run(env.model, prompts, "-o", out, *job, "--max-batch", "64")
    assert f"resuming: {n} request(s) already have results" in r.stderr
    assert out.read_bytes().startswith(finished)  # the interrupted run's results were kept, not redone
    complete(out, [x["id"] for x in rows], tokens=12)
    left_nothing_behind(out)
    return outcome(r)


# ---- special files ------------------------------------------------------------------------------

def dev_null(env: Env):
    r = run(env.model, env.prompts, "-o", "/dev/null", *JOB)
    assert not Path("/dev/null.lock").exists() and not Path("/dev/null.offbatch.json").exists()
    assert Path("/dev/null").is_char_device()
    return outcome(r)


def dev_stdout_pipe(env: Env):
    """`-o /dev/stdout | cat`: reading /dev/stdout to resume from it waited forever for the pipe. Here fd 1
    of this very process is a pipe (as under `| cat`) for the run, drained by a thread."""
    read_end, write_end = os.pipe()
    chunks = []
    drain = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_end, 65536), b"")), daemon=True)
    drain.start()
    saved = os.dup(1)
    os.dup2(write_end, 1)
    os.close(write_end)
    try:
        r = run(env.model, env.prompts, "-o", "/dev/stdout", *JOB)
    finally:
        os.dup2(saved, 1)  # the pipe's last writer is gone: the drain sees its end
        os.close(saved)
    drain.join(timeout=60)
    os.close(read_end)
    out = b"".join(chunks).decode()
    assert {json.loads(x)["id"]: json.loads(x)["text"] for x in out.splitlines()} == env.clean
    return outcome(r)


def fifo(env: Env):
    path = env.tmp / "fifo"
    os.mkfifo(path)
    got = []

    def reader():
        for _ in range(2):  # two runs: each opens, writes and closes
            with open(path) as f:
                got.append(f.read())

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    first = run(env.model, env.prompts, "-o", path, *JOB)
    assert first.exit_code == 0, first.output
    r = run(env.model, env.prompts, "-o", path, *JOB)  # never read for resume: it would block
    t.join(timeout=60)
    assert len(got) == 2 and all({json.loads(x)["id"]: json.loads(x)["text"] for x in g.splitlines()} == env.clean
                                 for g in got)
    assert not lock_path_for(path).exists() and not header_path_for(path).exists()
    return outcome(r)


def symlinked_output(env: Env):
    """A symlink as -o: the target is resumed and locked; a rewrite replaces the target, not the link."""
    target, link = env.tmp / "real.jsonl", env.tmp / "link.jsonl"
    link.symlink_to(target)
    assert run(env.model, write_jsonl(env.tmp / "two.jsonl", ROWS[:2]), "-o", link, *JOB).exit_code == 0
    with open(target, "ab") as f:
        f.write(b'{"id": "r5", "te')  # torn: cut back
    r = run(env.model, env.prompts, "-o", link, *JOB)
    assert link.is_symlink() and complete(target) == env.clean
    return outcome(r)


# ---- results made otherwise ---------------------------------------------------------------------

def changed(env: Env, first: list, second: list, model2: Path | None = None):
    """Run with `first`, rerun with `second`: the rerun is refused and changes nothing."""
    out = env.tmp / "out.jsonl"
    assert run(env.model, env.prompts, "-o", out, *first).exit_code == 0
    before = out.read_bytes()
    r = run(model2 or env.model, env.prompts, "-o", out, *second)
    assert out.read_bytes() == before
    return out, before, r


def model_changed(env: Env):
    out, _, r = changed(env, JOB, JOB, env.other_model)
    redo = run(env.other_model, env.prompts, "-o", out, *JOB, "--redo-changed")
    assert redo.exit_code == 0, redo.output
    texts = complete(out)
    assert texts != env.clean  # other weights, other texts: none of the old ones is left
    assert run(env.other_model, env.prompts, "-o", out, *JOB).exit_code == 0  # now this job's results
    return outcome(r)


def max_tokens_changed(env: Env):
    out, _, r = changed(env, JOB, ["--max-tokens", "6", "--ignore-eos"])
    redo = run(env.model, env.prompts, "-o", out, "--max-tokens", "6", "--ignore-eos", "--redo-changed")
    assert redo.exit_code == 0, redo.output
    complete(out, tokens=6)
    return outcome(r)


def temperature_changed(env: Env):
    out, before, r = changed(env, JOB, [*JOB, "--temperature", "0.7"])
    keep = run(env.model, env.prompts, "-o", out, *JOB, "--temperature", "0.7", "--keep-changed")
    assert keep.exit_code == 0, keep.output
    assert "kept as they are" in keep.stderr and complete(out) == env.clean  # kept as they were
    again = run(env.model, env.prompts, "-o", out, *JOB, "--temperature", "0.7")  # kept = this job's now
    assert again.exit_code == 0 and "resuming: 6 request(s)" in again.stderr and complete(out) == env.clean
    return outcome(r)


def results_without_key(env: Env):
    """Results written by an offbatch before resume keys: refused until --keep-changed or --redo-changed."""
    out = env.tmp / "out.jsonl"
    assert run(env.model, env.prompts, "-o", out, *JOB).exit_code == 0
    recs = read_jsonl(out)
    for rec in recs:
        del rec["settings_hash"]
    write_jsonl(out, recs)
    header_path_for(out).unlink()
    before = out.read_bytes()
    r = run(env.model, env.prompts, "-o", out, *JOB)
    assert out.read_bytes() == before
    assert run(env.model, env.prompts, "-o", out, *JOB, "--keep-changed").exit_code == 0
    assert all(rec["settings_hash"] for rec in read_jsonl(out)) and complete(out) == env.clean
    return outcome(r)


def ids_removed(env: Env):
    out = env.tmp / "out.jsonl"
    assert run(env.model, env.prompts, "-o", out, *JOB).exit_code == 0
    all_records = sorted(out.read_text().splitlines())
    r = run(env.model, write_jsonl(env.tmp / "four.jsonl", ROWS[:4]), "-o", out, *JOB)
    assert complete(out, ids=[x["id"] for x in ROWS[:4]])
    (stale,) = env.tmp.glob("out.jsonl.stale-*.jsonl")
    assert str(stale) in r.stderr
    assert sorted(out.read_text().splitlines() + stale.read_text().splitlines()) == all_records  # nothing lost
    return outcome(r)


def hard_linked_output(env: Env):
    """Two names of one file: the lock is by name, so runs on `out.jsonl` and its hard link `alias.jsonl`
    both wrote, every result twice. A file with other names is refused (lock taken, nothing written)."""
    out, alias = env.tmp / "out.jsonl", env.tmp / "alias.jsonl"
    assert run(env.model, env.prompts, "-o", out, *JOB).exit_code == 0
    before = out.read_bytes()
    os.link(out, alias)
    r = run(env.model, env.prompts, "-o", alias, *JOB)
    assert out.read_bytes() == before and os.stat(out).st_nlink == 2
    left_nothing_behind(alias)
    return outcome(r)


# ---- --errors FILE, rewritten on every run ------------------------------------------------------

BAD_ROWS = [*ROWS[:2], {"id": "bad", "prompt": 5}]


def errors_file_notes(env: Env):
    """--errors naming a notes file: it was truncated by every run, even one with no error at all."""
    notes = env.tmp / "notes.txt"
    notes.write_text("my notes\n")
    r = run(env.model, write_jsonl(env.tmp / "p.jsonl", BAD_ROWS), "-o", env.tmp / "out.jsonl", "--errors", notes,
            *JOB)
    assert notes.read_text() == "my notes\n" and not (env.tmp / "out.jsonl").exists()
    return outcome(r)


def errors_file_other_results(env: Env):
    """--errors naming another job's results file (a slip for -o): they were all deleted."""
    results = env.tmp / "results.jsonl"
    assert run(env.model, env.prompts, "-o", results, *JOB).exit_code == 0
    before = results.read_bytes()
    r = run(env.model, write_jsonl(env.tmp / "p2.jsonl", BAD_ROWS), "-o", env.tmp / "out.jsonl", "--errors",
            results, *JOB)
    assert results.read_bytes() == before
    return outcome(r)


def errors_file_rerun(env: Env):
    """An --errors file of error records is this option's own: each run rewrites it (no error twice),
    and --overwrite replaces a file that is not."""
    errors, out = env.tmp / "errors.jsonl", env.tmp / "out.jsonl"
    prompts = write_jsonl(env.tmp / "p.jsonl", BAD_ROWS)
    for _ in range(2):
        r = run(env.model, prompts, "-o", out, "--errors", errors, *JOB)
        assert r.exit_code == 1, r.output
        assert [x["id"] for x in read_jsonl(errors)] == ["bad"]
    notes = env.tmp / "notes.txt"
    notes.write_text("my notes\n")
    assert run(env.model, prompts, "-o", out, "--errors", notes, "--overwrite", *JOB).exit_code == 1
    assert [x["id"] for x in read_jsonl(notes)] == ["bad"]
    return outcome(r)


# ---- writes that fail ---------------------------------------------------------------------------

def file_size_limit(env: Env):
    """RLIMIT_FSIZE for real: the process used to die of SIGXFSZ; now one error, and a rerun resumes."""
    out = env.tmp / "out.jsonl"
    rows = [{"id": f"f{i}", "prompt": " ".join(WORDS[i:i + 2])} for i in range(16)]
    prompts = write_jsonl(env.tmp / "p16.jsonl", rows)
    ids = [x["id"] for x in rows]
    sizes = env.tmp / "sizes.jsonl"  # the same job, unlimited: how long its header and records are
    assert run(env.model, prompts, "-o", sizes, *JOB).exit_code == 0
    limit = sizes.stat().st_size // 2  # about eight of the sixteen records fit
    assert header_path_for(sizes).stat().st_size < limit

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = process(env.model, prompts, "-o", out, *JOB, preexec_fn=cap, text=True)
    _, err = proc.communicate(timeout=120)
    assert 0 < out.stat().st_size <= limit
    safe = out.read_bytes().count(b"\n")
    assert 0 < safe < len(rows) and f"{safe} finished record(s) are safe" in err
    again = run(env.model, prompts, "-o", out, *JOB)
    assert again.exit_code == 0, again.output
    assert complete(out, ids) == complete(sizes, ids)  # resumed: the same results as one unlimited run
    return proc.returncode, err


def dev_full(env: Env):
    return outcome(run(env.model, env.prompts, "-o", "/dev/full", *JOB))


def folder_is_a_file(env: Env):
    notes = env.tmp / "notes.txt"
    notes.write_text("x")
    r = run(env.model, env.prompts, "-o", notes / "out.jsonl", *JOB)
    assert notes.read_text() == "x"
    return outcome(r)


def folder_path(env: Env):
    """-o out/ (a folder's name, not there yet): was "out/ cannot be written: Is a directory"."""
    r = run(env.model, env.prompts, "-o", f"{env.tmp / 'out'}/", *JOB)
    assert not (env.tmp / "out").exists()
    return outcome(r)


def unwritable_folder(env: Env):
    """/proc refuses new files even to root (chmod would not stop root)."""
    return outcome(run(env.model, env.prompts, "-o", "/proc/offbatch-out.jsonl", *JOB))


@dataclass
class Case:
    id: str
    scenario: Callable[[Env], tuple[int, str]]
    status: int
    says: str


CASES = [
    Case("notes_file", notes_file, 3, "2 line(s) of text that is not JSON (line 1: \"my notes\")"),
    Case("other_prompts", other_prompts, 3, "2 request line(s) (it looks like a prompts file)"),
    Case("input_through_stdin", input_through_stdin, 3, "6 request line(s) (it looks like a prompts file)"),
    Case("other_jobs_results", other_jobs_results, 3, "holds 2 result(s) of another job"),
    Case("second_run_while_locked", second_run_while_locked, 3, "is in use by another offbatch run"),
    Case("overwrite_sigterm_rerun", overwrite_sigterm_rerun, 0, "resuming"),
    Case("dev_null", dev_null, 0, "done: 6 ok"),
    Case("dev_stdout_pipe", dev_stdout_pipe, 0, "done: 6 ok"),
    Case("fifo", fifo, 0, "done: 6 ok"),
    Case("symlinked_output", symlinked_output, 0, "cut short"),
    Case("model_changed", model_changed, 3, "model fingerprint differs (model.safetensors changed)"),
    Case("max_tokens_changed", max_tokens_changed, 3, "6 result(s) were made with other settings or another "
                                                      "model (max_tokens 4 -> 6)"),
    Case("temperature_changed", temperature_changed, 3, "(temperature 0.0 -> 0.7)"),
    Case("results_without_key", results_without_key, 3, "6 result(s) carry no settings key"),
    Case("ids_removed", ids_removed, 0, "2 result(s) of ids that are no longer in this job were moved to"),
    Case("hard_linked_output", hard_linked_output, 3, "alias.jsonl has 2 hard links"),
    Case("errors_file_notes", errors_file_notes, 3, 'holds 1 line(s) of text that is not JSON (line 1: "my notes")'),
    Case("errors_file_other_results", errors_file_other_results, 3, "holds 6 success record(s) (line 1: "),
    Case("errors_file_rerun", errors_file_rerun, 1, "prompt must be a string"),
    Case("file_size_limit", file_size_limit, 3, "File too large"),
    Case("dev_full", dev_full, 3, "writing /dev/full failed: No space left on device"),
    Case("folder_is_a_file", folder_is_a_file, 3, "Not a directory"),
    Case("folder_path", folder_path, 3, "out/ names a folder; give a file name"),
    Case("unwritable_folder", unwritable_folder, 3, "cannot be created"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_output(models, clean, tmp_path, case):
    status, stderr = case.scenario(Env(models["m"], models["m2"], tmp_path, clean))
    assert status == case.status, stderr
    assert case.says in stderr, stderr
    assert "Traceback" not in stderr
    if status == 3:  # one clear line
        assert stderr.count("offbatch: error:") == 1, stderr
        assert "--redo-changed" in stderr or "changed" not in case.id


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 12 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("flags", [["--redo-changed", "--keep-changed"], ["--overwrite", "--keep-changed"]])
def test_contradictory_resume_flags_are_usage_errors(models, tmp_path, flags):
    out = tmp_path / "out.jsonl"
    r = run(models["m"], write_jsonl(tmp_path / "p.jsonl", ROWS), "-o", out, *flags)
    assert r.exit_code == 2 and "--keep-changed" in r.output and not out.exists()
