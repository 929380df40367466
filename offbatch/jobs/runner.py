"""One `offbatch run`: read and check every line, resume from the output file, generate, write each
result the moment it finishes, and stop cleanly on Ctrl-C / SIGTERM.

Exit statuses: 0 every request succeeded; 1 some lines failed (their error records say why);
3 fatal (OffbatchError, raised to the CLI); 130 stopped by SIGINT, 143 by SIGTERM (after a clean
stop: every finished result is on disk and a rerun of the same command resumes).
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from offbatch.engine.api import GenRequest
from offbatch.errors import InputFileError
from offbatch.jobs.ledger import apply_resume, plan_resume
from offbatch.jobs.params import resolve_defaults
from offbatch.jobs.progress import Progress
from offbatch.jobs.requests import Request, find_duplicates, parse_line, prepare, read_input
from offbatch.jobs.results import error_record, ok_record
from offbatch.jobs.writer import ResultWriter
from offbatch.jobs.stops import final_text, make_stop_check

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass
class RunConfig:
    model_dir: Path
    prompts: str
    output: str
    errors: str | None = None
    flags: dict = field(default_factory=dict)  # sampling flags; None = not given
    engine: object = None  # offbatch.engine.select.EngineOptions
    dry_run: bool = False
    overwrite: bool = False


class StopRun(Exception):
    """Raised inside the generator (from a stop_check) to abandon unfinished sequences at once."""


class _Signals:
    """First SIGINT/SIGTERM: remember it; the generator loop stops at its next token. A second one
    raises KeyboardInterrupt for a hard stop (a torn last line is then possible; resume handles it)."""

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
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _same_file(a: str, b: str) -> bool:
    if a == "-" or b == "-":
        return False
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
    if _same_file(cfg.prompts, cfg.output):
        raise InputFileError(f"the output {cfg.output} is the prompts file; write the results somewhere else")
    if cfg.errors and (_same_file(cfg.errors, cfg.output) or _same_file(cfg.errors, cfg.prompts)):
        raise InputFileError("--errors must name a file of its own, not the prompts or results file")
    if cfg.output != "-" and Path(cfg.output).is_dir():
        raise InputFileError(f"the output {cfg.output} is a folder; give a file name")

    defaults = resolve_defaults(tokenizer.generation_defaults, cfg.flags)
    progress.info(f"model: {cfg.model_dir} ({spec.family}, {spec.num_layers} layers, context {spec.max_position})")
    progress.info(f"sampling (fields on a line override these): {defaults.describe()}",
                  defaults={k: defaults.values[k] for k in defaults.values}, sources=defaults.sources)
    for why in defaults.ignored:
        progress.info(f"generation_config.json: ignored {why}")

    requests, errors = load_requests(cfg)

    # Resume: which requests the output file already answers (the file is cut back in apply_resume).
    plan = None
    if cfg.output != "-" and not cfg.overwrite:
        plan = plan_resume(cfg.output, requests)
        if plan.torn:
            progress.warn(f"{cfg.output}: the last line was cut short (an earlier run died mid-write); it is redone")
        if plan.changed:
            shown = ", ".join(json.dumps(i) for i in plan.changed[:10]) + (" ..." if len(plan.changed) > 10 else "")
            progress.warn(f"{len(plan.changed)} request(s) changed since their results were written and are redone: "
                          f"{shown}")
        if plan.dropped_other:
            progress.warn(f"{cfg.output}: {plan.dropped_other} line(s) that are not results of this job were removed")
    done = plan.done if plan else set()
    todo = [r for r in requests if json.dumps(r.id) not in done]

    for r in todo if not cfg.dry_run else requests:
        err = prepare(r, tokenizer, defaults, spec.max_position, spec.vocab_size)
        if err is not None:
            errors.append(err)
    bad_lines = {e.line for e in errors}
    todo = [r for r in todo if r.line not in bad_lines]
    errors.sort(key=lambda e: e.line)

    if cfg.dry_run:
        return _dry_run(cfg, progress, requests, errors, len(done))

    # Load the model before touching any file: a folder with bad weights is one clear error, and the
    # output is left exactly as it was.
    if todo and cfg.engine is not None:  # the engine sizes its wave and KV from the job
        cfg.engine.prompt_lens = [len(r.prompt_ids) for r in todo]
        cfg.engine.gen_lens = [r.params.max_tokens for r in todo]
    generator = make_generator(cfg.model_dir, tokenizer, cfg.engine) if todo else None
    engine_plan = getattr(generator, "plan", None)  # the streaming engine's: where everything is, and why
    if engine_plan is not None:
        progress.info(engine_plan.summary(), plan=engine_plan.describe())

    if plan is not None and plan.changed_any:
        apply_resume(cfg.output, plan)
    if plan is not None and len(done):
        progress.info(f"resuming: {len(done)} request(s) already have results in {cfg.output}")

    progress.start(total=len(todo) + len(errors), skipped=len(done))
    writer = ResultWriter(cfg.output, truncate=cfg.overwrite)
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
                interrupted = _generate(cfg, progress, generator, tokenizer, todo, writer)
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


def _generate(cfg, progress, generator, tokenizer, todo: list[Request], writer) -> int | None:
    """Generate every request in todo, writing each result as it finishes. Returns the signal that
    stopped the run, or None when all finished."""
    stats = getattr(generator, "stats", None)
    if stats is not None:
        progress.live_tokens = lambda: (
            max(stats.prompt_tokens, progress.prompt_tokens), max(stats.generated_tokens, progress.completion_tokens))
    model_name = Path(cfg.model_dir).name
    eos = tuple(tokenizer.eos_token_ids)

    with _Signals() as signals:

        def guarded(check):
            def stop_check(ids):
                if signals.received is not None:
                    raise StopRun
                return check(ids) if check is not None else False
            return stop_check

        def feed():
            for key, r in enumerate(todo):
                if signals.received is not None:
                    return
                check = make_stop_check(tokenizer, r.stop, r.params)
                yield GenRequest(key=key, prompt_ids=list(r.prompt_ids), params=r.params, stop_check=guarded(check))

        outputs = generator.generate(feed())
        try:
            for out in outputs:
                r = todo[out.key]
                text, finish = final_text(tokenizer, out, r.stop, r.params, eos)
                writer.write(ok_record(r, text, finish, out.prompt_tokens, len(out.token_ids), model_name))
                progress.add(ok=True, prompt_tokens=out.prompt_tokens, completion_tokens=len(out.token_ids))
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
        progress.emit(json.dumps(s))
    elif progress.mode != "quiet":
        progress.emit(
            f"dry run: {s['lines']} requests, {s['valid']} valid, {s['errors']} with errors; "
            f"prompt tokens {s['prompt_tokens']:,} (longest {s['max_prompt_tokens']:,}); "
            f"up to {new:,} new tokens; {already_done} already done in {cfg.output}"
        )
    return EXIT_SOME_FAILED if errors else EXIT_OK
