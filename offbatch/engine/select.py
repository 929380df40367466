"""The one place that picks the engine behind `offbatch run`: the command asks for a Generator and
never learns which one it got, so the streaming engine plugs in here without touching the command."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from offbatch.engine.api import Generator


@dataclass
class EngineOptions:
    device: str | None = None  # None: cuda when present, else cpu
    dtype: str | None = None  # None: the checkpoint's
    gpu_memory: int | None = None  # bytes offbatch may reserve on the GPU; None: all free
    cpu_memory: int | None = None
    max_batch: int = 32  # sequences decoded together (reference path)
    engine: str | None = None  # "streaming" | "reference"; None: streaming on a GPU, reference on the CPU
    # The job, for the streaming engine's planner: each request's prompt length and max_tokens.
    prompt_lens: list[int] | None = None
    gen_lens: list[int] | None = None
    plan_file: Path | None = None  # pin this plan (streaming engine) instead of planning
    weights: str | None = None  # the weight format to run in; None: the folder's own (dense, or as converted)
    kv: str | None = None  # KV formats allowed (--kv: comma list); None: dense
    hgca: str | None = None  # HGCA allowed with this setting (--hgca); None: full attention
    ffn: str | None = None  # "hybrid": the hybrid FFN allowed (--ffn); None: dense
    predictors: str | None = None  # --predictors: a file, "oracle", or None (the folder's)
    kv_balance: bool = False  # --kv-balance: keys balanced by the folder's calibrated scales (attention/key_balance.py)
    split_stream: int = 1  # --split-stream N: N GPUs of this host split the weight stream (engine/split.py)


def check_kv_balance(kv: str | None, plan=None) -> None:
    """--kv-balance needs a compressed KV format: among --kv's (planning), or the pinned plan's."""
    from offbatch.errors import OffbatchError

    if plan is not None and plan.kv_format == "dense":
        raise OffbatchError("--kv-balance balances the keys a compressed KV format stores; the pinned plan's KV is dense")
    if plan is None and not lossy_kv_format(kv):
        raise OffbatchError("--kv-balance balances the keys a compressed KV format stores: give --kv int8 or int4 "
                            "(with exact KV it would change nothing but the rounding)")


def lossy_kv_format(kv: str | None) -> bool:
    """Whether --kv allows a compressed KV format (a comma list of formats; dense alone is exact)."""
    from offbatch.offload.kv import kv_format_name

    names = [n.strip() for n in (kv or "").split(",") if n.strip()]
    out = False
    for n in names:
        try:
            out |= kv_format_name(n) != "dense"
        except KeyError:
            out = True  # an unknown name: --kv's own check says so
    return out


def resolve_device(device: str | None) -> str:
    import torch

    from offbatch.errors import OffbatchError

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise OffbatchError(f"--device {device!r}: use cpu or cuda (cuda:N for one of several GPUs)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OffbatchError(f"--device {device}: no CUDA GPU is visible to torch {torch.__version__}")
    return device


def check_options(options: EngineOptions) -> tuple[str, str, object]:
    """(device, engine kind, pinned plan or None), or one clear error for options that cannot work, before a
    job touches anything."""
    from offbatch.errors import OffbatchError

    from offbatch.planner.solve import check_caps_here

    device = resolve_device(options.device)
    # Compressed KV and HGCA are the streaming engine's (the reference forward keeps exact attention).
    lossy_kv = bool(options.hgca) or (options.kv or "dense") != "dense"
    hybrid = options.ffn == "hybrid"
    kind = options.engine or ("streaming" if device.startswith("cuda") or lossy_kv or hybrid else "reference")
    if kind == "reference" and lossy_kv:
        raise OffbatchError("--kv and --hgca run in the streaming engine; drop --engine reference")
    if kind == "reference" and hybrid:
        raise OffbatchError("--ffn hybrid runs in the streaming engine; drop --engine reference")
    if options.kv_balance and options.plan_file is None:
        check_kv_balance(options.kv)
    if options.predictors is not None and not hybrid and options.plan_file is None:
        raise OffbatchError("--predictors is for --ffn hybrid (or a pinned plan whose FFN is hybrid)")
    if kind not in ("streaming", "reference"):
        raise OffbatchError(f"--engine {kind!r}: use streaming or reference")
    if options.split_stream > 1:
        if kind != "streaming":
            raise OffbatchError("--split-stream splits the streaming engine's weight stream; on the CPU add "
                                "--engine streaming")
        if hybrid:
            raise OffbatchError("--split-stream runs dense FFN layers; drop --ffn hybrid")
        if device.startswith("cuda"):
            import torch

            if device != "cuda":
                raise OffbatchError(f"--device {device} with --split-stream: the ranks take cuda:0 to "
                                    f"cuda:{options.split_stream - 1}; give --device cuda")
            if torch.cuda.device_count() < options.split_stream:
                raise OffbatchError(f"--split-stream {options.split_stream}: {torch.cuda.device_count()} GPU(s) "
                                    "visible to torch")
    check_caps_here(device, options.gpu_memory, options.cpu_memory)  # before anything is read or locked
    if options.plan_file is not None:
        if kind != "streaming":
            raise OffbatchError("--plan pins the streaming engine's plan; this run uses the reference engine "
                                "(the CPU default): add --engine streaming")
        if options.cpu_memory is not None:
            raise OffbatchError("--cpu-memory plans the host side; a pinned --plan already has its own")
        if options.weights is not None:
            raise OffbatchError("--weights picks the format the planner plans for; a pinned --plan names its own")
        if options.kv is not None or options.hgca is not None:
            raise OffbatchError("--kv and --hgca are for the planner; a pinned --plan names its own KV format and attention")
        from offbatch.plan import load_plan_file

        plan = load_plan_file(options.plan_file)
        if hybrid and plan.dense_ffn != "hybrid":
            raise OffbatchError("--ffn hybrid is for the planner; the pinned plan's FFN is dense")
        if options.predictors is not None and plan.dense_ffn != "hybrid":
            raise OffbatchError("--predictors is for --ffn hybrid (or a pinned plan whose FFN is hybrid)")
        if options.kv_balance:
            check_kv_balance(None, plan)
        return device, kind, plan
    return device, kind, None


def make_generator(model_dir: str | Path, tokenizer, options: EngineOptions | None = None) -> Generator:
    """A Generator for the model folder: the streaming engine (module-based batching under the GPU cap)
    when the device is a GPU, else the reference forward's continuous batching on the CPU. Both give the
    same greedy tokens; `engine="streaming"` on the CPU runs the streaming engine's scheduling there."""
    options = options or EngineOptions()
    device, kind, plan = check_options(options)
    if kind == "streaming":
        from offbatch.engine.build import engine_for_folder
        from offbatch.planner.workload import Workload

        workload = None
        if options.prompt_lens:
            workload = Workload.from_lengths(options.prompt_lens, options.gen_lens)
        pinned = {}
        if plan is not None:
            from offbatch.errors import OffbatchError

            if workload is not None and workload.max_len > plan.max_len:
                raise OffbatchError(f"the plan's context is {plan.max_len} tokens; this job needs {workload.max_len} "
                                    "(its longest prompt plus max_tokens): plan for this job's prompts")
            pinned = {"plan": plan}
        else:
            from offbatch.cli.options import kv_plan_options

            pinned = kv_plan_options(options.kv, options.hgca)
        if options.split_stream > 1:  # (each rank reads the key scales itself)
            from offbatch.engine.split import make_split_generator

            return make_split_generator(model_dir, tokenizer, options, device, plan, pinned)
        if options.kv_balance:
            from offbatch.attention.key_balance import key_scales_for_folder

            pinned["key_scales"] = key_scales_for_folder(model_dir)
        if options.ffn == "hybrid" or (plan is not None and plan.dense_ffn == "hybrid"):
            from offbatch.ffn.neurons import neuron_stats_for_folder

            pinned["neurons"] = neuron_stats_for_folder(model_dir, options.predictors)
        return engine_for_folder(model_dir, device=device, dtype=options.dtype, gpu_memory=options.gpu_memory,
                                 cpu_memory=options.cpu_memory, workload=workload,
                                 num_requests=workload.num_requests if workload else 64,
                                 max_len=workload.max_len if workload else 2048,
                                 eos_token_ids=tokenizer.eos_token_ids, weights=options.weights, **pinned)
    from offbatch.engine.reference_generator import ReferenceGenerator
    from offbatch.engine.reference import ReferenceModel

    # The reference holds the whole model on one device: the correctness path, not the fast one.
    import torch

    # On the CPU a compressed format is decoded once at load (the same products as decoding at each use).
    model = ReferenceModel.load(model_dir, device=device, dtype=options.dtype, weights=options.weights,
                                expand=torch.device(device).type == "cpu")
    return ReferenceGenerator(model, tokenizer.eos_token_ids, max_batch=options.max_batch)
