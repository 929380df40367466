"""`offbatch bench`: throughput, time split, memory peaks and the physical floor of a synthetic job."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from offbatch.cli.options import DeviceOpt, DtypeOpt, GpuMemoryOpt, JsonOpt
from offbatch.errors import OffbatchError
from offbatch.units import format_bytes, parse_bytes


def _source(model_dir: Optional[Path], synth: Optional[str], layers: Optional[int]):
    from offbatch.models.loader import open_checkpoint
    from offbatch.models.spec import spec_from_config
    from offbatch.offload.weights import CheckpointSource, SynthSource

    if (model_dir is None) == (synth is None):
        raise OffbatchError("give either MODEL_DIR or --synth PRESET (a synth preset benchmarks without writing to disk)")
    if synth:
        from offbatch.models.synth import synth_config

        return SynthSource(spec_from_config(synth_config(synth, layers=layers)))
    return CheckpointSource(open_checkpoint(model_dir))


def command(
    model_dir: Annotated[Optional[Path], typer.Argument(help="Model folder (or use --synth).")] = None,
    synth: Annotated[Optional[str], typer.Option("--synth", help="Bench a synth preset in memory, e.g. mixtral-8x7b.")] = None,
    layers: Annotated[Optional[int], typer.Option("--layers", help="With --synth: number of layers.")] = None,
    gpu_memory: GpuMemoryOpt = None,
    prompts: Annotated[int, typer.Option("--prompts", help="Number of prompts.")] = 64,
    prompt_len: Annotated[int, typer.Option("--prompt-len", help="Tokens per prompt.")] = 256,
    gen_len: Annotated[int, typer.Option("--gen-len", help="Tokens generated per prompt.")] = 16,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    as_json: JsonOpt = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write the JSON report here.")] = None,
):
    """Run a synthetic batch job through the streaming engine and report what limited it."""
    import torch

    from offbatch.engine.benchmark import run_bench

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = _source(model_dir, synth, layers)
    cap = parse_bytes(gpu_memory) if gpu_memory else None
    report = run_bench(source, device, cap, prompts, prompt_len, gen_len, dtype=dtype,
                       default_dtype=getattr(torch, source.spec.torch_dtype))
    if out:
        out.write_text(json.dumps(report, indent=2))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    t = Table(title=f"offbatch bench: {report['family']} x{report['layers']} layers, {report['prompts']} prompts x "
                    f"{report['prompt_len']} + {report['gen_len']} new, cap {format_bytes(cap) if cap else 'none'}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("prefill tok/s", f"{report['prefill_tok_s']:.1f}"),
        ("decode tok/s", f"{report['decode_tok_s']:.1f}"),
        ("end-to-end tok/s (generated)", f"{report['e2e_tok_s']:.1f}"),
        ("decode floor tok/s", f"{report['decode_floor_tok_s']:.1f}"),
        ("decode achieved / floor", f"{report['decode_achieved_over_floor']:.2f}"),
        ("wave (sequences)", str(report["plan"]["wave_size"])),
        ("streamed per decode step", format_bytes(report["decode_bytes_per_step"])),
        ("copy rate (pinned, measured)", f"{report['measured_copy_bytes_s'] / 1e9:.1f} GB/s"),
        ("GEMM rate (measured)", f"{report['measured_gemm_flop_s'] / 1e12:.1f} TFLOP/s"),
        ("waiting for weights", f"{report['time_split_s']['weight_wait']:.2f} s"),
        ("compute + host", f"{report['time_split_s']['other (compute, host)']:.2f} s"),
        ("peak GPU reserved", format_bytes(report["peak_gpu_reserved_bytes"])),
        ("peak host RSS", format_bytes(report["peak_host_bytes"])),
        ("wall", f"{report['wall_s']:.1f} s"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)
