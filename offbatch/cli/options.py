"""Option aliases shared by the commands, so a flag means the same thing everywhere."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from offbatch.errors import OutputFileError
from offbatch.units import parse_bytes

ModelDirArg = Annotated[Path, typer.Argument(help="Hugging Face model folder (config.json + safetensors).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")]
GpuMemoryOpt = Annotated[
    Optional[str], typer.Option("--gpu-memory", help="GPU memory offbatch may reserve, e.g. 8GiB (default: all free).")
]
CpuMemoryOpt = Annotated[
    Optional[str], typer.Option("--cpu-memory", help="Host memory offbatch may use, e.g. 64GiB (default: 80% of available).")
]
DeviceOpt = Annotated[
    Optional[str], typer.Option("--device", help="Compute device: cuda, cpu (default: cuda when present).")
]
# A model folder or a synth preset (bench, plan): a real shape with random weights, built in memory.
ModelOrSynthArg = Annotated[Optional[Path], typer.Argument(help="Model folder (or use --synth).")]
SynthOpt = Annotated[
    Optional[str], typer.Option("--synth", help="A synth preset instead of a folder (its real shape, random weights, "
                                "in memory), e.g. mixtral-8x7b.")
]
SynthLayersOpt = Annotated[Optional[int], typer.Option("--layers", help="With --synth: number of layers.")]
# Scale-out on Ray Data (offbatch/scale; `pip install offbatch[ray]`).
RayOpt = Annotated[
    Optional[str], typer.Option("--ray", metavar="ADDRESS",
                                help="Run the job over a Ray cluster's GPUs (one engine per GPU): its address as "
                                     "`ray start` printed it (HOST:6379), or auto for the one started on this "
                                     "machine. Needs `pip install offbatch[ray]`.")
]
WorkersOpt = Annotated[
    Optional[int], typer.Option("--workers", min=1,
                                help="Engine workers: with --ray, how many of the cluster's GPUs to use (default: "
                                     "all); alone, start a local Ray cluster with this many (one per GPU; CPU "
                                     "workers on a machine without one).")
]
SplitStreamOpt = Annotated[
    int, typer.Option("--split-stream", min=1, max=64,
                      help="Split the weight stream over this many GPUs of this host (cuda:0..N-1): each copies "
                           "1/N of every streamed module over its own PCIe link and the GPUs exchange the rest "
                           "over NVLink; each runs 1/N of the prompts. For jobs the weight stream bounds.")
]
COMPUTE_DTYPES = ("bfloat16", "float16", "float32", "bf16", "fp16", "fp32")  # offbatch.models.dtypes.DTYPES


def compute_dtype(value: str | None) -> str | None:
    """--dtype checked where it is parsed: an unknown name is a usage error, not a failure deep in a command."""
    if value is not None and value not in COMPUTE_DTYPES:
        raise typer.BadParameter(f"{value!r} is not a dtype: use bfloat16, float16 or float32")
    return value


DtypeOpt = Annotated[
    Optional[str], typer.Option("--dtype", callback=compute_dtype,
                                help="Compute dtype: bfloat16, float16, float32 (default: the checkpoint's).")
]


def byte_size(value: str | None, flag: str) -> int | None:
    """A byte-size option's value ('8GiB'), or a usage error naming the flag."""
    if value is None:
        return None
    try:
        return parse_bytes(value)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=flag) from None


def open_report(path: Path | None, flag: str = "--out"):
    """The report file, opened for writing before the work starts (a bench takes minutes: an unwritable
    --out must not waste them), or None. A path that cannot be written is one clear error (exit 3)."""
    if path is None:
        return None
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as e:
        raise OutputFileError(f"{flag} {path} cannot be written: {e.strerror or e}") from None


def write_report(handle, text: str, flag: str = "--out") -> None:
    """Write and close a report file from open_report; a failed write (full disk) is one clear error."""
    try:
        with handle:
            handle.write(text)
    except OSError as e:
        raise OutputFileError(f"writing {flag} {handle.name} failed: {e.strerror or e}") from None


def weight_format(value: str | None) -> str | None:
    """--weights checked where it is parsed: a weight format offbatch knows, else a usage error."""
    from offbatch.formats import format_names, known_format

    if value is not None and not known_format(value):
        raise typer.BadParameter(f"{value!r} is not a weight format (known: {format_names()})")
    return value


WeightsOpt = Annotated[
    Optional[str], typer.Option("--weights", callback=weight_format,
                                help="Weight format to pack the model in at load (dense, int8, int4, int4-g32, "
                                     "int4-asym, nf4, ...); lossy: see `offbatch eval-ppl`. Default: the "
                                     "folder's own (dense, or the format `offbatch convert` wrote).")
]


def kv_formats(value: str | None) -> str | None:
    """--kv checked where it is parsed: KV formats offbatch knows (a comma list), else a usage error."""
    if value is None:
        return None
    from offbatch.offload.kv import kv_format_name

    try:
        names = [kv_format_name(v) for v in value.split(",") if v.strip()]
    except KeyError as e:
        raise typer.BadParameter(str(e.args[0])) from None
    if not names:
        raise typer.BadParameter("name a KV format: dense (bf16), int8 or int4; several, comma-separated, let the "
                                 "planner choose among them")
    return ",".join(dict.fromkeys(names))


def hgca_setting(value: str | None) -> str | None:
    """--hgca checked where it is parsed: 'auto', or a setting like 'window=256,top_k=128,sinks=4'."""
    if value is None:
        return None
    from offbatch.attention.hgca_setting import HGCASetting

    text = "" if value.strip().lower() in ("auto", "on", "yes", "default") else value
    try:
        HGCASetting.parse(text)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    return value.strip()


KvOpt = Annotated[
    Optional[str], typer.Option("--kv", callback=kv_formats,
                                help="KV cache format: dense (bf16, exact; the default), int8 or int4 (quantized "
                                     "once when written, groups along the head dimension; lossy: see `offbatch "
                                     "eval-ppl --kv`). Several, comma-separated (dense,int8,int4), let the planner "
                                     "take the fastest (exact first among near-ties).")
]
HgcaOpt = Annotated[
    Optional[str], typer.Option("--hgca", callback=hgca_setting,
                                help="Allow hybrid GPU-CPU attention (lossy: see `offbatch eval-ppl --hgca`): "
                                     "each sequence's recent keys and first few on the GPU, older keys in host "
                                     "memory attended top-k per head on the CPU. 'auto' (top_k=128, sinks=4, the "
                                     "planner picks the window) or e.g. 'top_k=256,window=512'. The planner "
                                     "still takes full attention where that is faster.")
]

# Calibration commands (profile, train-predictors, calibrate-keys): windows of a text, and the quality check.
CalibWindowsOpt = Annotated[int, typer.Option("--windows", min=1, help="Windows of calibration tokens.")]
WindowOpt = Annotated[int, typer.Option("--window", min=2, help="Tokens per window.")]
EvalWindowsOpt = Annotated[int, typer.Option("--eval-windows", min=1, help="Windows of the evaluation text.")]
NoEvalOpt = Annotated[bool, typer.Option("--no-eval", help="Do not measure quality.")]

KvBalanceOpt = Annotated[
    bool, typer.Option("--kv-balance", help="With a compressed --kv format: balance the keys' channels by the "
                                            "scales `offbatch calibrate-keys` wrote beside the model before they "
                                            "are quantized (q.k unchanged; helps models with outlier key channels "
                                            "such as Qwen2.5, can hurt others: see `eval-ppl --kv int4 --kv-balance`).")
]


def kv_balance_words(model_dir) -> str:
    """For a results key: balanced keys, and which scales (their file's digest)."""
    from offbatch.attention.key_balance import key_scales_fingerprint

    return f" with keys balanced by scales {key_scales_fingerprint(model_dir)}"


def ffn_choice(value: str | None) -> str | None:
    if value is None:
        return None
    v = value.strip().lower()
    if v not in ("dense", "hybrid"):
        raise typer.BadParameter(f"{value!r}: use dense or hybrid")
    return v


FfnOpt = Annotated[
    Optional[str], typer.Option("--ffn", callback=ffn_choice,
                                help="hybrid: allow PowerInfer's hybrid FFN (hot neurons resident on the GPU, the "
                                     "cold ones a predictor marks active computed on the host threads; lossy with "
                                     "predictors: `offbatch train-predictors` prints their recall). Needs the "
                                     "model's `offbatch profile` statistics and predictors beside it. The planner "
                                     "still takes the dense FFN where that is faster.")
]
PredictorsOpt = Annotated[
    Optional[str], typer.Option("--predictors", help="With --ffn hybrid: the predictors file (default: the "
                                "model's offbatch_predictors.safetensors), or 'oracle' (exact activity computed on "
                                "the host: exact on ReLU FFNs, for measuring placement alone).")
]


def ffn_words(ffn: str | None, predictors: str | None, model_dir=None) -> str:
    """How results made with the hybrid FFN are told apart ("" for the dense FFN): the predictors named, and
    with the model folder a digest of the statistics and predictors (retrained ones make other results)."""
    if ffn != "hybrid":
        return ""
    which = "oracle" if predictors == "oracle" else "predictors " + str(predictors or "of the folder")
    if model_dir is not None:
        from offbatch.ffn.neurons import neuron_fingerprint

        which += f", {neuron_fingerprint(model_dir, predictors)}"
    return f" with the hybrid FFN ({which})"


def neurons_option(model_dir, ffn: str | None, predictors: str | None):
    """The neuron statistics --ffn hybrid needs (None without it); --predictors alone is an error."""
    from offbatch.errors import OffbatchError

    if ffn != "hybrid":
        if predictors is not None:
            raise OffbatchError("--predictors is for --ffn hybrid")
        return None
    if model_dir is None:
        raise OffbatchError("--ffn hybrid needs MODEL_DIR with its profile statistics and predictors (a --synth "
                            "shape has none: scripts/bench_hybrid_ffn.py calibrates one)")
    from offbatch.ffn.neurons import neuron_stats_for_folder

    return neuron_stats_for_folder(model_dir, predictors)


def kv_plan_options(kv: str | None, hgca: str | None) -> dict:
    """The planner's options (make_plan / build_engine) for --kv and --hgca."""
    out = {}
    if kv:
        out["kv_formats"] = kv.split(",")
    if hgca:
        from offbatch.attention.hgca_setting import HGCASetting

        text = "" if hgca.lower() in ("auto", "on", "yes", "default") else hgca
        out["hgca"] = HGCASetting.parse(text)
        out["hgca_window_given"] = "window" in text.lower() or "w=" in text.lower()
    return out


def kv_words(kv: str | None, hgca: str | None) -> str:
    """What --kv/--hgca asked for, for a results key ('' when exact)."""
    parts = []
    if kv and kv != "dense":
        parts.append(f"{kv} KV")
    if hgca:
        parts.append(f"HGCA {hgca}")
    return " with " + " and ".join(parts) if parts else ""
