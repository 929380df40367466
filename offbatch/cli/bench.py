"""`offbatch bench`: throughput, time split, memory peaks and the physical floor of a synthetic job,
beside what the planner predicted for the plan it ran."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from offbatch.cli.options import (CpuMemoryOpt, DeviceOpt, DtypeOpt, GpuMemoryOpt, JsonOpt, ModelOrSynthArg,
                                  SynthLayersOpt, SynthOpt, WeightsOpt, KvOpt, KvBalanceOpt, HgcaOpt, FfnOpt, PredictorsOpt,
                                  byte_size,
                                  kv_plan_options, neurons_option,
                                  open_report, write_report)
from offbatch.cli.plan import HardwareOpt
from offbatch.errors import OffbatchError
from offbatch.units import format_bytes

MAX_BENCH_PROMPT_TOKENS = 1 << 26  # its random prompts as Python lists: about 2.5 GiB of host memory


def _source(model_dir: Optional[Path], synth: Optional[str], layers: Optional[int], ffn_activity: Optional[str] = None):
    from offbatch.models.loader import open_checkpoint
    from offbatch.models.spec import spec_from_config
    from offbatch.offload.weights import CheckpointSource, SynthSource

    if (model_dir is None) == (synth is None):
        raise OffbatchError("give either MODEL_DIR or --synth PRESET (a synth preset benchmarks without writing to disk)")
    if synth:
        from offbatch.tools.synth import parse_ffn_activity, synth_config

        extra = {"offbatch_synth_ffn_activity": parse_ffn_activity(ffn_activity)} if ffn_activity is not None else {}
        return SynthSource(spec_from_config(synth_config(synth, layers=layers, **extra)))
    if ffn_activity is not None:
        raise OffbatchError("--ffn-activity plants activity in a --synth model, not in a folder")
    return CheckpointSource(open_checkpoint(model_dir))


def command(
    model_dir: ModelOrSynthArg = None,
    synth: SynthOpt = None,
    layers: SynthLayersOpt = None,
    ffn_activity: Annotated[Optional[str], typer.Option("--ffn-activity", help="With --synth: plant FFN neuron "
                                                        "activity (`offbatch synth --ffn-activity`).",
                                                        show_default=False)] = None,
    gpu_memory: GpuMemoryOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    prompts: Annotated[int, typer.Option("--prompts", help="Number of prompts.")] = 64,
    prompt_len: Annotated[int, typer.Option("--prompt-len", help="Tokens per prompt.")] = 256,
    gen_len: Annotated[int, typer.Option("--gen-len", help="Tokens generated per prompt.")] = 16,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    plan_file: Annotated[Optional[Path], typer.Option("--plan", help="Pin this plan (a `plan --json` file) instead of "
                                                      "planning.")] = None,
    hardware: HardwareOpt = None,
    weights: WeightsOpt = None,
    kv: KvOpt = None,
    hgca: HgcaOpt = None,
    kv_balance: KvBalanceOpt = False,
    ffn: FfnOpt = None,
    predictors: PredictorsOpt = None,
    as_json: JsonOpt = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write the JSON report here.")] = None,
):
    """Run a synthetic batch job through the streaming engine and report what limited it."""
    import torch

    from offbatch.attention import get_attention
    from offbatch.engine.benchmark import run_bench
    from offbatch.formats import get_format
    from offbatch.models.dtypes import resolve_dtype
    from offbatch.engine.select import resolve_device
    from offbatch.plan import load_plan_file
    from offbatch.planner.shape import shape_from_spec
    from offbatch.planner.solve import check_caps, predict, resolve_hardware
    from offbatch.planner.workload import Workload

    device = resolve_device(device)
    source = _source(model_dir, synth, layers, ffn_activity)
    spec = source.spec
    cap = byte_size(gpu_memory, "--gpu-memory")
    default_dtype = getattr(torch, spec.torch_dtype)
    hw = resolve_hardware(hardware, device, model_dir)
    workload = Workload.uniform(prompts, prompt_len, gen_len)
    pinned = load_plan_file(plan_file) if plan_file else None
    host_cap = byte_size(cpu_memory, "--cpu-memory")
    check_caps(hw, device, cap, host_cap)  # a pinned plan never meets the planner, which checks them too
    if pinned is not None and host_cap is not None:
        raise OffbatchError("--cpu-memory plans the host side; a pinned --plan already has its own")
    if pinned is not None and weights is not None and weights != pinned.weights:
        raise OffbatchError(f"--weights {weights}: the pinned plan is for {pinned.weights} weights")
    if pinned is not None and (kv or hgca):
        raise OffbatchError("--kv and --hgca are for the planner; a pinned --plan names its own KV format and attention")
    if pinned is not None and pinned.max_len < prompt_len + gen_len:
        raise OffbatchError(f"the plan's context is {pinned.max_len} tokens; this job needs {prompt_len + gen_len}")
    if prompts * prompt_len > MAX_BENCH_PROMPT_TOKENS:  # bench draws every prompt up front, in host memory
        raise OffbatchError(f"--prompts {prompts} x --prompt-len {prompt_len} is {prompts * prompt_len:,} prompt "
                            f"tokens; bench builds them all in memory and takes at most {MAX_BENCH_PROMPT_TOKENS:,}")
    # A pinned hybrid plan needs the neurons too (--predictors picks them, as with --ffn hybrid).
    neurons = neurons_option(model_dir, "hybrid" if pinned is not None and pinned.dense_ffn == "hybrid" else ffn,
                             predictors)
    key_scales = None
    if kv_balance:
        from offbatch.attention.key_balance import key_scales_for_folder
        from offbatch.engine.select import check_kv_balance

        if model_dir is None:
            raise OffbatchError("--kv-balance needs MODEL_DIR with its key scales (offbatch calibrate-keys); a --synth "
                                "shape has none")
        check_kv_balance(kv, pinned)

        key_scales = key_scales_for_folder(model_dir, spec)
    report_file = open_report(out)  # before the bench, which takes minutes
    report = run_bench(source, device, cap, prompts, prompt_len, gen_len, dtype=dtype, default_dtype=default_dtype,
                       plan=pinned, workload=workload, hardware=hw,
                       **({"cpu_memory": host_cap} if host_cap is not None else {}),
                       **({"weights": weights} if weights is not None and pinned is None else {}),
                       **(kv_plan_options(kv, hgca) if pinned is None else {}),
                       **({"neurons": neurons} if neurons is not None else {}),
                       **({"key_scales": key_scales} if key_scales is not None else {}))
    # What the cost model expected of the plan that ran (the solver's own figures, or for a pinned plan,
    # the model applied to it), on the hardware profile used for planning.
    plan_pred = report["plan"].get("predicted") or {}
    if pinned is not None:
        shape = shape_from_spec(spec, resolve_dtype(dtype, default_dtype), get_format(pinned.weights))
        plan_pred = predict(pinned, shape, hw, workload, neurons)
    report["predicted"] = {k: v for k, v in plan_pred.items() if k not in ("decode_step", "prefill_step")}
    report["hardware_profile"] = hw.name
    report["prediction_error"] = {
        k: report[k] / plan_pred[k] - 1 for k in ("prefill_tok_s", "decode_tok_s", "e2e_tok_s") if plan_pred.get(k)}
    if report_file is not None:
        write_report(report_file, json.dumps(report, indent=2))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    plan = report["plan"]
    title = (f"offbatch bench: {report['family']} x{report['layers']} layers, {report['prompts']} prompts x "
             f"{report['prompt_len']} + {report['gen_len']} new, cap {format_bytes(cap) if cap else 'none'}")
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("measured", justify="right")
    t.add_column(f"predicted ({hw.name})", justify="right")
    pred = report["predicted"]

    def both(key, fmt="{:.1f}"):
        return fmt.format(report[key]), (fmt.format(pred[key]) if key in pred else "")

    rows = [
        ("prefill tok/s", *both("prefill_tok_s")),
        ("decode tok/s", *both("decode_tok_s")),
        ("decode step: median / slowest; beyond twice the median",
         f"{report['decode_step_s']['median'] * 1e3:.1f} / {report['decode_step_s']['max'] * 1e3:.1f} ms; "
         f"{report['decode_step_s']['beyond_twice_median']:.2f} s", ""),
        ("end-to-end tok/s (generated)", *both("e2e_tok_s")),
        ("decode floor tok/s", *both("decode_floor_tok_s")),
        ("decode achieved / floor", f"{report['decode_achieved_over_floor']:.2f}", ""),
        ("KV per decode step: read / copied over", f"{format_bytes(report['decode_kv_read_bytes_per_step'])} / "
                                                   f"{format_bytes(report['decode_kv_copied_bytes_per_step'])}", ""),
        ("decode floor with KV copies, achieved", f"{report['decode_floor_with_kv_copies_tok_s']:.1f} tok/s, "
                                                  f"{report['decode_achieved_over_floor_with_kv_copies']:.2f}", ""),
        ("plan", f"{get_attention(plan['attention']).words}"
                 f"{'' if plan.get('kv_format', 'dense') == 'dense' else ', ' + plan['kv_format'] + ' KV'}"
                 f"{' (' + plan['hgca'] + ')' if plan.get('hgca') else ''}, wave {plan['wave_size']}, "
                 f"prefill {plan['prefill_tokens']} tok, attn mb {plan['attn_micro_batch']}, ffn mb "
                 f"{plan['ffn_micro_tokens']} ({'pinned' if pinned else plan.get('chosen_by', 'solver')})", ""),
        ("streamed per decode step", format_bytes(report["decode_bytes_per_step"]),
         format_bytes(plan_pred["decode_step"]["weight_bytes"]) if "decode_step" in plan_pred else ""),
        ("copy rate (pinned, measured)", f"{report['measured_copy_bytes_s'] / 1e9:.1f} GB/s",
         f"{hw.h2d_pinned_bytes_s / 1e9:.1f} GB/s"),
        ("GEMM rate (measured)", f"{report['measured_gemm_flop_s'] / 1e12:.1f} TFLOP/s", ""),
        ("waiting for weights", f"{report['time_split_s']['weight_wait']:.2f} s", ""),
        ("compute + host", f"{report['time_split_s']['other (compute, host)']:.2f} s", ""),
        ("host blocked: routing sync / CPU attention / KV store",
         " / ".join(f"{report['time_split_s'].get(k, 0.0):.2f}" for k in
                    ("host_router_sync", "host_cpu_attention", "host_kv_store_wait")) + " s", ""),
        ("read from disk per step", format_bytes(report.get("disk_bytes_per_step", 0)) + (
            f" at {report['disk_read_bytes_s'] / 1e9:.2f} GB/s" if report.get("disk_read_bytes_s") else "") + (
            " (O_DIRECT: past the page cache)" if report.get("disk_direct_bytes") and not report.get("disk_buffered_bytes")
            else " (through the page cache)" if report.get("disk_buffered_bytes") else ""),
         f"{plan['disk_modules']} disk modules" if plan.get("disk_modules") else "no disk tier"),
        ("peak GPU reserved", format_bytes(report["peak_gpu_reserved_bytes"]),
         format_bytes(sum(plan["memory"].values())) if plan.get("memory") else ""),
        ("peak host RSS", format_bytes(report["peak_host_bytes"]),
         format_bytes(sum(plan["host_memory"].values())) if plan.get("host_memory") else ""),
        ("wall", f"{report['wall_s']:.1f} s", f"{pred['total_s']:.1f} s" if "total_s" in pred else ""),
    ]
    h = report.get("hybrid_ffn")
    if h:  # what the hybrid FFN did: the host's share of the cold neurons, its time and the device's wait for it
        rows.insert(5, ("hybrid FFN: hot per layer / cold computed",
                        f"{h['hot_neurons']} / {100 * h['cold_share_computed']:.1f}% ({h['host_dtype']} on the host)",
                        f"steps <= {plan.get('hybrid_tokens')} tokens"))
        rows.insert(6, ("hybrid FFN: host compute / device thread waited", f"{h['host_s']:.2f} / {h['wait_s']:.2f} s", ""))
        if h.get("fetch_calls"):
            rows.insert(7, ("hybrid FFN: layer steps fetched to the GPU / their time",
                            f"{h['fetch_calls']} of {h['calls']} / {h['fetch_s']:.2f} s",
                            f"steps >= {plan.get('hybrid_fetch_tokens')} tokens"))
    for row in rows:
        t.add_row(*row)
    console = Console()
    console.print(t)
    if pred.get("bottleneck"):
        console.print(f"predicted bottleneck: {pred['bottleneck']}")
