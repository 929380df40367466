"""`offbatch inspect MODEL_DIR`: what the model is, how big each part is, what KV costs per token."""

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from offbatch.cli.options import JsonOpt, ModelDirArg
from offbatch.models.catalogue import module_bytes
from offbatch.models.files import exists
from offbatch.models.loader import open_checkpoint
from offbatch.models.tokenizer import load_tokenizer
from offbatch.offload.kv import kv_format
from offbatch.units import format_bytes


def inspect_report(model_dir) -> dict:
    """The same checks `offbatch run` makes of a folder (config.json, every weight file's header and
    layout, the tokenizer files and chat template when there is a tokenizer.json), then the report."""
    ckpt = open_checkpoint(model_dir)
    spec = ckpt.spec
    has_tokenizer = exists(Path(model_dir) / "tokenizer.json")
    tokenizer = load_tokenizer(model_dir) if has_tokenizer else None
    globals_, layers = module_bytes(ckpt)
    report = {
        "model_dir": str(model_dir),
        "family": spec.family,
        "dtype": str(ckpt.dtype()).replace("torch.", ""),
        "weights": ckpt.format.name,  # the weight format the folder is stored in
        "parameters": ckpt.num_params,
        "bytes": ckpt.total_bytes,
        "layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "heads": spec.num_heads,
        "kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "tied_embeddings": ckpt.tied,
        "tokenizer": None if tokenizer is None else {"vocab_size": tokenizer.vocab_size,
                                                     "eos_token_ids": list(tokenizer.eos_token_ids),
                                                     "chat_template": tokenizer.chat_template is not None},
        "experts": spec.moe.num_experts if spec.moe else 0,
        "experts_per_token": spec.moe.top_k if spec.moe else 0,
        "kv_bytes_per_token": kv_format("dense", ckpt.dtype()).bytes_per_token(spec),
        "global_bytes": globals_,
        "per_layer": [
            {"layer": lb.layer, "total": lb.total, **{k: v for k, v in sorted(lb.modules.items()) if not k.startswith("expert.")},
             "experts": lb.experts}
            for lb in layers
        ],
    }
    return report


def command(model_dir: ModelDirArg, as_json: JsonOpt = False):
    """Show a model's family, size, per-layer module bytes and KV bytes per token."""
    r = inspect_report(model_dir)
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    console = Console()
    head = Table(title=f"{model_dir}", show_header=False)
    head.add_row("family", r["family"])
    head.add_row("dtype", r["dtype"])
    head.add_row("parameters", f"{r['parameters'] / 1e9:.3f} B" if r["parameters"] > 1e8 else f"{r['parameters']:,}")
    head.add_row("weights", format_bytes(r["bytes"]) + ("" if r["weights"] == "dense" else f" (stored in {r['weights']})"))
    head.add_row("layers x hidden", f"{r['layers']} x {r['hidden_size']}")
    head.add_row("heads / kv heads / head dim", f"{r['heads']} / {r['kv_heads']} / {r['head_dim']}")
    if r["experts"]:
        head.add_row("experts (top-k)", f"{r['experts']} ({r['experts_per_token']})")
    head.add_row("KV per token", format_bytes(r["kv_bytes_per_token"]))
    tok = r["tokenizer"]
    head.add_row("tokenizer", "none (offbatch run needs a tokenizer.json)" if tok is None else
                 f"{tok['vocab_size']:,} tokens, eos {tok['eos_token_ids']}, "
                 + ("a chat template" if tok["chat_template"] else "no chat template"))
    for name, n in r["global_bytes"].items():
        head.add_row(name, format_bytes(n))
    console.print(head)
    table = Table(title="per layer")
    for col in ("layer", "attention", "dense FFN", "router", "shared expert", "experts", "total"):
        table.add_column(col, justify="right")
    # Consecutive layers of identical make-up share one row ("0-31").
    groups: list[list[dict]] = []
    for row in r["per_layer"]:
        key = {k: v for k, v in row.items() if k != "layer"}
        if groups and {k: v for k, v in groups[-1][0].items() if k != "layer"} == key:
            groups[-1].append(row)
        else:
            groups.append([row])
    for group in groups:
        row = group[0]
        span = str(row["layer"]) if len(group) == 1 else f"{row['layer']}-{group[-1]['layer']}"
        ex = row["experts"]
        experts = "-" if not ex else (f"{len(ex)} x {format_bytes(ex[0])}" if len(set(ex)) == 1 else
                                      ", ".join(format_bytes(e) for e in ex))
        table.add_row(span, format_bytes(row.get("attn", 0)),
                      format_bytes(row["ffn"]) if "ffn" in row else "-",
                      format_bytes(row["router"]) if "router" in row else "-",
                      format_bytes(row["shared"]) if "shared" in row else "-", experts, format_bytes(row["total"]))
    console.print(table)
