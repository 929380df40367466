"""`offbatch profile MODEL_DIR TEXT_OR_JSONL [-o STATS]`: how often each FFN neuron is active over
calibration text (offbatch/tools/activity.py), written as safetensors beside the model; with a per-layer
summary and, for thresholded (non-ReLU) FFNs, what zeroing the inactive neurons costs: perplexity and
greedy agreement against the dense model on an evaluation text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from offbatch.cli.options import CalibWindowsOpt, DeviceOpt, DtypeOpt, EvalWindowsOpt, NoEvalOpt, QuietOpt, WindowOpt


def calibration_text(path: Path) -> str:
    """A plain text file, or a JSONL prompts file (its prompts' text, one after another)."""
    from offbatch.cli.eval_ppl import read_text_file
    from offbatch.errors import InputFileError

    text = read_text_file(path)
    if path.suffix != ".jsonl":
        return text
    parts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputFileError(f"{path} line {n}: not JSON ({e.msg})") from None
        prompt = obj.get("prompt") if isinstance(obj, dict) else None
        if isinstance(prompt, str):
            parts.append(prompt)
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            parts += [m["content"] for m in obj["messages"] if isinstance(m, dict) and isinstance(m.get("content"), str)]
    if not parts:
        raise InputFileError(f"{path}: no prompt text in it (lines with a \"prompt\" string or \"messages\")")
    return "\n\n".join(parts)


def calibration_windows(model_dir: Path, text: Path, window: int, windows: int, eval_text: Path | None,
                        eval_windows: int, no_eval: bool):
    """(calibration windows of the text, the evaluation text's file, its windows): the evaluation windows
    follow the calibration ones when both are the same text, so no token is scored that was calibrated on."""
    from offbatch.cli.convert import _eval_text
    from offbatch.errors import InputFileError
    from offbatch.models.tokenizer import load_tokenizer
    from offbatch.tools.quality import windows as make_windows

    tok = load_tokenizer(model_dir)
    ids = tok.encode(calibration_text(text), add_special_tokens=False)
    calib = make_windows(ids, window, None, windows)
    if not calib:
        raise InputFileError(f"{text} is {len(ids):,} tokens long, fewer than one window of {window}")
    eval_file, eval_body = _eval_text(eval_text, no_eval)
    wins = []
    if eval_body is not None:
        eids = tok.encode(eval_body, add_special_tokens=False)
        skip = len(calib) if eval_file is not None and Path(eval_file).resolve() == text.resolve() else 0
        wins = make_windows(eids, window, None, skip + eval_windows)[skip:]
    return calib, eval_file, wins


def command(
    model_dir: Annotated[Path, typer.Argument(help="The model folder.", show_default=False)],
    text: Annotated[Path, typer.Argument(help="Calibration text: a plain UTF-8 text file, or a JSONL prompts "
                                         "file.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Where to write the statistics (default: "
                                                "MODEL_DIR/offbatch_activity.safetensors).")] = None,
    sparsity: Annotated[float, typer.Option("--sparsity", min=0.0, max=0.99, help="Gated SiLU/GELU FFNs: the "
                                            "share of activations counted inactive (per-FFN threshold).")] = 0.5,
    windows: CalibWindowsOpt = 8,
    window: WindowOpt = 512,
    eval_text: Annotated[Optional[Path], typer.Option("--eval-text", help="Text to measure the thresholded "
                                                      "model on (default: the text `make setup` installs).")] = None,
    eval_windows: EvalWindowsOpt = 4,
    no_eval: NoEvalOpt = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the statistics file.")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quiet: QuietOpt = False,
):
    """Record how often each FFN neuron is active over calibration text (PowerInfer's hot and cold
    neurons): ReLU FFNs where the activation is not 0; gated SiLU/GELU FFNs where |activation| is above
    a per-FFN threshold at --sparsity (lossy: its perplexity and greedy agreement are measured)."""
    from offbatch.cli.convert import _progress
    from offbatch.engine.reference import ReferenceModel
    from offbatch.engine.select import resolve_device
    from offbatch.models.spec import load_spec
    from offbatch.tools.activity import STATS_FILE, profile, thresholded
    from offbatch.tools.model_hooks import check_output
    from offbatch.tools.quality import agreement_of, score

    spec = load_spec(model_dir)
    out = out if out is not None else model_dir / STATS_FILE
    check_output(out, overwrite)
    window = min(window, spec.max_position)
    calib, eval_file, wins = calibration_windows(model_dir, text, window, windows, eval_text, eval_windows, no_eval)
    device = resolve_device(device)

    model = ReferenceModel.load(model_dir, device=device, dtype=dtype)
    with _progress(not quiet) as bar:
        tasks = {}

        def step(tag, k):
            if tag not in tasks:
                tasks[tag] = bar.add_task(f"profiling ({tag})", total=len(calib))
            bar.update(tasks[tag], completed=k + 1)

        stats = profile(model, [list(w.ids) for w in calib], sparsity, step)
    stats.meta.update({"text": str(text), "window": window})
    quality = None
    if wins:
        with _progress(not quiet) as bar:
            t1 = bar.add_task("scoring dense", total=len(wins))
            dense = score(ReferenceModel.load(model_dir, device=device, dtype=dtype), wins,
                          lambda k: bar.update(t1, completed=k + 1))
            t2 = bar.add_task("scoring thresholded", total=len(wins))
            cut = score(thresholded(model, stats), wins, lambda k: bar.update(t2, completed=k + 1))
        quality = {"text": str(eval_file), "windows": len(wins), "window": window, "dense_perplexity": dense.perplexity,
                   "perplexity": cut.perplexity, "agreement": agreement_of(dense, cut)}
        stats.meta["quality"] = quality
    stats.save(out)
    if quiet:
        return
    _print_summary(stats, spec, out, quality)


def _print_summary(stats, spec, out: Path, quality: dict | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"FFN neuron activity over {stats.tokens:,} calibration tokens ({stats.meta['rule']})")
    for col in ("layer", "FFNs", "active (mean)", "neurons for 80% of activations"):
        table.add_column(col, justify="right")
    by_layer: dict[int, list] = {}
    for name, a in stats.activity.items():
        by_layer.setdefault(int(name.split(".")[1]), []).append(a)
    for layer in sorted(by_layer):
        acts = by_layer[layer]
        mean = sum(float(a.mean()) for a in acts) / len(acts)
        hot = []
        for a in acts:  # PowerInfer's skew: the share of neurons that carry 80% of the activations
            s = a.sort(descending=True).values
            c = s.cumsum(0)
            hot.append(float((c < 0.8 * c[-1]).sum() + 1) / a.numel() if c[-1] > 0 else 0.0)
        table.add_row(str(layer), str(len(acts)), f"{100 * mean:.1f}%", f"{100 * sum(hot) / len(hot):.1f}%")
    console = Console()
    console.print(table)
    console.print(f"overall sparsity {100 * stats.sparsity():.1f}%; written to {out}")
    if quality is not None:
        d, p = quality["dense_perplexity"], quality["perplexity"]
        console.print(f"thresholded FFNs on {quality['text']} ({quality['windows']} windows of {quality['window']}): "
                      f"perplexity {d:.4f} dense -> {p:.4f} ({100 * (p / d - 1):+.2f}%), greedy agreement "
                      f"{100 * quality['agreement']:.2f}%")
