"""Option aliases shared by the commands, so a flag means the same thing everywhere."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from offbatch.units import parse_bytes

ModelDirArg = Annotated[Path, typer.Argument(help="Hugging Face model folder (config.json + safetensors).")]
OptionalModelDirArg = Annotated[
    Optional[Path], typer.Argument(help="Hugging Face model folder; default: the embedded SmolLM2-135M-Instruct.")
]
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
DtypeOpt = Annotated[
    Optional[str], typer.Option("--dtype", help="Compute dtype: bfloat16, float16, float32 (default: the checkpoint's).")
]


def byte_size(value: str | None, flag: str) -> int | None:
    """A byte-size option's value ('8GiB'), or a usage error naming the flag."""
    if value is None:
        return None
    try:
        return parse_bytes(value)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=flag) from None
