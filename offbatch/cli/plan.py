"""`offbatch plan MODEL_DIR --gpu-memory 8GiB`: choose placement and batch sizes for a job, predict its
speed and say what bounds it; `--json` writes a plan file that `bench --plan FILE` pins."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from offbatch.cli.options import (CpuMemoryOpt, DeviceOpt, DtypeOpt, GpuMemoryOpt, JsonOpt, ModelOrSynthArg,
                                  SplitStreamOpt, SynthLayersOpt, SynthOpt, WeightsOpt, KvOpt, HgcaOpt, FfnOpt, PredictorsOpt,
                                  byte_size,
                                  kv_plan_options, neurons_option,
                                  open_report, write_report)
from offbatch.errors import InputFileError, OffbatchError
from offbatch.plan import cold_path_words
from offbatch.units import format_bytes

HardwareOpt = Annotated[Optional[str], typer.Option(
    "--hardware", help="Plan for this machine instead of probing this one: rtx3060-12g, rtx4060ti-16g, rtx4090, l4, "
                       "a10, h200, cpu, or a JSON file (the \"hardware\" object of `plan --json`).")]


def load_spec_for(model_dir: Optional[Path], synth: Optional[str], layers: Optional[int]):
    from offbatch.models.spec import load_spec, spec_from_config

    if (model_dir is None) == (synth is None):
        raise OffbatchError("give either MODEL_DIR or --synth PRESET")
    if synth:
        from offbatch.tools.synth import synth_config

        return spec_from_config(synth_config(synth, layers=layers))
    return load_spec(model_dir)


def workload_from_file(model_dir: Path, prompts: Path, gen_len: Optional[int], context: int, vocab: int):
    """Token lengths of the runnable lines of a prompts file, as `run` would see them."""
    from offbatch.jobs.params import resolve_defaults
    from offbatch.jobs.requests import Request, parse_line, prepare, read_input
    from offbatch.models.tokenizer import load_tokenizer
    from offbatch.planner.workload import Workload

    tokenizer = load_tokenizer(model_dir)
    defaults = resolve_defaults(tokenizer.generation_defaults, {"max_tokens": gen_len})
    prompt_lens, gen_lens = [], []
    for number, raw in read_input(prompts):
        req = parse_line(number, raw)
        if isinstance(req, Request) and prepare(req, tokenizer, defaults, context, vocab) is None:
            prompt_lens.append(len(req.prompt_ids))
            gen_lens.append(req.params.max_tokens)
    if not prompt_lens:
        raise InputFileError(f"{prompts}: no runnable request to plan for")
    return Workload.from_lengths(prompt_lens, gen_lens)


def _folder_format(model_dir: Optional[Path]) -> str:
    """The format a model folder is stored in (dense for synth shapes and unconverted folders)."""
    if model_dir is None:
        return "dense"
    from offbatch.models.converted import folder_format
    from offbatch.models.spec import read_config

    return folder_format(read_config(model_dir)).name


def command(
    model_dir: ModelOrSynthArg = None,
    synth: SynthOpt = None,
    layers: SynthLayersOpt = None,
    gpu_memory: GpuMemoryOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="Plan for this JSONL prompts file (needs MODEL_DIR "
                                                    "for its tokenizer).")] = None,
    prompt_len: Annotated[int, typer.Option("--prompt-len", min=1, help="Tokens per prompt.")] = 256,
    gen_len: Annotated[Optional[int], typer.Option("--gen-len", min=1, help="Tokens generated per prompt (with "
                                                   "--prompts: for lines that set no max_tokens).")] = None,
    num_prompts: Annotated[int, typer.Option("--num-prompts", min=1, help="Number of prompts.")] = 1024,
    hardware: HardwareOpt = None,
    reprobe: Annotated[bool, typer.Option("--reprobe", help="Measure this machine again (else the cached probe).")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    weights: WeightsOpt = None,
    kv: KvOpt = None,
    hgca: HgcaOpt = None,
    ffn: FfnOpt = None,
    predictors: PredictorsOpt = None,
    as_json: JsonOpt = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write the JSON report (a plan file) here.")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Plan for `run --workers N` / `--ray`: "
                                                   "N workers like this machine (or --hardware), each planning for "
                                                   "its shards; the plan shown is one worker's.")] = None,
    workers_per_host: Annotated[Optional[int], typer.Option("--workers-per-host", min=1, help="With --workers: how "
                                                            "many share one host's memory (default: this machine's "
                                                            "GPUs; 1 with --hardware).")] = None,
    split_stream: SplitStreamOpt = 1,
):
    """Choose placement and batch sizes for a job, predict its speed, and say what bounds it."""
    import torch

    from offbatch.models.dtypes import resolve_dtype
    from offbatch.planner.probe import probe_hardware
    from offbatch.planner.solve import make_plan, resolve_hardware
    from offbatch.planner.workload import Workload

    spec = load_spec_for(model_dir, synth, layers)
    if hardware:
        hw = resolve_hardware(hardware, "cuda")
    elif reprobe or (device or "").startswith("cuda") or (device is None and torch.cuda.is_available()):
        hw = probe_hardware(device, model_dir, reprobe=reprobe)
    else:
        hw = resolve_hardware(None, "cpu")
    device = device or hw.device
    cdtype = resolve_dtype(dtype, getattr(torch, spec.torch_dtype))
    if prompts is not None:
        if model_dir is None:
            raise OffbatchError("--prompts needs MODEL_DIR: its tokenizer counts the prompt tokens")
        workload = workload_from_file(model_dir, prompts, gen_len, spec.max_position, spec.vocab_size)
    else:
        workload = Workload.uniform(num_prompts, prompt_len, gen_len or 256)
    gpu_cap = byte_size(gpu_memory, "--gpu-memory")
    cpu_cap = byte_size(cpu_memory, "--cpu-memory")
    fmt = weights or _folder_format(model_dir)
    lossy_kv = kv_plan_options(kv, hgca)
    neurons = neurons_option(model_dir, ffn, predictors)
    if neurons is not None:
        lossy_kv["neurons"] = neurons
    cluster = None
    if workers is not None:  # a scaled run (offbatch/scale): the plan shown is one worker's, for its shard
        from offbatch.scale.plan_view import ClusterView

        per_host = workers_per_host or (1 if hardware else max(1, torch.cuda.device_count()))
        cluster = ClusterView(workload, workers, min(per_host, workers), hw.host.memory_bytes, cpu_cap)
        workload, cpu_cap = cluster.worker_workload(), cluster.worker_cpu_memory()
    elif workers_per_host is not None:
        raise OffbatchError("--workers-per-host is for --workers")
    whole = (workload, cpu_cap)
    if split_stream > 1:  # the plan shown is one rank's: its share of the sequences and of host memory
        from offbatch.engine.split import host_share, rank_workload

        if ffn == "hybrid":
            raise OffbatchError("--split-stream runs dense FFN layers; drop --ffn hybrid")
        workload = rank_workload(workload, split_stream)
        cpu_cap = host_share(cpu_cap, split_stream, hw.host.memory_bytes)
        lossy_kv["split_stream"] = split_stream

    def plan_for(name: str, workload=workload, cpu=cpu_cap, **options):
        return make_plan(spec, cdtype, device, gpu_cap, workload, hardware=hw, cpu_memory=cpu, weights=name, **options)

    plan = plan_for(fmt, **lossy_kv)
    compare = fmt != "dense" or plan.kv_format != "dense" or bool(plan.hgca) or plan.dense_ffn != "dense"
    exact = plan_for("dense") if compare else None  # what the compressed choices change, against the exact job
    report = {
        "model": {"family": spec.family, "layers": spec.num_layers, "hidden_size": spec.hidden_size,
                  "source": str(model_dir) if model_dir else f"synth:{synth}"},
        "hardware": hw.to_dict(),
        "workload": workload.describe(),
        "plan": plan.to_dict(),
        "predicted": {k: v for k, v in plan.predicted.items() if k not in ("bottleneck", "bottleneck_kind")},
        "bottleneck": plan.predicted["bottleneck"],
        "bottleneck_kind": plan.predicted["bottleneck_kind"],
    }
    if compare:
        dense = exact.predicted
        report["dense"] = {"weight_bytes": _weight_bytes(spec, cdtype, "dense"), "decode_step": dense["decode_step"],
                           "wave_size": exact.wave_size,
                           **{k: dense[k] for k in ("decode_tok_s", "e2e_tok_s", "prefill_tok_s")}}
        report["weight_bytes"] = _weight_bytes(spec, cdtype, fmt)
        report["stored_as"] = _folder_format(model_dir)
    if cluster is not None:
        report["cluster"] = cluster.report(lambda w, cpu: plan_for(fmt, workload=w, cpu=cpu, **lossy_kv))
    if split_stream > 1:  # against one GPU running the whole job
        alone = plan_for(fmt, workload=whole[0], cpu=whole[1], **{k: v for k, v in lossy_kv.items() if k != "split_stream"})
        job = split_stream * plan.predicted["e2e_tok_s"]
        report["split_stream"] = {"gpus": split_stream, "job_e2e_tok_s": job,
                                  "job_decode_tok_s": split_stream * plan.predicted["decode_tok_s"],
                                  "one_gpu_e2e_tok_s": alone.predicted["e2e_tok_s"],
                                  "one_gpu_wave": alone.wave_size, "speedup": job / alone.predicted["e2e_tok_s"]}
    text = json.dumps(report, indent=2)
    if out:
        write_report(open_report(out), text + "\n")
    if as_json:
        typer.echo(text)
        return
    print_plan(report)
    if split_stream > 1:
        s = report["split_stream"]
        Console().print(f"split stream: {s['gpus']} GPUs run this plan each, {s['job_e2e_tok_s']:,.0f} tok/s end to "
                        f"end for the job against {s['one_gpu_e2e_tok_s']:,.0f} on one GPU (wave {s['one_gpu_wave']}): "
                        f"{s['speedup']:.2f}x predicted")
    if cluster is not None:
        from offbatch.scale.plan_view import print_cluster

        print_cluster(report["cluster"], Console())


def _weight_bytes(spec, dtype, fmt: str) -> int:
    from offbatch.formats import get_format
    from offbatch.planner.shape import shape_from_spec

    return shape_from_spec(spec, dtype, get_format(fmt)).total_bytes


def _rate(x: float) -> str:
    return f"{x:,.1f}" if x < 1000 else f"{x:,.0f}"


def print_plan(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    plan, pred, hw, wl = report["plan"], report["predicted"], report["hardware"], report["workload"]
    m = report["model"]
    console.print(f"[bold]offbatch plan[/]: {m['family']} x{m['layers']} layers ({m['source']}) on {hw['name']} "
                  f"({hw['gpu_name']}, {hw['source']})")
    console.print(f"job: {wl['num_requests']} prompts of {wl['prompt_len']:.0f} tokens, {wl['gen_len']:.0f} generated "
                  f"each (context {wl['max_len']})")
    t = Table(title="plan", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    from offbatch.attention import get_attention

    backend = get_attention(plan["attention"])
    rows = [
        ("KV cache", backend.kv_words),
        ("decode attention", backend.attention_words),
        ("KV format", plan.get("kv_format", "dense") + (" (exact)" if plan.get("kv_format", "dense") == "dense" else
                                                         " (lossy: `offbatch eval-ppl --kv`)")),
        *([("HGCA", f"{plan['hgca']} (lossy: `offbatch eval-ppl --hgca`)")] if plan.get("hgca") else []),
        ("FFN", f"hybrid: {plan['hot_neurons']} hot neurons per streamed layer on the GPU, cold ones "
                f"{cold_path_words(plan['hybrid_tokens'], plan.get('hybrid_fetch_tokens', 0))} (lossy with predictors: "
                "their recall is `offbatch train-predictors`')" if plan.get("dense_ffn") == "hybrid" else "dense"),
        ("wave (sequences decoded together)", str(plan["wave_size"])),
        ("prompt tokens admitted per step", str(plan["prefill_tokens"])),
        ("attention micro-batch (sequences)", str(plan["attn_micro_batch"])),
        ("FFN micro-batch (tokens)", str(plan["ffn_micro_tokens"])),
        ("resident modules", f"{plan['resident_modules']} ({format_bytes(plan['memory']['resident_weights'])})"),
        ("streamed kinds (slots)", ", ".join(f"{k} x{v}" for k, v in plan["slots"].items()) or "none: all resident"),
        ("disk tier (read from the model folder)",
         f"{plan['disk_modules']} modules, {plan['staging_buffers']} staging buffers" if plan.get("disk_modules")
         else "none: the weights fit in host memory"),
    ]
    for row in rows:
        t.add_row(*row)
    console.print(t)
    mem = Table(title="memory per tier")
    mem.add_column("tier")
    mem.add_column("use")
    mem.add_column("bytes", justify="right")
    for k, v in plan["memory"].items():
        mem.add_row("GPU", k, format_bytes(v))
    cap = plan["budget_bytes"]
    mem.add_row("GPU", "total (cap)", f"{format_bytes(sum(plan['memory'].values()))} ({format_bytes(cap) if cap else 'none'})")
    for k, v in plan["host_memory"].items():
        mem.add_row("host", k, format_bytes(v))
    mem.add_row("host", "total", format_bytes(sum(plan["host_memory"].values())))
    console.print(mem)
    p = Table(title="predicted")
    p.add_column("metric")
    p.add_column("value", justify="right")
    dstep = pred["decode_step"]
    for k, v in [
        ("prefill tok/s", _rate(pred["prefill_tok_s"])),
        ("decode tok/s", _rate(pred["decode_tok_s"])),
        ("end-to-end tok/s (generated)", _rate(pred["e2e_tok_s"])),
        ("decode floor tok/s", _rate(pred["decode_floor_tok_s"])),
        ("job time", f"{pred['total_s']:.1f} s (prefill steps {pred['prefill_s']:.1f} s, decode {pred['decode_s']:.1f} s)"),
        ("loading the weights", f"{pred['load_s']:.1f} s"),
        ("decode step", f"{dstep['total_s'] * 1000:.1f} ms for {dstep['sequences']} sequences"),
        ("  link busy (weights + KV)", f"{dstep['copy_s'] * 1000:.1f} ms ({format_bytes(dstep['weight_bytes'])} + "
                                       f"{format_bytes(dstep['kv_bytes'])})"),
        ("  GPU compute", f"{dstep['gpu_s'] * 1000:.1f} ms"),
        ("  CPU attention", f"{dstep['cpu_attention_s'] * 1000:.1f} ms"),
        ("  host work", f"{dstep['host_s'] * 1000:.1f} ms"),
        ("  disk reads", f"{dstep.get('disk_s', 0.0) * 1000:.1f} ms"),
    ]:
        p.add_row(k, v)
    console.print(p)
    if "dense" in report:  # a compressed format: what it changes against the same job in dense weights
        d, dd = report["dense"], report["dense"]["decode_step"]
        label = " + ".join([plan["weights"]] + ([f"{plan['kv_format']} KV"] if plan.get("kv_format", "dense") != "dense"
                                                  else []) + (["HGCA"] if plan.get("hgca") else [])
                            + (["hybrid FFN"] if plan.get("dense_ffn") == "hybrid" else []))
        c = Table(title=f"{label} against dense (bf16 weights and KV, full attention; each planned for this job)")
        for col in ("", label, "dense", "ratio"):
            c.add_column(col, justify="right")
        for name, a, b, fmt in [
            ("model weights", report["weight_bytes"], d["weight_bytes"], format_bytes),
            ("wave (sequences)", plan["wave_size"], d.get("wave_size", 0), str),
            ("weight bytes per decode step", dstep["weight_bytes"], dd["weight_bytes"], format_bytes),
            ("KV bytes over the link per decode step", dstep["kv_bytes"], dd["kv_bytes"], format_bytes),
            ("decode tok/s", pred["decode_tok_s"], d["decode_tok_s"], _rate),
            ("end-to-end tok/s", pred["e2e_tok_s"], d["e2e_tok_s"], _rate),
        ]:
            c.add_row(name, fmt(a), fmt(b), f"{a / b:.2f}" if b else "-")
        console.print(c)
        if plan["weights"] == "dense":
            pass
        elif report["stored_as"] == plan["weights"]:
            console.print(f"the folder is stored in {plan['weights']}; dense: its weights decoded at load")
        else:
            console.print(f"{plan['weights']} is lossy: measure its quality with `offbatch eval-ppl MODEL TEXT --weights "
                          f"{plan['weights']}` (perplexity and agreement with dense)")
    console.print(f"bottleneck: {report['bottleneck']}")
    if plan.get("near_tie"):  # the placement won inside the solver's tie tolerance (planner.solve)
        console.print(f"near-tie: {plan['near_tie']['words']}")
