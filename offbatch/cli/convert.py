"""`offbatch convert MODEL_DIR OUT_DIR --weights FORMAT`: a dense model folder written in a weight format
(offbatch/tools/convert.py), with its size before and after and its quality measured against the source:
perplexity of both and greedy-token agreement over windows of a real text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from offbatch.cli.options import DeviceOpt, DtypeOpt, QuietOpt
from offbatch.tools.convert import DEFAULT_EVAL_WINDOWS
from offbatch.units import format_bytes

HOW_TO_MEASURE = ("give --eval-text FILE (plain English text), or measure it later with "
                  "`offbatch eval-ppl MODEL_DIR TEXT_FILE --weights FORMAT`")


def _format(weights: str, group: int | None, skip: list[str] | None) -> str:
    from offbatch.tools.convert import FormatOptionError, format_name

    try:
        return format_name(weights, group, skip)
    except FormatOptionError as e:
        raise typer.BadParameter(str(e), param_hint=e.option) from None


def _pruned_format(prune: float, weights: str | None, method: str, calib: Path | None, group: int | None,
                   skip: list[str] | None) -> str:
    """The bitmap format --prune names (bitmap-50 for 0.5), refusing what this build cannot do."""
    from offbatch.tools.prune import METHODS

    if method not in METHODS:
        raise typer.BadParameter(f"{method!r}: --method takes {', '.join(METHODS)}", param_hint="--method")
    if calib is not None and method != "wanda":
        raise typer.BadParameter("only --method wanda calibrates", param_hint="--calib")
    percent = round(prune * 100)
    if abs(prune * 100 - percent) > 1e-6:
        raise typer.BadParameter(f"{prune}: prune a whole percent of the values (0.5, 0.55, ...)", param_hint="--prune")
    if group is not None or weights not in (None, "int8", "int4"):
        raise typer.BadParameter("pruned values are stored in bfloat16, or with --weights int8 / int4 in those "
                                 "(int4: groups of 32 kept values, asymmetric; no other format or group)",
                                 param_hint="--weights")
    return _format(f"bitmap-{percent}" + (f"-{weights}" if weights else ""), None, skip)


def _wanda(model_dir: Path, name: str, calib: Path | None, eval_text: Path | None, scored: int, device, dtype,
           quiet: bool):
    """Wanda's hook (tools/prune.py) and where its calibration came from: the first windows of --calib, or
    windows from the end of the evaluation text, after the ones quality is scored on."""
    from offbatch.cli.eval_ppl import read_text_file
    from offbatch.engine.select import resolve_device
    from offbatch.errors import InputFileError
    from offbatch.formats import KeepDense, get_format
    from offbatch.tools.convert import eval_windows as make_windows
    from offbatch.tools.prune import CALIB_WINDOWS, input_norms, pruner
    from offbatch.tools.texts import default_eval_text

    path = calib if calib is not None else (eval_text if eval_text is not None else default_eval_text())
    if path is None:
        raise typer.BadParameter("--method wanda needs calibration text: give --calib FILE", param_hint="--calib")
    ids, wins, window = make_windows(model_dir, read_text_file(path), 1 << 30)
    if calib is None:
        wins = wins[scored:][-CALIB_WINDOWS:]  # apart from the windows convert scores
    else:
        wins = wins[:CALIB_WINDOWS]
    if not wins:
        raise InputFileError(f"{path} has no window of {window} tokens for calibration"
                             + ("" if calib is not None else " beside the ones scored: give --calib FILE"))
    with _progress(not quiet) as bar:
        task = bar.add_task("calibrating (wanda)", total=len(wins))
        norms = input_norms(model_dir, [list(w.ids) for w in wins], resolve_device(device), dtype,
                            lambda k: bar.update(task, completed=k + 1))
    fmt = get_format(name)
    bitmap = fmt.inner if isinstance(fmt, KeepDense) else fmt  # bitmap-50+keep=down: the layers pruned are bitmap-50's
    return pruner(norms, bitmap.kept_values), {"text": str(path), "windows": len(wins), "window": window}


def _eval_text(eval_text: Path | None, no_eval: bool) -> tuple[Path | None, str | None]:
    """(the text file, its text) to measure quality on, or (None, None): --no-eval, or no text is known."""
    from offbatch.cli.eval_ppl import read_text_file
    from offbatch.tools.texts import default_eval_text

    if no_eval:
        return None, None
    path = eval_text if eval_text is not None else default_eval_text()
    if path is None:
        return None, None
    return path, read_text_file(path)


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True, disable=not (enabled and console.is_terminal))


def _print_sizes(summary) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary.out_dir}: {summary.format}")
    for col in ("module", "before", "after", "smaller"):
        table.add_column(col, justify="right" if col != "module" else "left")
    for kind, (before, after) in sorted(summary.by_kind.items(), key=lambda kv: -kv[1][0]):
        table.add_row(kind, format_bytes(before), format_bytes(after), f"{before / after:.2f}x" if after else "-")
    table.add_row("total", format_bytes(summary.source_bytes), format_bytes(summary.bytes), f"{summary.ratio:.2f}x")
    console = Console()
    console.print(table)
    console.print(f"{summary.compressed} of {summary.tensors} tensors stored in {summary.format}, the rest as they "
                  f"were; {format_bytes(summary.source_bytes)} -> {format_bytes(summary.bytes)} "
                  f"({summary.ratio:.2f}x smaller) in {summary.seconds:.1f} s")


def _print_quality(report: dict) -> None:
    dense, conv = report["results"]
    typer.echo(f"quality on {report['text_file']} ({report['windows']} windows of {report['window']} tokens, "
               f"{report['scored_tokens']:,} tokens scored; {report['device']}, {report['dtype']}): perplexity "
               f"{dense['perplexity']:.4f} dense -> {conv['perplexity']:.4f} {report['format']}, greedy agreement "
               f"{100 * conv['agreement']:.2f}% (written to {report['report_file']})")


def command(
    model_dir: Annotated[Path, typer.Argument(help="The dense model folder to convert.", show_default=False)],
    out_dir: Annotated[Path, typer.Argument(help="The folder to write.", show_default=False)],
    weights: Annotated[Optional[str], typer.Option("--weights", help="The weight format: int8, int8-g32, int4, "
                                                   "int4-asym, int4-g32, int4-asym-g128, nf4, fp4, ... (with --prune: "
                                                   "the kept values in bfloat16, or int8 / int4)",
                                                   show_default=False)] = None,
    prune: Annotated[Optional[float], typer.Option("--prune", min=0.01, max=0.99, help="Prune this share of each "
                                                   "bulk weight's values (0.5: half of every row) and store the rest "
                                                   "in the bitmap format (bitmap-50).")] = None,
    method: Annotated[str, typer.Option("--method", help="With --prune: magnitude (largest |W| of each row) or "
                                        "wanda (largest |W| x input norm, over calibration text).")] = "magnitude",
    calib: Annotated[Optional[Path], typer.Option("--calib", help="With --method wanda: plain text to calibrate on "
                                                  "(default: the end of the evaluation text, apart from the windows "
                                                  "scored).")] = None,
    group: Annotated[Optional[int], typer.Option("--group", min=1, help="Inputs per group for int4 / int4-asym / "
                                                 "int8 (int4 --group 32 is int4-g32).")] = None,
    skip: Annotated[Optional[list[str]], typer.Option("--skip", help="Layers to keep dense, comma-separated or "
                                                      "repeated: q, k, v, o, gate, up, down, attn, ffn, experts, "
                                                      "shared (embed, head and router are dense in every format).")] = None,
    eval_text: Annotated[Optional[Path], typer.Option("--eval-text", help="Plain UTF-8 text to measure quality on "
                                                      "(default: $OFFBATCH_EVAL_TEXT, else the text `make setup` "
                                                      "installs).")] = None,
    eval_windows: Annotated[int, typer.Option("--eval-windows", min=1, help="Windows of 512 tokens to score "
                                              "(from the start of the text).")] = DEFAULT_EVAL_WINDOWS,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Convert only; do not measure quality.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT_DIR if it exists.")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quiet: QuietOpt = False,
):
    """Write a dense model folder's weights in a weight format, as a folder `run`, `plan`, `bench` and
    `inspect` read like any other; print the size before and after, and the quality: perplexity of both
    models and how often their greedy tokens agree, over windows of a real text (also written to
    OUT_DIR/offbatch_quality.json). The folder is written atomically."""
    from offbatch.engine.select import resolve_device
    from offbatch.tools.convert import check_paths, check_source, convert, measure_quality, write_report
    from offbatch.tools.convert import eval_windows as make_windows

    name = _pruned_format(prune, weights, method, calib, group, skip) if prune is not None else None
    if name is None:
        if weights is None:
            raise typer.BadParameter("give the weight format (or --prune)", param_hint="--weights")
        name = _format(weights, group, skip)
    # Everything that can be refused is refused before the work starts: the folders, the text.
    check_source(model_dir)
    check_paths(model_dir, out_dir, overwrite)
    text_file, text = _eval_text(eval_text, no_eval)
    wins = None
    if text is not None:
        device = resolve_device(device)
        ids, wins, window = make_windows(model_dir, text, eval_windows)
        if not wins:
            from offbatch.errors import InputFileError

            raise InputFileError(f"{text_file} is {len(ids):,} tokens long, fewer than one window of {window}: "
                                 "give a longer --eval-text")
    hook, about = None, {}
    if prune is not None:
        about = {"pruned": prune, "method": method}
        if method == "wanda":
            hook, about["calibration"] = _wanda(model_dir, name, calib, eval_text, eval_windows, device, dtype, quiet)

    with _progress(not quiet) as bar:
        task = bar.add_task(f"converting to {name}", total=None)
        summary = convert(model_dir, out_dir, name, overwrite=overwrite, prune=hook, about=about,
                          progress=lambda done, total: bar.update(task, completed=done, total=total))
    if not quiet:
        _print_sizes(summary)
    if wins is None:
        if not quiet and not no_eval:
            typer.echo(f"quality not measured: no evaluation text; {HOW_TO_MEASURE}")
        return
    import torch

    try:
        with _progress(not quiet) as bar:
            tasks = {w: bar.add_task(f"scoring {w}", total=len(wins)) for w in ("dense", name)}
            quality = measure_quality(model_dir, out_dir, wins, name, device, dtype,
                                      lambda which, done, total: bar.update(tasks[which], completed=done))
    except torch.OutOfMemoryError:
        # The folder is written; only the measurement (the whole model on one device) did not fit.
        typer.echo(f"quality not measured: the model does not fit in {device}'s memory for the reference forward; "
                   f"{out_dir} is written. Measure it with --device cpu: `offbatch eval-ppl {model_dir} TEXT "
                   f"--weights {name} --device cpu`", err=True)
        raise typer.Exit(0) from None
    report = {"source": str(model_dir), "out_dir": str(out_dir), "format": name, "text_file": str(text_file),
              "text_tokens": len(ids), "bytes": {"source": summary.source_bytes, "converted": summary.bytes},
              **quality}
    report["report_file"] = str(write_report(out_dir, report))
    if not quiet:
        _print_quality(report)
