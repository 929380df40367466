"""One `offbatch run`: read and check every line, resume from the output file, generate, write each
result the moment it finishes, and stop cleanly on Ctrl-C / SIGTERM.

The output (ledger.py says it all): a regular file is locked for the whole run (OUT.lock: a second run
on it fails at once), checked to be a results file of this job (else refused: --overwrite replaces it),
and resumed by a key per result of the model's fingerprint, the dtype and the request's effective
settings (a mismatch is one error naming what changed: --redo-changed / --keep-changed). The job header
OUT.offbatch.json says which values the results were made with. Streams (stdout, /dev/null, a FIFO)
are only written. A write that fails is one OutputFileError (exit 3); finished results stay on disk.

Exit statuses: 0 every request succeeded; 1 some lines failed (their error records say why);
3 fatal (OffbatchError, raised to the CLI); 130 stopped by SIGINT, 143 by SIGTERM (after a clean
stop: every finished result is on disk and a rerun of the same command resumes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import stat
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from offbatch.engine.api import GenRequest
from offbatch.errors import InputFileError
from offbatch.jobs.ledger import RunOutput, check_errors_file, job_key, stamper, wanted_of
from offbatch.jobs.params import resolve_defaults
from offbatch.jobs.progress import Progress
from offbatch.jobs.requests import LineError, Request, find_duplicates, parse_line, prepare, read_input
from offbatch.jobs.requests import effective_settings, review_fields
from offbatch.jobs.results import GENERATION_FAILED, Choice, completion_record, error_record, token_infos
from offbatch.jobs.writer import ResultWriter, is_stream
from offbatch.jobs.stops import finish_choice, make_stop_check

EXIT_OK = 0
EXIT_SOME_FAILED = 1
# SIGHUP (a closed terminal or ssh session) stops as cleanly as SIGTERM, unless it is ignored (nohup).
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


@dataclass
class RunConfig:
    model_dir: Path
    prompts: str
    output: str
    errors: str | None = None
    flags: dict = field(default_factory=dict)  # sampling flags; None = not given
    engine: object = None  # offbatch.engine.select.EngineOptions
    dry_run: bool = False
    overwrite: bool = False  # replace whatever in the output is not this job's results (ledger.py)
    redo_changed: bool = False  # redo requests whose results were made with other settings / model
    keep_changed: bool = False  # keep those results as they are
    strict: bool = False  # unknown fields on a line make it an error record instead of a warning
    model_name: str | None = None  # what records call the model (a GGUF's file stem); default: the folder's name

    @property
    def model(self) -> str:
        return self.model_name or Path(self.model_dir).name


class StopRun(Exception):
    """Raised inside the generator (from a stop_check) to abandon unfinished sequences at once."""


class _Signals:
    """First SIGINT/SIGTERM/SIGHUP: remember it; the generator loop stops at its next token. A second one
    raises KeyboardInterrupt for a hard stop (a torn last line is then possible; resume handles it).
    A signal the caller ignores (SIG_IGN: `nohup` ignores SIGHUP) stays ignored."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self):
        for sig in EXIT_SIGNAL:
            try:
                if signal.getsignal(sig) is signal.SIG_IGN:
                    continue
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _stdin_stat():
    try:
        return os.fstat(sys.stdin.fileno())
    except (OSError, ValueError, AttributeError):  # no real stdin (a test runner's, a closed one)
        return None


def _same_file(a: str, b: str) -> bool:
    """a and b name one file; '-' as a is stdin, so `run - -o prompts.jsonl < prompts.jsonl` is caught."""
    if b == "-":
        return False
    if a == "-":
        st = _stdin_stat()
        try:
            other = os.stat(b)
        except OSError:
            return False
        return st is not None and stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino)
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def load_requests(cfg: RunConfig):
    """(runnable requests, line errors) from the prompts file, in line order."""
    requests, errors = [], []
    for number, raw in read_input(cfg.prompts):
        parsed = parse_line(number, raw)
        (requests if isinstance(parsed, Request) else errors).append(parsed)
    dups = find_duplicates(requests)
    dup_lines = {e.line for e in dups}
    requests = [r for r in requests if r.line not in dup_lines]
    errors = sorted(errors + dups, key=lambda e: e.line)
    return requests, errors


def run_job(cfg: RunConfig, progress: Progress, make_generator: Callable, tokenizer, spec) -> int:
    with contextlib.ExitStack() as cleanup:  # the output's lock, released however the run ends
        return _run_job(cfg, progress, make_generator, tokenizer, spec, cleanup)


def _run_job(cfg: RunConfig, progress: Progress, make_generator: Callable, tokenizer, spec, cleanup) -> int:
    if _same_file(cfg.prompts, cfg.output):
        raise InputFileError(f"the output {cfg.output} is the prompts file; write the results somewhere else")
    if cfg.errors and (_same_file(cfg.errors, cfg.output) or _same_file(cfg.errors, cfg.prompts)):
        raise InputFileError("--errors must name a file of its own, not the prompts or results file")
    if cfg.output != "-" and (Path(cfg.output).is_dir() or cfg.output.endswith("/")):
        raise InputFileError(f"the output {cfg.output} names a folder; give a file name")
    if cfg.errors and not is_stream(cfg.errors):
        check_errors_file(cfg.errors, overwrite=cfg.overwrite)

    defaults = resolve_defaults(tokenizer.generation_defaults, cfg.flags)
    progress.info(f"model: {cfg.model_dir} ({spec.family}, {spec.num_layers} layers, context {spec.max_position})")
    progress.info(f"sampling (fields on a line override these): {defaults.describe()}",
                  defaults={k: defaults.values[k] for k in defaults.values}, sources=defaults.sources)
    for why in defaults.ignored:
        progress.info(f"generation_config.json: ignored {why}")

    requests, errors = load_requests(cfg)
    # Unknown fields and other models' names: one warning each (or, with --strict, error records).
    requests, field_errors, notes = review_fields(requests, cfg.strict, cfg.model)
    errors = sorted(errors + field_errors, key=lambda e: e.line)
    for note in notes:
        progress.warn(note)

    # Every request is prepared, a done one too: its resume key needs its effective settings.
    for r in requests:
        err = prepare(r, tokenizer, defaults, spec.max_position, spec.vocab_size)
        if err is not None:
            errors.append(err)
    bad_lines = {e.line for e in errors}
    requests = [r for r in requests if r.line not in bad_lines]
    errors.sort(key=lambda e: e.line)

    # Resume (ledger.py): lock the output, see what it already answers under which key, refuse it if it
    # is not this job's; nothing is changed in it before the model has loaded.
    job = job_key(cfg.model_dir, getattr(cfg.engine, "dtype", None), defaults, getattr(cfg.engine, "weights", None),
                  getattr(cfg.engine, "kv", None), getattr(cfg.engine, "hgca", None),
                  getattr(cfg.engine, "ffn", None), getattr(cfg.engine, "predictors", None),
                  getattr(cfg.engine, "kv_balance", False))
    keys = {json.dumps(r.id): job.request_key(effective_settings(r)) for r in requests}
    wanted = wanted_of(requests, errors, keys)
    output = RunOutput(cfg.output, overwrite=cfg.overwrite, redo_changed=cfg.redo_changed,
                       keep_changed=cfg.keep_changed)
    if not cfg.dry_run:
        output.lock(cleanup)
    plan = output.plan(wanted, job)
    done = plan.done
    # A line that now fails but whose earlier result is kept (--keep-changed) writes no error record.
    errors = [e for e in errors if not (json.dumps(e.id) in done and wanted[json.dumps(e.id)].line == e.line)]
    todo = [r for r in requests if json.dumps(r.id) not in done]
    for note in output.notes(plan, job):
        progress.warn(note)

    if cfg.dry_run:
        return _dry_run(cfg, progress, requests, errors, len(done))

    # Load the model before touching any file: a folder with bad weights is one clear error, and the
    # output is left exactly as it was.
    if todo and cfg.engine is not None:  # the engine sizes its wave and KV from the job
        cfg.engine.prompt_lens = [len(r.prompt_ids) for r in todo for _ in range(max(1, r.n))]  # n sequences each
        cfg.engine.gen_lens = [r.params.max_tokens for r in todo for _ in range(max(1, r.n))]
    generator = progress.load(make_generator, cfg.model_dir, tokenizer, cfg.engine) if todo else None  # timed
    engine_plan = getattr(generator, "plan", None)  # the streaming engine's: where everything is, and why
    if engine_plan is not None:
        progress.info(engine_plan.summary(), plan=engine_plan.describe())

    for note in output.apply(plan, job):  # cut back, stale records moved aside, the job header written
        progress.warn(note)
    if len(done):
        progress.info(f"resuming: {len(done)} request(s) already have results in {cfg.output}")

    progress.start(total=len(todo) + len(errors), skipped=len(done),  # the ETA's tokens before any finish:
                   planned_tokens=sum(r.params.max_tokens * max(1, r.n) for r in todo),
                   predicted_gen_tok_s=(getattr(engine_plan, "predicted", None) or {}).get("e2e_tok_s"))
    # Each success record carries its resume key; the file already holds the kept records.
    writer = ResultWriter(cfg.output, stamp=stamper(keys), on_disk=len(plan.kept_lines))
    error_writer = writer
    interrupted = None
    try:
        if cfg.errors:  # errors are re-derived every run: none may linger from an earlier one
            error_writer = ResultWriter(cfg.errors, truncate=True)
        for e in errors:
            error_writer.write(error_record(e))
            progress.line_error(e.line, e.id, e.message)
            progress.add(ok=False)
        if todo:
            try:
                interrupted = _generate(cfg, progress, generator, tokenizer, todo, writer, error_writer, errors)
            finally:
                if hasattr(generator, "close"):
                    generator.close()
    except BaseException:
        progress.stop()  # no live bar or log ticker left behind on the way to the error message
        raise
    finally:
        writer.close()
        if error_writer is not writer:
            error_writer.close()
    progress.summary(peak_gpu_bytes=progress.peak_gpu_bytes,
                     interrupted=signal.Signals(interrupted).name if interrupted else None)
    if interrupted:
        return EXIT_SIGNAL.get(interrupted, 130)
    return EXIT_SOME_FAILED if errors else EXIT_OK


def _choice_params(params, index: int):
    """Choice `index` of a request with n > 1 gets its own random stream: a seed derived from the
    request's seed and the index. Choice 0 keeps the request's seed, so it is the text n = 1 gives."""
    if index == 0 or params.seed is None:
        return params
    digest = hashlib.sha256(f"{params.seed}\0choice\0{index}".encode()).digest()
    return replace(params, seed=int.from_bytes(digest[:8], "little") >> 1)


def _choice(tokenizer, r: Request, out, eos) -> Choice:
    text, finish, ids = finish_choice(tokenizer, out, r.stop, r.params, eos, r.skip_special_tokens)
    infos = offsets = None
    if out.logprobs is not None:
        infos, offsets = token_infos(tokenizer, out.logprobs[: len(ids)], r.skip_special_tokens)
    return Choice(text, finish, len(out.token_ids), infos, offsets)


def _generate(cfg, progress, generator, tokenizer, todo: list[Request], writer, error_writer=None,
              failed: list | None = None) -> int | None:
    """Generate every request in todo (n sequences for a request with n > 1), writing each request's
    record once all its choices finished: a success record, or an error record (to error_writer, the
    LineError appended to `failed`) when a generation failed. Returns the signal that stopped the
    run, or None when all finished."""
    error_writer = error_writer or writer
    failed = failed if failed is not None else []
    stats = getattr(generator, "stats", None)
    if stats is not None:
        progress.live_tokens = lambda: (
            max(stats.prompt_tokens, progress.prompt_tokens), max(stats.generated_tokens, progress.completion_tokens))
    model_name = cfg.model
    eos = tuple(tokenizer.eos_token_ids)

    with _Signals() as signals:

        def guarded(check):
            def stop_check(ids):
                if signals.received is not None:
                    raise StopRun
                return check(ids) if check is not None else False
            return stop_check

        slots: list[tuple[int, int]] = []  # generator key -> (request index, choice index)

        def feed():
            for index, r in enumerate(todo):
                for choice in range(max(1, r.n)):
                    if signals.received is not None:
                        return
                    params = _choice_params(r.params, choice)
                    check = make_stop_check(tokenizer, r.stop, params, r.skip_special_tokens)
                    slots.append((index, choice))
                    yield GenRequest(key=len(slots) - 1, prompt_ids=list(r.prompt_ids), params=params,
                                     stop_check=guarded(check), stops=tuple(r.stop),
                                     skip_special_tokens=r.skip_special_tokens)

        def finish(r: Request, outs: list) -> None:
            broken = next((o for o in outs if o.finish_reason == "error" or o.error), None)
            if broken is not None:
                err = LineError(r.line, r.id, r.shape, broken.error or "generation failed", r.input_hash, r.endpoint,
                                code=GENERATION_FAILED)
                error_writer.write(error_record(err))
                failed.append(err)
                progress.line_error(err.line, err.id, err.message)
                progress.add(ok=False)
                return
            choices = [_choice(tokenizer, r, o, eos) for o in outs]
            writer.write(completion_record(r, choices, outs[0].prompt_tokens, model_name))
            progress.add(ok=True, prompt_tokens=sum(o.prompt_tokens for o in outs),
                         completion_tokens=sum(c.completion_tokens for c in choices))

        waiting: dict[int, list] = {}  # request index -> its choices' outputs so far
        outputs = generator.generate(feed())
        try:
            for out in outputs:
                index, choice = slots[out.key]
                r = todo[index]
                got = waiting.setdefault(index, [None] * max(1, r.n))
                got[choice] = out
                if all(o is not None for o in got):
                    del waiting[index]
                    finish(r, got)
                if signals.received is not None:
                    break
        except StopRun:
            pass
        except KeyboardInterrupt:
            signals.received = signals.received or signal.SIGINT
        finally:
            close = getattr(outputs, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    pass
            progress.peak_gpu_bytes = _peak_gpu(stats)
        return signals.received


def _peak_gpu(stats) -> int:
    peak = getattr(stats, "peak_gpu_reserved_bytes", 0) or 0
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak = max(peak, torch.cuda.max_memory_reserved())
    except Exception:
        pass
    return peak


def _dry_run(cfg, progress, requests, errors, already_done: int) -> int:
    ready = [r for r in requests if r.params is not None]
    lens = [len(r.prompt_ids) for r in ready]
    new = sum(r.params.max_tokens for r in ready)
    for e in errors:
        progress.line_error(e.line, e.id, e.message)
    s = {
        "event": "dry_run",
        "lines": len(ready) + len(errors),
        "valid": len(ready),
        "errors": len(errors),
        "prompt_tokens": sum(lens),
        "max_prompt_tokens": max(lens, default=0),
        "max_new_tokens": new,
        "already_done": already_done,
    }
    if progress.mode == "json":
        progress.emit_json(s)
    elif progress.mode != "quiet":
        progress.emit(
            f"dry run: {s['lines']} requests, {s['valid']} valid, {s['errors']} with errors; "
            f"prompt tokens {s['prompt_tokens']:,} (longest {s['max_prompt_tokens']:,}); "
            f"up to {new:,} new tokens; {already_done} already done in {cfg.output}"
        )
    return EXIT_SOME_FAILED if errors else EXIT_OK
