"""`offbatch run [MODEL_DIR] PROMPTS.jsonl -o RESULTS.jsonl`: generate a completion for every line."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from offbatch.cli.options import (CpuMemoryOpt, DeviceOpt, DtypeOpt, FfnOpt, GpuMemoryOpt, HgcaOpt, KvBalanceOpt, KvOpt,
                                  PredictorsOpt,
                                  QuietOpt, RayOpt, SplitStreamOpt, WeightsOpt, WorkersOpt, byte_size)
from offbatch.jobs.params import ParamError, validate


class LogFormat(str, Enum):
    auto = "auto"
    text = "text"
    json = "json"


def _gguf_stem(model: Path | None) -> str | None:
    """A GGUF file's name without .gguf: what its results call the model (not the cache folder's name)."""
    return model.name[: -len(".gguf")] if model is not None and model.name.lower().endswith(".gguf") else None


def _model_folder(model: Path | None, dtype: str | None, progress) -> Path:
    """The folder to run: MODEL_DIR as it is, a .gguf file imported once into the cache, or (none given)
    the embedded default model. A hub id or a path that does not exist is one clear error: offbatch
    never downloads."""
    from offbatch.tools.default_model import model_folder

    return Path(model_folder(model, dtype, announce=progress.info))


def _refuse_model_as_prompts(prompts: Path) -> None:
    """`offbatch run model.gguf -o OUT` (the prompts forgotten) would read the model's bytes as lines."""
    from offbatch.tools.default_model import is_gguf_file

    if str(prompts) != "-" and is_gguf_file(prompts):
        raise typer.BadParameter(f"{prompts} is a GGUF model, not a prompts file; give both: "
                                 "offbatch run MODEL.gguf PROMPTS.jsonl -o OUT", param_hint="PROMPTS")


def command(
    paths: Annotated[list[Path], typer.Argument(
        metavar="[MODEL] PROMPTS",
        help="The prompts JSONL file ('-' for stdin), optionally preceded by the model: a Hugging Face "
             "folder or a .gguf file (imported once into the cache). With one path the model is --model, "
             "else the embedded SmolLM2-135M-Instruct. Never a model hub id: offbatch does not download.",
        show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="Results JSONL file ('-' for stdout). "
                                        "An existing file is resumed: requests already answered are skipped.")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Model folder or .gguf file (same as giving MODEL).")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Most new tokens per request.")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="0 is greedy.")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling mass, (0, 1].")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Sample from the k likeliest tokens (0: off).")] = None,
    min_p: Annotated[Optional[float], typer.Option("--min-p", help="Drop tokens below min_p x the top probability.")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option("--repetition-penalty", help="1 is off.")] = None,
    presence_penalty: Annotated[Optional[float], typer.Option("--presence-penalty", help="OpenAI's, in [-2, 2]: "
                                                              "subtracted once from each token already generated.")] = None,
    frequency_penalty: Annotated[Optional[float], typer.Option("--frequency-penalty", help="OpenAI's, in [-2, 2]: "
                                                               "subtracted per occurrence of a generated token.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Base seed; each request's own seed derives from it "
                                                "and its id, so its text does not depend on batching.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable).")] = None,
    stop_token_id: Annotated[Optional[list[int]], typer.Option("--stop-token-id", help="Stop token id (repeatable).")] = None,
    ignore_eos: Annotated[Optional[bool], typer.Option("--ignore-eos", help="Do not stop at end-of-sequence tokens.")] = None,
    min_tokens: Annotated[Optional[int], typer.Option("--min-tokens", help="Generate at least this many tokens.")] = None,
    errors: Annotated[Optional[str], typer.Option("--errors", help="Write error records to this file instead of "
                                                  "the results file.")] = None,
    gpu_memory: GpuMemoryOpt = None,
    weights: WeightsOpt = None,
    kv: KvOpt = None,
    hgca: HgcaOpt = None,
    kv_balance: KvBalanceOpt = False,
    ffn: FfnOpt = None,
    predictors: PredictorsOpt = None,
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
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace whatever OUT holds that is not this job's "
                                            "results (other files, other jobs, other settings); this job's own "
                                            "results are kept, so an interrupted --overwrite run resumes.")] = False,
    redo_changed: Annotated[bool, typer.Option("--redo-changed", help="Redo the requests whose results in OUT were "
                                               "made with another model, dtype or settings.")] = False,
    keep_changed: Annotated[bool, typer.Option("--keep-changed", help="Keep the results in OUT made with another "
                                               "model, dtype or settings as they are (and count them as this "
                                               "job's from now on).")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="A line with an unknown field (a typo such as "
                                         "temprature) is an error record, not a warning.")] = False,
    log_format: Annotated[LogFormat, typer.Option("--log-format", help="auto: a progress bar on a terminal, else "
                                                  "text lines; json: JSON lines for logs.")] = LogFormat.auto,
    log_interval: Annotated[float, typer.Option("--log-interval", min=0.1, max=86400.0,
                                                help="Seconds between log lines "
                                                "(text and json formats).")] = 10.0,
    quiet: QuietOpt = False,
    ray_address: RayOpt = None,
    workers: WorkersOpt = None,
    split_stream: SplitStreamOpt = 1,
):
    """Generate a completion for every line of a JSONL prompts file.

    \b
    offbatch run PROMPTS.jsonl -o OUT.jsonl            embedded default model
    offbatch run MODEL_DIR PROMPTS.jsonl -o OUT.jsonl  a Hugging Face folder
    offbatch run MODEL.gguf PROMPTS.jsonl -o OUT.jsonl a GGUF file, imported once
    offbatch run -m MODEL_DIR PROMPTS.jsonl -o OUT.jsonl

    \b
    Lines: {"prompt": ...}, {"messages": [...]} or OpenAI Batch API lines.
    Sampling fields on a line (max_tokens, temperature, top_p, top_k, min_p,
    seed, stop, stop_token_ids, ignore_eos, repetition_penalty,
    presence_penalty, frequency_penalty, logit_bias) override the
    flags, which override the model's generation_config.json.

    \b
    Rerunning the same command resumes: requests already answered in OUT are
    skipped; a changed request is redone and reported. OUT is locked while a
    run writes it (a second run fails at once). Results made with another
    model, dtype or settings stop the run with an error naming what changed:
    add --redo-changed or --keep-changed. A file that is not this job's
    results is refused: --overwrite replaces it.

    \b
    Exit status: 0 all lines succeeded; 1 some lines failed (see their error
    records); 2 usage error; 3 fatal error; 4 internal error (a bug; the
    traceback with OFFBATCH_DEBUG=1); 130 / 143 / 129 stopped by Ctrl-C /
    SIGTERM / SIGHUP (finished results are kept: rerun to resume); 141 stdout
    closed by its reader (-o - | head).
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
    _refuse_model_as_prompts(prompts)
    if ray_address is not None and not ray_address.strip():
        raise typer.BadParameter("empty: give the cluster's address (HOST:PORT, as `ray start --head` prints it) or auto",
                                 param_hint="--ray")
    scaled = ray_address is not None or workers is not None
    if scaled:  # Ray Data must be there before anything is read or written
        from offbatch.scale import require_ray

        require_ray()

    flags = {
        "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
        "repetition_penalty": repetition_penalty, "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty, "seed": seed, "stop": stop or None,
        "stop_token_ids": stop_token_id or None, "ignore_eos": ignore_eos, "min_tokens": min_tokens,
    }
    if redo_changed and keep_changed:
        raise typer.BadParameter("give one of --redo-changed and --keep-changed", param_hint="--keep-changed")
    if overwrite and keep_changed:
        raise typer.BadParameter("--overwrite replaces results made with other settings; --keep-changed keeps "
                                 "them: give one", param_hint="--keep-changed")
    for name, value in flags.items():
        if value is not None:
            try:
                validate(name, value)
            except ParamError as e:
                raise typer.BadParameter(str(e), param_hint="--" + name.replace("_", "-")) from None
    if engine_kind not in (None, "streaming", "reference"):
        raise typer.BadParameter(f"{engine_kind!r}: use streaming or reference", param_hint="--engine")

    engine = EngineOptions(device=device, dtype=dtype, gpu_memory=byte_size(gpu_memory, "--gpu-memory"),
                           cpu_memory=byte_size(cpu_memory, "--cpu-memory"), max_batch=max_batch,
                           engine=engine_kind, plan_file=plan_file, weights=weights, kv=kv, hgca=hgca,
                           ffn=ffn, predictors=predictors, kv_balance=kv_balance, split_stream=split_stream)
    progress = Progress(pick_mode(log_format.value, quiet), interval=log_interval)
    try:
        if scaled:  # each worker checks the options on its own device (scale/worker.py)
            from offbatch.scale.cli import scaled_generator

            make = scaled_generator(ray_address, workers, device, progress, split_stream)
        else:
            device, _, _ = check_options(engine)
            progress.use_device(device)
            make = make_generator
        model_dir = _model_folder(model, dtype, progress)
        spec = load_spec(model_dir)
        tokenizer = load_tokenizer(model_dir)
        cfg = RunConfig(model_dir=Path(model_dir), prompts=str(prompts), output=output, errors=errors, flags=flags,
                        engine=engine, dry_run=dry_run, overwrite=overwrite,
                        redo_changed=redo_changed, keep_changed=keep_changed,
                        strict=strict, model_name=_gguf_stem(model))
        code = run_job(cfg, progress, make, tokenizer, spec)
    except KeyboardInterrupt:  # before generation started (during it, the runner stops cleanly itself)
        progress.stop()
        typer.echo("offbatch: interrupted", err=True)
        code = 130
    raise typer.Exit(code)
