"""ModelSpec: an architecture-neutral description of a decoder-only model, read from config.json.

Every family's config keys are mapped here and nowhere else; everything downstream (loader,
reference forward, engine, planner) reads only ModelSpec.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from offbatch.errors import ModelFolderError

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "opt", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
CHECKPOINT_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    norm_topk_prob: bool
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: shared output scaled by sigmoid(gate(x))


@dataclass(frozen=True)
class ModelSpec:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense FFN width (0 when every layer is MoE)
    max_position: int
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    activation: str = "silu"  # "silu" | "relu" | "gelu" | "gelu_tanh"
    gated_ffn: bool = True  # act(gate(x)) * up(x), else act(up(x)) (OPT)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str | None = None  # None | "head" (Qwen3: per head) | "full" (OLMoE: over all heads)
    positions: str = "rope"  # "rope" | "learned" (OPT, with an offset of 2)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3"|"linear", ...}
    sliding_window: int | None = None
    pre_norm: bool = True  # OPT-350m style post-norm when False
    final_norm: bool = True
    embed_proj_dim: int | None = None  # OPT: embeddings narrower than hidden, project_in/out
    tie_word_embeddings: bool = False
    moe: MoESpec | None = None
    moe_layers: tuple[bool, ...] = field(default_factory=tuple)
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    # ---- derived sizes -------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[i]

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------
def _need(cfg: dict, key: str, family: str):
    if key not in cfg or cfg[key] is None:
        raise ModelFolderError(f"config.json of a {family!r} model is missing the key {key!r}")
    return cfg[key]


def _rope(cfg: dict, family: str) -> tuple[float, dict | None]:
    """Rope theta and scaling from either the classic keys or transformers 5's `rope_parameters`."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or None
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is None and params:
        rest = {k: v for k, v in params.items() if k != "rope_theta"}
        if rest.get("rope_type", rest.get("type", "default")) != "default":
            scaling = rest
    if scaling is not None:
        scaling = dict(scaling)
        rtype = scaling.get("rope_type", scaling.get("type", "default"))
        scaling["rope_type"] = rtype
        if rtype == "default":
            scaling = None
        elif rtype not in SUPPORTED_ROPE_TYPES:
            raise ModelFolderError(
                f"rope scaling type {rtype!r} of this {family!r} model is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
    return float(theta), scaling


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _num_experts(cfg: dict, family: str) -> int:
    # Mixtral says num_local_experts, Qwen/OLMoE num_experts; transformers 5 writes either.
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if cfg.get(key):
            return int(cfg[key])
    raise ModelFolderError(f"config.json of a {family!r} model is missing the key 'num_experts' (or 'num_local_experts')")


def _moe_layer_flags(cfg: dict, num_layers: int) -> tuple[bool, ...]:
    """Qwen2/3-MoE: a layer is sparse unless listed in mlp_only_layers or off the sparse step."""
    step = cfg.get("decoder_sparse_step", 1) or 1
    only_mlp = set(cfg.get("mlp_only_layers") or [])
    return tuple((i not in only_mlp) and (i + 1) % step == 0 for i in range(num_layers))


def spec_from_config(cfg: dict) -> ModelSpec:
    family = cfg.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise ModelFolderError(
            f"model_type {family!r} is not supported; supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    if dtype not in CHECKPOINT_DTYPES:
        dtype = "float32"
    common: dict[str, Any] = dict(
        family=family,
        vocab_size=int(_need(cfg, "vocab_size", family)),
        hidden_size=int(_need(cfg, "hidden_size", family)),
        num_layers=int(_need(cfg, "num_hidden_layers", family)),
        num_heads=int(_need(cfg, "num_attention_heads", family)),
        max_position=int(cfg.get("max_position_embeddings") or 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", family == "opt")),
        torch_dtype=dtype,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        pad_token_id=cfg.get("pad_token_id"),
    )
    H, nh = common["hidden_size"], common["num_heads"]
    if H % nh and not cfg.get("head_dim"):
        raise ModelFolderError(f"hidden_size {H} is not a multiple of num_attention_heads {nh} and no head_dim is given")

    if family == "opt":
        act = cfg.get("activation_function", "relu")
        if act not in ("relu", "gelu"):
            raise ModelFolderError(f"OPT activation_function {act!r} is not supported (relu, gelu)")
        proj = cfg.get("word_embed_proj_dim") or H
        bias = bool(cfg.get("enable_bias", True))
        if not cfg.get("layer_norm_elementwise_affine", True):
            raise ModelFolderError("OPT models with layer_norm_elementwise_affine=false are not supported")
        pre = bool(cfg.get("do_layer_norm_before", True))
        return ModelSpec(
            **common,
            num_kv_heads=nh,
            head_dim=H // nh,
            intermediate_size=int(_need(cfg, "ffn_dim", family)),
            norm="layer",
            norm_eps=1e-5,
            activation=act,
            gated_ffn=False,
            qkv_bias=bias,
            o_bias=bias,
            mlp_bias=bias,
            positions="learned",
            pre_norm=pre,
            final_norm=pre and not cfg.get("_remove_final_layer_norm", False),
            embed_proj_dim=proj if proj != H else None,
        )

    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "relu", "gelu", "gelu_pytorch_tanh"):
        raise ModelFolderError(f"hidden_act {act!r} is not supported (silu, relu, gelu, gelu_pytorch_tanh)")
    theta, scaling = _rope(cfg, family)
    nkv = int(cfg.get("num_key_value_heads") or nh)
    if nh % nkv:
        raise ModelFolderError(f"num_attention_heads {nh} is not a multiple of num_key_value_heads {nkv}")
    window = cfg.get("sliding_window")
    if family in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and not cfg.get("use_sliding_window", False):
        window = None
    attention_bias = bool(cfg.get("attention_bias", False))
    spec = dict(
        **common,
        num_kv_heads=nkv,
        head_dim=int(cfg.get("head_dim") or H // nh),
        intermediate_size=int(cfg.get("intermediate_size") or 0),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        activation="gelu_tanh" if act == "gelu_pytorch_tanh" else act,
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=int(window) if window else None,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
    )
    num_layers = common["num_layers"]
    if family in ("llama",):
        spec.update(qkv_bias=attention_bias, o_bias=attention_bias)
    elif family == "qwen2":
        spec.update(qkv_bias=True)
    elif family == "qwen3":
        spec.update(qk_norm="head", qkv_bias=attention_bias, o_bias=attention_bias)
    elif family == "mixtral":
        spec.update(
            moe=MoESpec(
                num_experts=_num_experts(cfg, family),
                top_k=int(_need(cfg, "num_experts_per_tok", family)),
                expert_intermediate_size=int(_need(cfg, "intermediate_size", family)),
                norm_topk_prob=True,
            ),
            moe_layers=(True,) * num_layers,
            intermediate_size=0,
        )
    elif family in ("qwen2_moe", "qwen3_moe"):
        shared = int(cfg.get("shared_expert_intermediate_size") or 0) if family == "qwen2_moe" else 0
        spec.update(
            moe=MoESpec(
                num_experts=_num_experts(cfg, family),
                top_k=int(_need(cfg, "num_experts_per_tok", family)),
                expert_intermediate_size=int(_need(cfg, "moe_intermediate_size", family)),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                shared_expert_intermediate_size=shared,
                shared_expert_gate=shared > 0,
            ),
            moe_layers=_moe_layer_flags(cfg, num_layers),
        )
        if family == "qwen2_moe":
            spec.update(qkv_bias=True)
        else:
            spec.update(qk_norm="head", qkv_bias=attention_bias, o_bias=attention_bias)
    elif family == "olmoe":
        spec.update(
            moe=MoESpec(
                num_experts=_num_experts(cfg, family),
                top_k=int(_need(cfg, "num_experts_per_tok", family)),
                expert_intermediate_size=int(_need(cfg, "intermediate_size", family)),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            ),
            moe_layers=(True,) * num_layers,
            intermediate_size=0,
            qk_norm="full",
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        )
        if cfg.get("clip_qkv"):
            raise ModelFolderError("OLMoE models with clip_qkv are not supported yet")
    # family == "mistral": the Llama layout, nothing more.
    if spec.get("moe_layers") and not all(spec["moe_layers"]) and not spec["intermediate_size"]:
        raise ModelFolderError(f"config.json of a {family!r} model has dense layers but no intermediate_size")
    if not spec.get("moe") and not spec["intermediate_size"]:
        raise ModelFolderError(f"config.json of a {family!r} model is missing the key 'intermediate_size'")
    return ModelSpec(**spec)


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise ModelFolderError(f"model folder {str(model_dir)!r} does not exist or is not a folder")
    if not path.is_file():
        raise ModelFolderError(f"{path} not found: a Hugging Face model folder needs a config.json")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{path} is not valid JSON: {e}") from None


def load_spec(model_dir: str | Path) -> ModelSpec:
    return spec_from_config(read_config(model_dir))
