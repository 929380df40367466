"""`offbatch eval-ppl MODEL TEXT_FILE`: perplexity of a model over fixed token windows of a plain-text
file, and with --weights FORMAT (repeatable) the same for the model packed in each format, with its
greedy-token agreement against the model as its folder stores it (dense, or the format `offbatch convert`
wrote); offbatch/tools/quality.py does the arithmetic."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from offbatch.cli.options import DeviceOpt, DtypeOpt, JsonOpt
from offbatch.errors import InputFileError, ModelFolderError, OffbatchError
from offbatch.models import files

MAX_TEXT_BYTES = 256 << 20  # a text to score (a whole book is a few hundred kB)


def read_text_file(path: Path) -> str:
    """The whole file as UTF-8 text, or one InputFileError: missing, not a regular file (a FIFO or a device
    would block or never end), over MAX_TEXT_BYTES, unreadable, not UTF-8, empty."""
    if not files.exists(path):
        raise InputFileError(f"{path}: no such text file")
    try:
        data = files.read_bytes(path, MAX_TEXT_BYTES)
    except ModelFolderError as e:
        raise InputFileError(str(e)) from None
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is not text
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputFileError(f"{path} is not UTF-8 text (byte {e.start}, line {line}): eval-ppl reads plain "
                             "UTF-8 text") from None
    if not text.strip():
        raise InputFileError(f"{path} is empty: eval-ppl needs text to score")
    return text


def load_model(model_dir: Path, device: str, dtype: str | None, weights: str):
    """The reference model (every weight resident on `device`), its weights packed in `weights`."""
    from offbatch.engine.reference import ReferenceModel

    # On the CPU a format is decoded once at load: the same products as at each use, 3x faster there.
    return ReferenceModel.load(model_dir, device=device, dtype=dtype, weights=weights, expand=device == "cpu")


def _check_format(weights: str | None) -> None:
    from offbatch.formats import format_names, known_format

    if weights is not None and not known_format(weights):
        raise typer.BadParameter(f"{weights!r} is not a weight format (known: {format_names()})",
                                 param_hint="--weights")


def _stored_format(model_dir: Path) -> str:
    from offbatch.models.converted import folder_format
    from offbatch.models.spec import read_config

    return folder_format(read_config(model_dir)).name


def _windows(text: str, text_file: Path, model_dir: Path, window: int, stride: int | None,
             max_windows: int | None):
    from offbatch.models.spec import load_spec
    from offbatch.models.tokenizer import load_tokenizer
    from offbatch.tools.quality import windows

    spec = load_spec(model_dir)
    if window > spec.max_position:
        raise OffbatchError(f"--window {window} is longer than the model's context ({spec.max_position} "
                            "positions, max_position_embeddings): use a smaller --window")
    # The raw text's tokens, no special tokens: every window is plain text.
    ids = load_tokenizer(model_dir).encode(text, add_special_tokens=False)
    wins = windows(ids, window, stride, max_windows)
    if not wins:
        raise InputFileError(f"{text_file} is {len(ids):,} tokens long, fewer than one --window of {window}: "
                             "give a longer text or a smaller --window")
    return ids, wins


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True, disable=not (enabled and console.is_terminal))


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['model']}  on  {report['text_file']}")
    for col in ("weights", "perplexity", "NLL (nats/token)", "greedy agreement", "seconds"):
        table.add_column(col, justify="right")
    for r in report["results"]:
        agree = "-" if r.get("agreement") is None else f"{100 * r['agreement']:.2f}%"
        table.add_row(r["weights"], f"{r['perplexity']:.4f}", f"{r['nll']:.5f}", agree, f"{r['seconds']:.1f}")
    console = Console()
    console.print(table)
    console.print(f"{report['windows']} windows of {report['window']} tokens (stride {report['stride']}), "
                  f"{report['scored_tokens']:,} tokens scored of {report['text_tokens']:,}; "
                  f"{report['device']}, {report['dtype']}")


def command(
    model: Annotated[Path, typer.Argument(help="Model folder or .gguf file (imported once into the cache).",
                                          show_default=False)],
    text_file: Annotated[Path, typer.Argument(help="Plain UTF-8 text to score.", show_default=False)],
    window: Annotated[int, typer.Option("--window", min=2, help="Tokens per window.")] = 512,
    stride: Annotated[Optional[int], typer.Option("--stride", min=1, help="Tokens between window starts "
                                                  "(default: --window, no overlap).")] = None,
    max_windows: Annotated[Optional[int], typer.Option("--max-windows", min=1, help="Score at most this many "
                                                       "windows (from the start of the text).")] = None,
    weights: Annotated[Optional[list[str]], typer.Option("--weights", help="Also score the model packed in this "
                                                         "weight format, and its greedy agreement with the model as "
                                                         "stored (repeatable: one table, the base scored once).")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    as_json: JsonOpt = False,
):
    """Perplexity of a model over fixed token windows of a text; with --weights, against dense."""
    from offbatch.engine.select import resolve_device
    from offbatch.tools.default_model import model_folder
    from offbatch.tools.quality import agreement_of, score

    for name in weights or ():
        _check_format(name)
    device = resolve_device(device)
    text = read_text_file(text_file)  # before a GGUF model is imported: a bad text fails at once
    model_dir = Path(model_folder(model, dtype))
    ids, wins = _windows(text, text_file, model_dir, window, stride, max_windows)
    stored = _stored_format(model_dir)  # the base: the model as its folder stores it (dense, or converted)
    names = [stored] + [n for n in dict.fromkeys(weights or ()) if n != stored]
    results, dense_scores, used_dtype = [], None, dtype
    with _progress(not as_json) as bar:
        for name in names:  # one model in memory at a time: a score keeps only the greedy tokens
            t0 = time.perf_counter()
            ref = load_model(model_dir, device, dtype, name)
            used_dtype = str(ref.dtype).replace("torch.", "")
            task = bar.add_task(f"{name}", total=len(wins))
            s = score(ref, wins, on_window=lambda k, task=task: bar.advance(task))
            del ref
            row = {"weights": name, "perplexity": s.perplexity, "nll": s.nll, "tokens": s.tokens,
                   "seconds": time.perf_counter() - t0}
            if dense_scores is None:
                dense_scores = s
            else:
                row["agreement"] = agreement_of(dense_scores, s)
            results.append(row)
    report = {"model": str(model), "model_dir": str(model_dir), "text_file": str(text_file),
              "text_tokens": len(ids), "window": window, "stride": stride or window, "windows": len(wins),
              "scored_tokens": dense_scores.tokens, "device": device, "dtype": used_dtype, "results": results}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_table(report)
