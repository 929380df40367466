"""`offbatch import-gguf FILE.gguf OUT_DIR`: turn a llama.cpp GGUF file into a Hugging Face model folder."""

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
    quiet: QuietOpt = False,
):
    """Turn a llama.cpp GGUF file (Llama, Mistral, Qwen2, Qwen3) into a Hugging Face model folder.

    Quantised tensors are dequantised to --dtype; the folder is written atomically.
    """
    from offbatch.tools.gguf_import import import_gguf

    if not quiet and sys.stderr.isatty():  # a bar on a terminal; nothing in scripts and logs
        from rich.console import Console
        from rich.progress import Progress

        with Progress(transient=True, console=Console(stderr=True)) as bar:
            task = bar.add_task("dequantising", total=None)
            summary = import_gguf(
                gguf_file, out_dir, dtype.value, overwrite=force,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )  # fmt: skip
    else:
        summary = import_gguf(gguf_file, out_dir, dtype.value, overwrite=force)
    if not quiet:
        for note in summary.notes:
            typer.echo(f"offbatch: note: {note}", err=True)
        types = ", ".join(f"{n} {name}" for name, n in sorted(summary.tensor_types.items()))
        typer.echo(
            f"wrote {summary.out_dir} ({summary.architecture}, {summary.num_tensors} tensors: {types}; "
            f"{format_bytes(summary.total_bytes)} {dtype.value}) in {summary.seconds:.1f} s"
        )
