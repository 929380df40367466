"""`offbatch synth FAMILY OUT_DIR`: write a complete Hugging Face model folder with random weights."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from offbatch.cli.options import QuietOpt
from offbatch.errors import OffbatchError
from offbatch.models.presets import PRESETS
from offbatch.tools.synth import DEFAULT_SHARD_SIZE, parse_ffn_activity, synth_config, write_model
from offbatch.units import format_bytes, parse_bytes


def _int_opt(flag: str, help: str):
    return Annotated[Optional[int], typer.Option(flag, help=help, show_default=False)]


def command(
    family: Annotated[str, typer.Argument(help="llama, mistral, qwen2, qwen3, opt, mixtral, qwen2_moe, qwen3_moe, "
                                               "olmoe (or a preset name).", show_default=False)],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write (created if missing).", show_default=False)],
    preset: Annotated[Optional[str], typer.Option(
        "--preset", help=f"A real shape: {', '.join(PRESETS)}. Default: a tiny CPU-test shape.")] = None,
    layers: _int_opt("--layers", "Number of decoder layers.") = None,
    hidden_size: _int_opt("--hidden-size", "Hidden size.") = None,
    intermediate_size: _int_opt("--intermediate-size", "Dense FFN width (OPT: ffn_dim).") = None,
    heads: _int_opt("--heads", "Attention heads.") = None,
    kv_heads: _int_opt("--kv-heads", "Key/value heads (GQA).") = None,
    head_dim: _int_opt("--head-dim", "Head dimension (default hidden / heads).") = None,
    experts: _int_opt("--experts", "Routed experts per MoE layer.") = None,
    top_k: _int_opt("--top-k", "Experts per token.") = None,
    moe_intermediate_size: _int_opt("--moe-intermediate-size", "Width of each routed expert.") = None,
    vocab_size: _int_opt("--vocab-size", "Model vocabulary (the tokenizer uses at most a few thousand).") = None,
    max_position: _int_opt("--max-position", "max_position_embeddings.") = None,
    embed_proj_dim: _int_opt("--embed-proj-dim", "OPT: word_embed_proj_dim (project_in/out when != hidden).") = None,
    post_norm: Annotated[bool, typer.Option("--post-norm", help="OPT: do_layer_norm_before=false.")] = False,
    tie: Annotated[Optional[bool], typer.Option("--tie/--no-tie", help="Tie lm_head to the embedding.",
                                                show_default=False)] = None,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", help="bfloat16, float16 or float32 (default: the preset's; tiny: float32).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Weights are a pure function of the seed.")] = 0,
    shard_size: Annotated[str, typer.Option("--shard-size", help="Largest safetensors file, e.g. 2GB, 500MiB.")] = "2GB",
    force: Annotated[bool, typer.Option("--force", help="Overwrite a model already in OUT_DIR.")] = False,
    weights: Annotated[Optional[str], typer.Option("--weights", help="Write the folder stored in this weight format "
                                                   "(as `offbatch convert` would), never holding the dense model: "
                                                   "int8, int4, ..., or with --prune int8 values.",
                                                   show_default=False)] = None,
    ffn_activity: Annotated[Optional[str], typer.Option("--ffn-activity", help="Plant FFN neuron activity "
                                                        "(ReLU FFNs with biases: OPT): hot=0.2,sparsity=0.9 - 90% "
                                                        "of activations 0, the hottest 20% of neurons carrying 80% "
                                                        "of the rest (a power law).", show_default=False)] = None,
    prune: Annotated[Optional[float], typer.Option("--prune", min=0.01, max=0.99, help="Prune this share of each "
                                                   "bulk weight's values by magnitude (bitmap format).")] = None,
    quiet: QuietOpt = False,
):
    """Write a Hugging Face model folder with random weights at a tiny or a real shape."""
    try:
        shard_bytes = parse_bytes(shard_size) if shard_size else DEFAULT_SHARD_SIZE
    except ValueError as e:
        raise OffbatchError(f"--shard-size: {e}") from None
    if shard_bytes < 1:
        raise OffbatchError("--shard-size must be positive")
    cfg = synth_config(
        family, preset, layers=layers, hidden_size=hidden_size, intermediate_size=intermediate_size, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, experts=experts, top_k=top_k,
        moe_intermediate_size=moe_intermediate_size, vocab_size=vocab_size, max_position=max_position,
        embed_proj_dim=embed_proj_dim, post_norm=post_norm or None, tie=tie, dtype=dtype,
        **({"offbatch_synth_ffn_activity": parse_ffn_activity(ffn_activity)} if ffn_activity is not None else {}),
    )
    if weights is not None or prune is not None:
        from offbatch.cli.convert import _format, _pruned_format
        from offbatch.tools.synth import write_in_format

        name = (_pruned_format(prune, weights, "magnitude", None, None, None) if prune is not None
                else _format(weights, None, None))
        summary = write_in_format(cfg, out_dir, name, seed=seed, shard_size=shard_bytes, force=force)
        if not quiet:
            typer.echo(f"wrote {out_dir}: {cfg['model_type']} stored in {summary.format}, "
                       f"{format_bytes(summary.bytes)} ({summary.ratio:.2f}x smaller than {format_bytes(summary.source_bytes)} "
                       f"dense), {summary.seconds:.1f} s")
        return
    result = write_model(cfg, out_dir, seed=seed, shard_size=shard_bytes, force=force)
    if quiet:
        return
    spec = result.spec
    n = result.num_params
    params = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"
    shards = sum(f.endswith(".safetensors") for f in result.files)
    rate = result.weight_bytes / max(result.seconds, 1e-9)
    typer.echo(
        f"wrote {out_dir}: {spec.family}, {params} parameters, {spec.torch_dtype}, "
        f"{format_bytes(result.weight_bytes)} in {shards} safetensors file{'s' * (shards > 1)}, "
        f"{result.seconds:.1f} s ({format_bytes(rate)}/s)"
    )
