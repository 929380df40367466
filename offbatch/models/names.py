"""Tensor-name maps: each family's checkpoint names <-> offbatch's canonical names, with shapes.

Canonical names are short and family-neutral:
  global:  embed, pos_embed, project_in, project_out, final_norm.weight/.bias, lm_head
  layer i: layers.{i}.{attn_norm,ffn_norm}.{weight,bias}, layers.{i}.{q,k,v,o}.{weight,bias},
           layers.{i}.{q_norm,k_norm}.weight, layers.{i}.{gate,up,down}.{weight,bias} (dense FFN),
           layers.{i}.router.weight, layers.{i}.experts.{e}.{gate,up,down}.weight,
           layers.{i}.shared.{gate,up,down}.weight, layers.{i}.shared_gate.weight
"""

from __future__ import annotations

from dataclasses import dataclass

from offbatch.models.spec import ModelSpec


@dataclass(frozen=True)
class TensorInfo:
    canonical: str
    shape: tuple[int, ...]


def _layer_prefix(spec: ModelSpec) -> str:
    return "model.decoder.layers" if spec.family == "opt" else "model.layers"


def _attention(spec: ModelSpec, p: str, c: str) -> dict[str, TensorInfo]:
    H, q, kv = spec.hidden_size, spec.q_size, spec.kv_size
    o_name = "out_proj" if spec.family == "opt" else "o_proj"
    out = {
        f"{p}.self_attn.q_proj.weight": TensorInfo(f"{c}.q.weight", (q, H)),
        f"{p}.self_attn.k_proj.weight": TensorInfo(f"{c}.k.weight", (kv, H)),
        f"{p}.self_attn.v_proj.weight": TensorInfo(f"{c}.v.weight", (kv, H)),
        f"{p}.self_attn.{o_name}.weight": TensorInfo(f"{c}.o.weight", (H, q)),
    }
    if spec.qkv_bias:
        out[f"{p}.self_attn.q_proj.bias"] = TensorInfo(f"{c}.q.bias", (q,))
        out[f"{p}.self_attn.k_proj.bias"] = TensorInfo(f"{c}.k.bias", (kv,))
        out[f"{p}.self_attn.v_proj.bias"] = TensorInfo(f"{c}.v.bias", (kv,))
    if spec.o_bias:
        out[f"{p}.self_attn.{o_name}.bias"] = TensorInfo(f"{c}.o.bias", (H,))
    if spec.qk_norm == "head":
        out[f"{p}.self_attn.q_norm.weight"] = TensorInfo(f"{c}.q_norm.weight", (spec.head_dim,))
        out[f"{p}.self_attn.k_norm.weight"] = TensorInfo(f"{c}.k_norm.weight", (spec.head_dim,))
    elif spec.qk_norm == "full":
        out[f"{p}.self_attn.q_norm.weight"] = TensorInfo(f"{c}.q_norm.weight", (q,))
        out[f"{p}.self_attn.k_norm.weight"] = TensorInfo(f"{c}.k_norm.weight", (kv,))
    return out


def _norms(spec: ModelSpec, p: str, c: str) -> dict[str, TensorInfo]:
    H = spec.hidden_size
    if spec.family == "opt":
        names = {"attn_norm": "self_attn_layer_norm", "ffn_norm": "final_layer_norm"}
    else:
        names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    out = {}
    for canon, hf in names.items():
        out[f"{p}.{hf}.weight"] = TensorInfo(f"{c}.{canon}.weight", (H,))
        if spec.norm == "layer":
            out[f"{p}.{hf}.bias"] = TensorInfo(f"{c}.{canon}.bias", (H,))
    return out


def _mlp(spec: ModelSpec, p: str, c: str, inter: int, canon_prefix: str, hf_prefix: str, bias: bool):
    H = spec.hidden_size
    out = {}
    parts = [("up", "up_proj", (inter, H)), ("down", "down_proj", (H, inter))]
    if spec.gated_ffn:
        parts.insert(0, ("gate", "gate_proj", (inter, H)))
    for canon, hf, shape in parts:
        out[f"{p}.{hf_prefix}{hf}.weight"] = TensorInfo(f"{c}.{canon_prefix}{canon}.weight", shape)
        if bias:
            out[f"{p}.{hf_prefix}{hf}.bias"] = TensorInfo(f"{c}.{canon_prefix}{canon}.bias", (shape[0],))
    return out


def _ffn(spec: ModelSpec, i: int, p: str, c: str) -> dict[str, TensorInfo]:
    H = spec.hidden_size
    if spec.family == "opt":
        I = spec.intermediate_size
        out = {
            f"{p}.fc1.weight": TensorInfo(f"{c}.up.weight", (I, H)),
            f"{p}.fc2.weight": TensorInfo(f"{c}.down.weight", (H, I)),
        }
        if spec.mlp_bias:
            out[f"{p}.fc1.bias"] = TensorInfo(f"{c}.up.bias", (I,))
            out[f"{p}.fc2.bias"] = TensorInfo(f"{c}.down.bias", (H,))
        return out
    if not spec.is_moe_layer(i):
        return _mlp(spec, p, c, spec.intermediate_size, "", "mlp.", spec.mlp_bias)
    moe = spec.moe
    assert moe is not None
    E, I = moe.num_experts, moe.expert_intermediate_size
    out: dict[str, TensorInfo] = {}
    if spec.family == "mixtral":
        out[f"{p}.block_sparse_moe.gate.weight"] = TensorInfo(f"{c}.router.weight", (E, H))
        for e in range(E):
            q = f"{p}.block_sparse_moe.experts.{e}"
            out[f"{q}.w1.weight"] = TensorInfo(f"{c}.experts.{e}.gate.weight", (I, H))
            out[f"{q}.w3.weight"] = TensorInfo(f"{c}.experts.{e}.up.weight", (I, H))
            out[f"{q}.w2.weight"] = TensorInfo(f"{c}.experts.{e}.down.weight", (H, I))
        return out
    out[f"{p}.mlp.gate.weight"] = TensorInfo(f"{c}.router.weight", (E, H))
    for e in range(E):
        out.update(_mlp(spec, p, c, I, f"experts.{e}.", f"mlp.experts.{e}.", False))
    if moe.shared_expert_intermediate_size:
        out.update(_mlp(spec, p, c, moe.shared_expert_intermediate_size, "shared.", "mlp.shared_expert.", False))
    if moe.shared_expert_gate:
        out[f"{p}.mlp.shared_expert_gate.weight"] = TensorInfo(f"{c}.shared_gate.weight", (1, H))
    return out


def global_tensors(spec: ModelSpec) -> dict[str, TensorInfo]:
    V, H = spec.vocab_size, spec.hidden_size
    E = spec.embed_proj_dim or H
    if spec.family == "opt":
        out = {
            "model.decoder.embed_tokens.weight": TensorInfo("embed", (V, E)),
            # OPT's learned positions are offset by 2 (a fairseq legacy).
            "model.decoder.embed_positions.weight": TensorInfo("pos_embed", (spec.max_position + 2, H)),
        }
        if spec.final_norm:
            out["model.decoder.final_layer_norm.weight"] = TensorInfo("final_norm.weight", (H,))
            out["model.decoder.final_layer_norm.bias"] = TensorInfo("final_norm.bias", (H,))
        if spec.embed_proj_dim:
            out["model.decoder.project_in.weight"] = TensorInfo("project_in", (H, E))
            out["model.decoder.project_out.weight"] = TensorInfo("project_out", (E, H))
    else:
        out = {
            "model.embed_tokens.weight": TensorInfo("embed", (V, H)),
            "model.norm.weight": TensorInfo("final_norm.weight", (H,)),
        }
    out["lm_head.weight"] = TensorInfo("lm_head", (V, E))
    return out


def layer_tensors(spec: ModelSpec, i: int) -> dict[str, TensorInfo]:
    p, c = f"{_layer_prefix(spec)}.{i}", f"layers.{i}"
    out = _norms(spec, p, c)
    out.update(_attention(spec, p, c))
    out.update(_ffn(spec, i, p, c))
    return out


def expected_tensors(spec: ModelSpec) -> dict[str, TensorInfo]:
    """Checkpoint name -> (canonical name, shape), for every tensor the model needs."""
    out = global_tensors(spec)
    for i in range(spec.num_layers):
        out.update(layer_tensors(spec, i))
    return out


# Names some exporters write that carry nothing we need.
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")
