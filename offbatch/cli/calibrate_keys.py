"""`offbatch calibrate-keys MODEL_DIR TEXT_OR_JSONL [-o FILE]`: the scales `--kv-balance` balances keys by
(offbatch/attention/key_balance.py), from calibration text, written beside the model; then what they do,
measured: perplexity and greedy agreement of a compressed KV format with and without them, against exact
attention, on an evaluation text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from offbatch.cli.options import CalibWindowsOpt, DeviceOpt, DtypeOpt, EvalWindowsOpt, NoEvalOpt, QuietOpt, WindowOpt


def command(
    model_dir: Annotated[Path, typer.Argument(help="The model folder.", show_default=False)],
    text: Annotated[Path, typer.Argument(help="Calibration text: a plain UTF-8 text file, or a JSONL prompts "
                                         "file.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Where to write the scales (default: "
                                                "MODEL_DIR/offbatch_key_scales.safetensors, where --kv-balance "
                                                "reads them).")] = None,
    windows: CalibWindowsOpt = 2,
    window: WindowOpt = 1024,
    kv: Annotated[str, typer.Option("--kv", help="The KV format whose quality is measured with and without "
                                    "the scales.")] = "int4",
    eval_text: Annotated[Optional[Path], typer.Option("--eval-text", help="Text to measure on (default: the "
                                                      "text `make setup` installs).")] = None,
    eval_windows: EvalWindowsOpt = 1,
    no_eval: NoEvalOpt = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the scales file.")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quiet: QuietOpt = False,
):
    """Calibrate balanced keys for compressed KV (`--kv-balance` on run, bench, eval-ppl): each key channel's
    largest |k| over the calibration text, per layer and KV head, normalised per head. Lossy in effect and
    model dependent (it rescues models with outlier key channels, can cost others): the command prints the
    --kv format's perplexity and greedy agreement with and without the scales."""
    from offbatch.attention.key_balance import KEY_SCALES_FILE, calibrate
    from offbatch.attention.lossy_reference import LossyCacheAttention
    from offbatch.cli.convert import _progress
    from offbatch.cli.eval_ppl import _kv_names
    from offbatch.cli.profile import calibration_windows
    from offbatch.engine.reference import ReferenceModel
    from offbatch.engine.select import resolve_device
    from offbatch.errors import OffbatchError
    from offbatch.models.spec import load_spec
    from offbatch.tools.model_hooks import check_output
    from offbatch.tools.quality import agreement_of, delta_pct, score

    [kv_name] = _kv_names([kv])
    if kv_name == "dense":
        raise OffbatchError("--kv dense is exact: measure a compressed KV format (int8, int4)")
    spec = load_spec(model_dir)
    out = out if out is not None else model_dir / KEY_SCALES_FILE
    check_output(out, overwrite)
    window = min(window, spec.max_position)
    calib, eval_file, wins = calibration_windows(model_dir, text, window, windows, eval_text, eval_windows, no_eval)
    device = resolve_device(device)
    model = ReferenceModel.load(model_dir, device=device, dtype=dtype)
    with _progress(not quiet) as bar:
        task = bar.add_task("calibrating keys", total=len(calib))
        scales = calibrate(model, [list(w.ids) for w in calib], lambda k: bar.update(task, completed=k + 1))
    scales.meta.update({"text": str(text), "window": window})
    quality = None
    if wins:
        rows = {}
        with _progress(not quiet) as bar:
            for label, att in (("exact", None), (kv_name, LossyCacheAttention(spec, kv_name)),
                               (f"{kv_name}, balanced keys", LossyCacheAttention(spec, kv_name, key_scales=scales))):
                ref = model if att is None else ReferenceModel(spec, model.modules, model.device, model.dtype, attention=att)
                task = bar.add_task(f"scoring {label}", total=len(wins))
                rows[label] = score(ref, wins, lambda k, task=task: bar.update(task, completed=k + 1))
        base = rows["exact"]
        quality = {"text": str(eval_file), "windows": len(wins), "window": window, "kv": kv_name,
                   "exact_perplexity": base.perplexity,
                   **{key: {"perplexity": rows[label].perplexity, "delta_pct": delta_pct(base, rows[label]),
                            "agreement": agreement_of(base, rows[label])}
                      for key, label in (("plain", kv_name), ("balanced", f"{kv_name}, balanced keys"))}}
        scales.meta["quality"] = quality
    scales.save(out)
    if quiet:
        return
    spread = max(float(s.max() / s.min()) for s in scales.scales.values())
    typer.echo(f"key scales of {len(scales.scales)} layers from {scales.meta['tokens']:,} tokens written to {out} "
               f"(largest over smallest channel scale in a head: {spread:.1f})")
    if quality is not None:
        p, b = quality["plain"], quality["balanced"]
        typer.echo(f"{kv_name} KV on {quality['text']} ({quality['windows']} windows of {window}): perplexity "
                   f"{quality['exact_perplexity']:.4f} exact -> {p['perplexity']:.4f} ({p['delta_pct']:+.2f}%, greedy "
                   f"agreement {100 * p['agreement']:.2f}%); with balanced keys {b['perplexity']:.4f} "
                   f"({b['delta_pct']:+.2f}%, {100 * b['agreement']:.2f}%)")
        if b["perplexity"] > p["perplexity"]:
            typer.echo("balanced keys score worse than plain ones on this model: leave --kv-balance off")
