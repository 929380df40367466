"""`offbatch run [MODEL_DIR] PROMPTS.jsonl -o RESULTS.jsonl`: generate a completion for every line."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from offbatch.cli.options import CpuMemoryOpt, DeviceOpt, DtypeOpt, GpuMemoryOpt, QuietOpt, byte_size
from offbatch.errors import ModelFolderError
from offbatch.jobs.params import ParamError, validate


class LogFormat(str, Enum):
    auto = "auto"
    text = "text"
    json = "json"


def _default_model_dir() -> Path:
    try:
        from offbatch.models.default_model import default_model_dir
    except ImportError as e:
        raise ModelFolderError(f"no model given and the embedded default model is unavailable ({e}); "
                               "give a model folder: offbatch run MODEL_DIR PROMPTS.jsonl -o OUT") from None
    return Path(default_model_dir())


def command(
    paths: Annotated[list[Path], typer.Argument(
        metavar="[MODEL_DIR] PROMPTS",
        help="The prompts JSONL file ('-' for stdin), optionally preceded by a model folder. "
             "With one path the model is --model, else the embedded SmolLM2-135M-Instruct.",
        show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="Results JSONL file ('-' for stdout). "
                                        "An existing file is resumed: requests already answered are skipped.")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Model folder (same as giving MODEL_DIR).")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Most new tokens per request.")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="0 is greedy.")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling mass, (0, 1].")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Sample from the k likeliest tokens (0: off).")] = None,
    min_p: Annotated[Optional[float], typer.Option("--min-p", help="Drop tokens below min_p x the top probability.")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option("--repetition-penalty", help="1 is off.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Base seed; each request's own seed derives from it "
                                                "and its id, so its text does not depend on batching.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable).")] = None,
    stop_token_id: Annotated[Optional[list[int]], typer.Option("--stop-token-id", help="Stop token id (repeatable).")] = None,
    ignore_eos: Annotated[Optional[bool], typer.Option("--ignore-eos", help="Do not stop at end-of-sequence tokens.")] = None,
    min_tokens: Annotated[Optional[int], typer.Option("--min-tokens", help="Generate at least this many tokens.")] = None,
    errors: Annotated[Optional[str], typer.Option("--errors", help="Write error records to this file instead of "
                                                  "the results file.")] = None,
    gpu_memory: GpuMemoryOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Most sequences generated together "
                                           "(reference engine; the streaming engine plans its wave).")] = 32,
    engine_kind: Annotated[Optional[str], typer.Option("--engine", help="streaming (module-based batching under "
                                                       "the GPU cap) or reference; default: streaming on a GPU, "
                                                       "reference on the CPU.")] = None,
    plan_file: Annotated[Optional[Path], typer.Option("--plan", help="Pin this plan (a `plan --json` file) instead "
                                                      "of planning (streaming engine).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check every line and count tokens; generate nothing.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start the results file afresh instead of resuming.")] = False,
    log_format: Annotated[LogFormat, typer.Option("--log-format", help="auto: a progress bar on a terminal, else "
                                                  "text lines; json: JSON lines for logs.")] = LogFormat.auto,
    log_interval: Annotated[float, typer.Option("--log-interval", min=0.1, help="Seconds between log lines "
                                                "(text and json formats).")] = 10.0,
    quiet: QuietOpt = False,
):
    """Generate a completion for every line of a JSONL prompts file.

    \b
    offbatch run PROMPTS.jsonl -o OUT.jsonl            embedded default model
    offbatch run MODEL_DIR PROMPTS.jsonl -o OUT.jsonl  a Hugging Face folder
    offbatch run -m MODEL_DIR PROMPTS.jsonl -o OUT.jsonl

    \b
    Lines: {"prompt": ...}, {"messages": [...]} or OpenAI Batch API lines.
    Sampling fields on a line (max_tokens, temperature, top_p, top_k, min_p,
    seed, stop, stop_token_ids, ignore_eos, repetition_penalty) override the
    flags, which override the model's generation_config.json.

    \b
    Rerunning the same command resumes: requests already answered in OUT are
    skipped; a changed request is redone and reported.

    \b
    Exit status: 0 all lines succeeded; 1 some lines failed (see their error
    records); 3 fatal error; 130 / 143 stopped by Ctrl-C / SIGTERM (finished
    results are kept: rerun to resume).
    """
    from offbatch.engine.select import EngineOptions, check_options, make_generator
    from offbatch.jobs.progress import Progress, pick_mode
    from offbatch.jobs.runner import RunConfig, run_job
    from offbatch.models.spec import load_spec
    from offbatch.models.tokenizer import load_tokenizer

    if len(paths) > 2:
        raise typer.BadParameter("give at most two paths: [MODEL_DIR] PROMPTS", param_hint="PATHS")
    if len(paths) == 2:
        if model is not None:
            raise typer.BadParameter("the model is given twice (MODEL_DIR and --model)", param_hint="--model")
        model, prompts = paths
    else:
        prompts = paths[0]
    model_dir = model if model is not None else _default_model_dir()

    flags = {
        "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
        "repetition_penalty": repetition_penalty, "seed": seed, "stop": stop or None,
        "stop_token_ids": stop_token_id or None, "ignore_eos": ignore_eos, "min_tokens": min_tokens,
    }
    for name, value in flags.items():
        if value is not None:
            try:
                validate(name, value)
            except ParamError as e:
                raise typer.BadParameter(str(e), param_hint="--" + name.replace("_", "-")) from None

    engine = EngineOptions(device=device, dtype=dtype, gpu_memory=byte_size(gpu_memory, "--gpu-memory"),
                           cpu_memory=byte_size(cpu_memory, "--cpu-memory"), max_batch=max_batch,
                           engine=engine_kind, plan_file=plan_file)
    progress = Progress(pick_mode(log_format.value, quiet), interval=log_interval)
    try:
        check_options(engine)
        spec = load_spec(model_dir)
        tokenizer = load_tokenizer(model_dir)
        cfg = RunConfig(model_dir=Path(model_dir), prompts=str(prompts), output=output, errors=errors, flags=flags,
                        engine=engine, dry_run=dry_run, overwrite=overwrite)
        code = run_job(cfg, progress, make_generator, tokenizer, spec)
    except KeyboardInterrupt:  # before generation started (during it, the runner stops cleanly itself)
        progress.stop()
        typer.echo("offbatch: interrupted", err=True)
        code = 130
    raise typer.Exit(code)
