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
