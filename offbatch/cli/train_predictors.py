"""`offbatch train-predictors MODEL_DIR TEXT_OR_JSONL`: a low-rank activity predictor per dense FFN layer
(offbatch/tools/predictor.py), saved beside the model, with its recall and predicted sparsity per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from offbatch.cli.options import CalibWindowsOpt, DeviceOpt, DtypeOpt, QuietOpt, WindowOpt


def command(
    model_dir: Annotated[Path, typer.Argument(help="The model folder.", show_default=False)],
    text: Annotated[Path, typer.Argument(help="Calibration text: a plain UTF-8 text file, or a JSONL prompts "
                                         "file.", show_default=False)],
    stats: Annotated[Optional[Path], typer.Option("--stats", help="`offbatch profile`'s statistics (default: "
                                                  "MODEL_DIR/offbatch_activity.safetensors; without one, gated FFNs "
                                                  "are thresholded here at --sparsity).")] = None,
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Where to write the predictors (default: "
                                                "MODEL_DIR/offbatch_predictors.safetensors).")] = None,
    rank: Annotated[int, typer.Option("--rank", min=1, max=4096, help="Hidden width of each predictor.")] = 64,
    recall: Annotated[float, typer.Option("--recall", min=0.5, max=0.999, help="Share of the active neurons the "
                                          "cut keeps (chosen on held-out tokens).")] = 0.9,
    sparsity: Annotated[float, typer.Option("--sparsity", min=0.0, max=0.99, help="Without statistics: the share "
                                            "of a gated FFN's activations counted inactive.")] = 0.5,
    windows: CalibWindowsOpt = 8,
    window: WindowOpt = 512,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the training tokens.")] = 30,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the predictors file.")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quiet: QuietOpt = False,
):
    """Train a small low-rank MLP per dense FFN layer that predicts, from the layer's input, which neurons
    will be active (as `offbatch profile` counts them); print each one's recall and predicted sparsity on
    calibration tokens it was not trained on."""
    from offbatch.cli.convert import _progress
    from offbatch.cli.profile import calibration_text
    from offbatch.engine.reference import ReferenceModel
    from offbatch.engine.select import resolve_device
    from offbatch.errors import InputFileError
    from offbatch.models.spec import load_spec
    from offbatch.models.tokenizer import load_tokenizer
    from offbatch.tools.activity import STATS_FILE, load_stats, profile
    from offbatch.tools.model_hooks import check_output
    from offbatch.tools.predictor import PREDICTORS_FILE, collect, save_predictors, train_one
    from offbatch.tools.quality import windows as make_windows

    spec = load_spec(model_dir)
    out = out if out is not None else model_dir / PREDICTORS_FILE
    check_output(out, overwrite)
    window = min(window, spec.max_position)
    ids = load_tokenizer(model_dir).encode(calibration_text(text), add_special_tokens=False)
    calib = [list(w.ids) for w in make_windows(ids, window, None, windows)]
    if not calib:
        raise InputFileError(f"{text} is {len(ids):,} tokens long, fewer than one window of {window}")
    model = ReferenceModel.load(model_dir, device=resolve_device(device), dtype=dtype)
    stats_file = stats if stats is not None else model_dir / STATS_FILE
    if stats is not None or stats_file.exists():
        thresholds = load_stats(stats_file).threshold
    else:
        thresholds = profile(model, calib, sparsity).threshold
    data = collect(model, calib, thresholds)
    if not data:
        raise InputFileError(f"{model_dir} has no dense FFN layer to predict (MoE experts see their own tokens)")
    predictors = {}
    with _progress(not quiet) as bar:
        task = bar.add_task("training predictors", total=len(data))
        for k, (name, (x, y)) in enumerate(data.items()):
            predictors[name] = train_one(x, y, rank, recall, epochs)
            bar.update(task, completed=k + 1)
    save_predictors(out, predictors, {"rank": rank, "recall_target": recall, "text": str(text),
                                      "tokens": sum(len(c) for c in calib), "epochs": epochs})
    if quiet:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"activity predictors (rank {rank}), measured on held-out calibration tokens")
    for col in ("FFN", "recall", "predicted inactive", "truly inactive"):
        table.add_column(col, justify="right")
    for name, p in predictors.items():
        m = p.metrics
        table.add_row(name, f"{100 * m['recall']:.1f}%", f"{100 * m['predicted_sparsity']:.1f}%",
                      f"{100 * m['sparsity']:.1f}%")
    console = Console()
    console.print(table)
    console.print(f"written to {out}")
