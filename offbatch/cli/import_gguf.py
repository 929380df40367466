"""`offbatch import-gguf FILE.gguf OUT_DIR [--keep-quantized | --expand]`: turn a llama.cpp GGUF file into a
Hugging Face model folder, its Q4_0 / Q4_1 / Q8_0 weights kept as they are where they can be
(offbatch/tools/gguf_import.py says when)."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from offbatch.cli.options import QuietOpt
from offbatch.units import format_bytes


class OutputDtype(str, Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


def command(
    gguf_file: Annotated[Path, typer.Argument(help="The GGUF file (llama.cpp format).", show_default=False)],
    out_dir: Annotated[Path, typer.Argument(help="The Hugging Face model folder to create.", show_default=False)],
    dtype: Annotated[
        OutputDtype, typer.Option("--dtype", help="dtype the weights are dequantised to.")
    ] = OutputDtype.bfloat16,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT_DIR if it exists.")] = False,
    keep_quantized: Annotated[bool, typer.Option(
        "--keep-quantized", help="Keep the bulk weights' Q4_0 / Q4_1 / Q8_0 blocks as offbatch's int4-g32 / "
        "int4-asym-g32 / int8-g32 formats (an error when the file's bulk weights are not all one of these types); "
        "default: kept where they can be, else expanded.")] = False,
    expand: Annotated[bool, typer.Option(
        "--expand", help="Dequantise every tensor to --dtype: a plain folder any tool (transformers) reads.")] = False,
    quiet: QuietOpt = False,
):
    """Turn a llama.cpp GGUF file (Llama, Mistral, Qwen2, Qwen3) into a Hugging Face model folder.

    When every bulk linear weight (attention q/k/v/o, FFN gate/up/down) is Q4_0, Q4_1 or Q8_0, all of one
    type, those blocks are kept as they are (Q4_0 is offbatch's int4-g32 format, Q4_1 int4-asym-g32, Q8_0
    int8-g32: the same codes and scales, no loss) and the rest is dequantised to --dtype; otherwise (the
    K-quants, whose scales float16 cannot hold exactly, or mixed types such as Q4_K_M) every tensor is
    dequantised to --dtype. The folder is written atomically.
    """
    from offbatch.tools.gguf_import import import_gguf

    if keep_quantized and expand:
        raise typer.BadParameter("give --keep-quantized or --expand, not both", param_hint="--expand")
    weights = "keep" if keep_quantized else "expand" if expand else "auto"

    if not quiet and sys.stderr.isatty():  # a bar on a terminal; nothing in scripts and logs
        from rich.console import Console
        from rich.progress import Progress

        with Progress(transient=True, console=Console(stderr=True)) as bar:
            task = bar.add_task("importing", total=None)
            summary = import_gguf(
                gguf_file, out_dir, dtype.value, weights=weights, overwrite=force,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )  # fmt: skip
    else:
        summary = import_gguf(gguf_file, out_dir, dtype.value, weights=weights, overwrite=force)
    if not quiet:
        for note in summary.notes:
            typer.echo(f"offbatch: note: {note}", err=True)
        types = ", ".join(f"{n} {name}" for name, n in sorted(summary.tensor_types.items()))
        stored = dtype.value if summary.weights == "dense" else f"{summary.weights}, the rest {dtype.value}"
        typer.echo(
            f"wrote {summary.out_dir} ({summary.architecture}, {summary.num_tensors} tensors: {types}; "
            f"{format_bytes(summary.total_bytes)} {stored}) in {summary.seconds:.1f} s"
        )
