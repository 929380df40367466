"""`offbatch eval-ppl MODEL TEXT_FILE`: perplexity of a model over fixed token windows of a plain-text
file, and with --weights FORMAT (repeatable) the same for the model packed in each format, with its
greedy-token agreement against the model as its folder stores it (dense, or the format `offbatch convert`
wrote); --kv FORMAT and --hgca SETTING (repeatable) score the lossy attention options the same way, in
their decode view (attention/lossy_reference.py); offbatch/tools/quality.py does the arithmetic.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from offbatch.cli.options import DeviceOpt, DtypeOpt, FfnOpt, JsonOpt, KvBalanceOpt, PredictorsOpt, WindowOpt
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


def _kv_names(kvs: list[str] | None) -> list[str]:
    """The registered names of the --kv formats; an unknown one: a usage error."""
    from offbatch.offload.kv import kv_format_name, kv_format_names

    out = []
    for name in kvs or ():
        try:
            out.append(kv_format_name(name))
        except KeyError:
            raise typer.BadParameter(f"{name!r} is not a KV format (known: {', '.join(kv_format_names())}; "
                                     "bf16 = dense)", param_hint="--kv") from None
    return out


def _hgca_settings(texts: list[str] | None) -> list:
    """The parsed --hgca settings; a bad one: a usage error."""
    from offbatch.attention.hgca_setting import HGCASetting

    out = []
    for text in texts or ():
        try:
            out.append(HGCASetting.parse(text))
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--hgca") from None
    return out


def _check_hgca_applies(model_dir: Path, hgcas: list) -> None:
    """HGCA on a sliding-window model: one clear error before anything is scored."""
    from offbatch.models.spec import load_spec

    if hgcas:
        try:
            hgcas[0].check_model(load_spec(model_dir).sliding_window)
        except ValueError as e:
            raise OffbatchError(f"--hgca: {e}") from None


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

    from offbatch.attention.hgca_setting import HGCASetting

    table = Table(title=f"{report['model']}  on  {report['text_file']}")
    # KV and attention columns only when a variant changes them: a plain run's table stays as it was.
    lossy_attention = any(r["kv"] != "dense" or r["hgca"] is not None for r in report["results"])
    hybrid = any(r.get("ffn") == "hybrid" for r in report["results"])
    cols = ["weights"] + (["KV", "attention"] if lossy_attention else []) + (["FFN"] if hybrid else [])
    for col in cols + ["perplexity", "vs base", "NLL (nats/token)", "greedy agreement", "seconds"]:
        table.add_column(col, justify="right")
    for r in report["results"]:
        agree = "-" if r.get("agreement") is None else f"{100 * r['agreement']:.2f}%"
        delta = "-" if r.get("delta_pct") is None else f"{r['delta_pct']:+.2f}%"
        settings = [r["weights"]]
        if lossy_attention:
            settings += [r["kv"] + (", balanced keys" if r.get("kv_balance") else ""),
                         "full" if r["hgca"] is None else HGCASetting(**r["hgca"]).short()]
        if hybrid:
            settings += ["dense" if r.get("ffn") != "hybrid" else f"hybrid, {100 * r['hot_fraction']:g}% hot"]
        table.add_row(*settings, f"{r['perplexity']:.4f}", delta, f"{r['nll']:.5f}", agree, f"{r['seconds']:.1f}")
    console = Console()
    console.print(table)
    console.print(f"{report['windows']} windows of {report['window']} tokens (stride {report['stride']}), "
                  f"{report['scored_tokens']:,} tokens scored of {report['text_tokens']:,}; "
                  f"{report['device']}, {report['dtype']}")
    if lossy_attention:
        console.print("KV formats and HGCA as a decode step sees them (every position; the engine's prompt "
                      "prefill stays exact)")


def _score_variants(todo: list, model_dir: Path, device: str, dtype: str | None, wins: list, bar, neurons=None,
                    key_scales=None):
    """Score each variant (tools/quality.variants' order): its report rows, the base's scores, the dtype.
    Variants of the base weights share the base's modules; a weight format is loaded once the base is
    dropped, so one model at a time is in memory (a score keeps only the greedy tokens)."""
    from offbatch.attention.lossy_reference import LossyCacheAttention
    from offbatch.engine.reference import ReferenceModel
    from offbatch.tools.quality import agreement_of, delta_pct, score

    results, base, base_scores, used_dtype = [], None, None, dtype
    for v in todo:
        t0 = time.perf_counter()
        if v.weights == todo[0].weights:  # the base and its KV/HGCA variants (first in order) share it
            if base is None:
                base = load_model(model_dir, device, dtype, v.weights)
            ref = base
        else:
            base = None  # done with: one model in memory
            ref = load_model(model_dir, device, dtype, v.weights)
        used_dtype = str(ref.dtype).replace("torch.", "")
        if v.kv != "dense" or v.hgca is not None:
            ref = ReferenceModel(ref.spec, ref.modules, ref.device, ref.dtype,
                                 attention=LossyCacheAttention(ref.spec, v.kv, v.hgca,
                                                               key_scales=key_scales if v.kv_balance else None))
        if v.hot_fraction is not None:
            from offbatch.tools.quality import hybrid_ffn_model

            ref = hybrid_ffn_model(ref, neurons, v.hot_fraction)
        label = v.weights if v.kv == "dense" and v.hgca is None else f"{v.weights}, KV {v.kv_words}, {v.attention_words}"
        if v.hot_fraction is not None:
            label += f", FFN {v.ffn_words}"
        task = bar.add_task(label, total=len(wins))
        s = score(ref, wins, on_window=lambda k, task=task: bar.advance(task))
        del ref
        row = {**v.settings(), "perplexity": s.perplexity, "nll": s.nll, "tokens": s.tokens,
               "seconds": time.perf_counter() - t0}
        if base_scores is None:
            base_scores = s
        else:
            row["agreement"] = agreement_of(base_scores, s)
            row["delta_pct"] = delta_pct(base_scores, s)
        results.append(row)
    return results, base_scores, used_dtype


def command(
    model: Annotated[Path, typer.Argument(help="Model folder or .gguf file (imported once into the cache).",
                                          show_default=False)],
    text_file: Annotated[Path, typer.Argument(help="Plain UTF-8 text to score.", show_default=False)],
    window: WindowOpt = 512,
    stride: Annotated[Optional[int], typer.Option("--stride", min=1, help="Tokens between window starts "
                                                  "(default: --window, no overlap).")] = None,
    max_windows: Annotated[Optional[int], typer.Option("--max-windows", min=1, help="Score at most this many "
                                                       "windows (from the start of the text).")] = None,
    weights: Annotated[Optional[list[str]], typer.Option("--weights", help="Also score the model packed in this "
                                                         "weight format, and its greedy agreement with the model as "
                                                         "stored (repeatable: one table, the base scored once).")] = None,
    kv: Annotated[Optional[list[str]], typer.Option("--kv", help="Also score K and V stored in this KV format "
                                                    "(int8, int4; quantized once when written, as the engine "
                                                    "stores them), with the base weights (repeatable).")] = None,
    hgca: Annotated[Optional[list[str]], typer.Option("--hgca", help="Also score hybrid GPU-CPU attention with "
                                                      "this setting, e.g. window=256,top_k=128,sinks=4 (defaults: "
                                                      "sinks=4, window=256, top_k=128): sinks and the recent window "
                                                      "exactly, per head the top_k older keys by score; base "
                                                      "weights (repeatable). Not for sliding-window models.")] = None,
    kv_balance: KvBalanceOpt = False,
    ffn: FfnOpt = None,
    predictors: PredictorsOpt = None,
    hot_fraction: Annotated[Optional[list[float]], typer.Option("--hot-fraction", min=0.0, max=1.0,
                                                                help="With --ffn hybrid: the share of each layer's "
                                                                "neurons that is hot (computed for every token; "
                                                                "repeatable; default 0.2).")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    as_json: JsonOpt = False,
):
    """Perplexity of a model over fixed token windows of a text; with --weights, --kv or --hgca, each variant
    against the base (the model as its folder stores it, dense KV, full attention): perplexity, its change
    and greedy-token agreement.

    Variants: each --weights format (dense KV, full attention); each --kv format and each --hgca setting
    with the base weights; when both --kv and --hgca are given, also every --kv format with every --hgca
    setting (as the engine runs them together). To measure --kv/--hgca over a weight format, convert the
    model first (`offbatch convert`) and score the converted folder.

    A teacher-forced window cannot decode token by token, so --kv and --hgca show every position what a
    decode step of the engine would see: keys and values quantized once, HGCA's keys chosen from them.
    The engine's prompt prefill itself stays exact.

    --ffn hybrid scores the hybrid FFN with the base weights, for each --hot-fraction: hot neurons for every
    token, the others where the layer's predictor (--predictors; default the model's) marks them active.
    """
    from offbatch.engine.select import resolve_device
    from offbatch.tools.default_model import model_folder
    from offbatch.tools.quality import variants

    for name in weights or ():
        _check_format(name)
    kvs, hgcas = _kv_names(kv), _hgca_settings(hgca)
    if hot_fraction and ffn != "hybrid":
        raise OffbatchError("--hot-fraction is for --ffn hybrid")
    device = resolve_device(device)
    text = read_text_file(text_file)  # before a GGUF model is imported: a bad text fails at once
    model_dir = Path(model_folder(model, dtype))
    _check_hgca_applies(model_dir, hgcas)
    from offbatch.cli.options import neurons_option

    neurons = neurons_option(model_dir, ffn, predictors)  # before the text is tokenized: bad options fail first
    key_scales = None
    if kv_balance:
        if not any(k != "dense" for k in kvs):
            raise OffbatchError("--kv-balance scores balanced keys under a compressed KV format: give --kv int8 or int4")
        from offbatch.attention.key_balance import key_scales_for_folder

        key_scales = key_scales_for_folder(model_dir)
    if neurons is not None:
        from offbatch.models.spec import load_spec

        neurons.check(load_spec(model_dir))
    ids, wins = _windows(text, text_file, model_dir, window, stride, max_windows)
    stored = _stored_format(model_dir)  # the base: the model as its folder stores it (dense, or converted)
    hots = list(dict.fromkeys(hot_fraction or [0.2])) if neurons is not None else []
    todo = variants(stored, list(dict.fromkeys(weights or ())), kvs, hgcas, hots, kv_balance)
    with _progress(not as_json) as bar:
        results, base_scores, used_dtype = _score_variants(todo, model_dir, device, dtype, wins, bar, neurons,
                                                           key_scales)
    report = {"model": str(model), "model_dir": str(model_dir), "text_file": str(text_file),
              "text_tokens": len(ids), "window": window, "stride": stride or window, "windows": len(wins),
              "scored_tokens": base_scores.tokens, "device": device, "dtype": used_dtype, "results": results}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_table(report)
