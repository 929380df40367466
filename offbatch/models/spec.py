"""ModelSpec: an architecture-neutral description of a decoder-only model, read from config.json.

Every family's config keys are mapped here and nowhere else; everything downstream (loader,
reference forward, engine, planner) reads only ModelSpec.
"""

from __future__ import annotations

import dataclasses

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from offbatch.errors import ModelFolderError
from offbatch.models.files import exists, json_type, read_json_object

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
    # Synthetic models only (tools/synth.py): (hot fraction, sparsity) of FFN neuron activity planted in the
    # first FFN projection's biases (a ReLU FFN with biases: OPT), from config.json's
    # "offbatch_synth_ffn_activity": {"hot_fraction": h, "sparsity": s}.
    synth_ffn_activity: tuple[float, float] | None = None

    # ---- derived sizes -------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[i]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------
# config.json, read through one table of fields: every value read has its type and range checked
# here, so a wrong-typed, zero or absurd field is one clear error, never a traceback or a model
# whose tensor list grows without bound. The README lists these limits.
MAX_LAYERS = 1024
MAX_VOCAB = 2**24
MAX_HIDDEN = 65536
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_FFN = 2**20  # intermediate sizes (dense, expert, shared expert, OPT ffn_dim)
MAX_POSITION = 2**24
MAX_EXPERTS = 4096
MAX_EXPERT_SLOTS = 2**16  # layers x experts: bounds the tensors a config may ask for
MAX_TOKEN_ID = 2**31 - 1
MAX_EOS_IDS = 1024


@dataclass(frozen=True)
class Field:
    kind: str  # int | float | bool | str | object | ids (an id or a list of ids) | int_list
    lo: float | None = None
    hi: float | None = None

    def describe(self) -> str:
        what = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                "object": "an object ({...})", "ids": "a token id or a list of token ids",
                "int_list": "a list of integers"}[self.kind]
        if self.lo is not None and self.hi is not None:
            what += f" from {_number(self.lo)} to {_number(self.hi)}"
        elif self.lo is not None:
            what += f" of at least {_number(self.lo)}"
        return what

    def check(self, value: Any, where: str) -> Any:
        """The value, converted (a float for 'float'), or a ModelFolderError saying what `where` must be."""
        ok = _TYPE_CHECKS[self.kind](value)
        if ok and self.kind in ("int", "float"):
            # An int is compared as it is: a 400-digit one does not fit a float.
            ok = (isinstance(value, int) or math.isfinite(value)) and self._in_range(value)
        elif ok and self.kind in ("ids", "int_list"):
            items = [value] if isinstance(value, int) else value
            ok = len(items) <= (MAX_EOS_IDS if self.kind == "ids" else MAX_LAYERS) and all(
                _is_int(v) and self._in_range(v) for v in items)
        if not ok:
            raise ModelFolderError(f"{where} must be {self.describe()}, not {json_type(value)}")
        return float(value) if self.kind == "float" else value

    def _in_range(self, v) -> bool:
        return (self.lo is None or v >= self.lo) and (self.hi is None or v <= self.hi)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_TYPE_CHECKS = {
    "int": _is_int,
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, dict),
    "ids": lambda v: _is_int(v) or isinstance(v, list),
    "int_list": lambda v: isinstance(v, list),
}

_SIZE = Field("int", 1, MAX_FFN)
CONFIG_FIELDS: dict[str, Field] = {
    "model_type": Field("str"),
    "vocab_size": Field("int", 1, MAX_VOCAB),
    "hidden_size": Field("int", 1, MAX_HIDDEN),
    "num_hidden_layers": Field("int", 1, MAX_LAYERS),
    "num_attention_heads": Field("int", 1, MAX_HEADS),
    "num_key_value_heads": Field("int", 1, MAX_HEADS),
    "head_dim": Field("int", 1, MAX_HEAD_DIM),
    "intermediate_size": _SIZE,
    "moe_intermediate_size": _SIZE,
    "shared_expert_intermediate_size": Field("int", 0, MAX_FFN),  # 0: no shared expert
    "ffn_dim": _SIZE,
    "word_embed_proj_dim": Field("int", 1, MAX_HIDDEN),
    "max_position_embeddings": Field("int", 1, MAX_POSITION),
    "num_experts": Field("int", 1, MAX_EXPERTS),
    "num_local_experts": Field("int", 1, MAX_EXPERTS),
    "n_routed_experts": Field("int", 1, MAX_EXPERTS),
    "num_experts_per_tok": Field("int", 1, MAX_EXPERTS),
    "decoder_sparse_step": Field("int", 1, MAX_LAYERS),
    "mlp_only_layers": Field("int_list", 0, MAX_LAYERS - 1),
    "sliding_window": Field("int", 0, MAX_POSITION),  # 0: none
    "rms_norm_eps": Field("float", 0, 1),
    "rope_theta": Field("float", 1, 1e12),
    "rope_scaling": Field("object"),
    "rope_parameters": Field("object"),
    "hidden_act": Field("str"),
    "activation_function": Field("str"),
    "torch_dtype": Field("str"),
    "dtype": Field("str"),
    "tie_word_embeddings": Field("bool"),
    "attention_bias": Field("bool"),
    "mlp_bias": Field("bool"),
    "use_sliding_window": Field("bool"),
    "norm_topk_prob": Field("bool"),
    "enable_bias": Field("bool"),
    "do_layer_norm_before": Field("bool"),
    "layer_norm_elementwise_affine": Field("bool"),
    "_remove_final_layer_norm": Field("bool"),
    # Ids are read, not used to index anything here: any integer (some configs say -1 for none).
    "bos_token_id": Field("int"),
    "pad_token_id": Field("int"),
    "eos_token_id": Field("ids", 0, MAX_TOKEN_ID),
}

# rope_scaling's own fields, by rope type.
ROPE_FIELDS: dict[str, dict[str, Field]] = {
    "linear": {"factor": Field("float", 1e-3, 1e6)},
    "llama3": {
        "factor": Field("float", 1e-3, 1e6),
        "low_freq_factor": Field("float", 1e-3, 1e6),
        "high_freq_factor": Field("float", 1e-3, 1e6),
        "original_max_position_embeddings": Field("int", 1, MAX_POSITION),
    },
}
ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _get(cfg: dict, key: str, default: Any = None, *, family: str | None = None, required: bool = False) -> Any:
    """config.json's `key`, checked against CONFIG_FIELDS; null counts as absent."""
    value = cfg.get(key)
    if value is None:
        if required:
            raise ModelFolderError(f"config.json of a {family!r} model is missing the key {key!r}")
        return default
    return CONFIG_FIELDS[key].check(value, f"config.json: {key!r}")


def _need(cfg: dict, key: str, family: str):
    return _get(cfg, key, family=family, required=True)


def _rope(cfg: dict, family: str, head_dim: int) -> tuple[float, dict | None]:
    """Rope theta and scaling from either the classic keys or transformers 5's `rope_parameters`."""
    if head_dim % 2:
        raise ModelFolderError(f"config.json: head_dim {head_dim} is odd; rotary embeddings need an even head_dim")
    params = _get(cfg, "rope_parameters", {})
    scaling = _get(cfg, "rope_scaling") or None
    theta = _get(cfg, "rope_theta")
    if theta is None:
        theta = CONFIG_FIELDS["rope_theta"].check(params.get("rope_theta", 10000.0),
                                                  "config.json: rope_parameters 'rope_theta'")
    if scaling is None and params:
        rest = {k: v for k, v in params.items() if k != "rope_theta"}
        if rest.get("rope_type", rest.get("type", "default")) != "default":
            scaling = rest
    if scaling is None:
        return theta, None
    scaling = dict(scaling)
    rtype = scaling.get("rope_type", scaling.get("type", "default"))
    if rtype == "default":
        return theta, None
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise ModelFolderError(
            f"rope scaling type {str(rtype)[:40]!r} of this {family!r} model is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    scaling["rope_type"] = rtype
    for key, spec in ROPE_FIELDS[rtype].items():
        value = scaling.get(key, ROPE_DEFAULTS.get(key))
        if value is None:
            raise ModelFolderError(f"config.json: rope_scaling of type {rtype!r} is missing its {key!r}")
        scaling[key] = spec.check(value, f"config.json: rope_scaling {key!r}")
    if rtype == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ModelFolderError("config.json: rope_scaling 'high_freq_factor' must be larger than its 'low_freq_factor'")
    return theta, scaling


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(value)


def _num_experts(cfg: dict, family: str) -> int:
    # Mixtral says num_local_experts, Qwen/OLMoE num_experts; transformers 5 writes either.
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        value = _get(cfg, key)
        if value:
            return value
    raise ModelFolderError(f"config.json of a {family!r} model is missing the key 'num_experts' (or 'num_local_experts')")


def _moe(cfg: dict, family: str, num_layers: int, expert_size_key: str, **extra) -> MoESpec:
    experts = _num_experts(cfg, family)
    if num_layers * experts > MAX_EXPERT_SLOTS:
        raise ModelFolderError(f"config.json: {num_layers} layers of {experts} experts is more than offbatch's "
                               f"limit of {MAX_EXPERT_SLOTS} experts in all")
    top_k = _need(cfg, "num_experts_per_tok", family)
    if top_k > experts:
        raise ModelFolderError(f"config.json: num_experts_per_tok {top_k} is more than the {experts} experts")
    return MoESpec(num_experts=experts, top_k=top_k, expert_intermediate_size=_need(cfg, expert_size_key, family),
                   **extra)


def _moe_layer_flags(cfg: dict, num_layers: int) -> tuple[bool, ...]:
    """Qwen2/3-MoE: a layer is sparse unless listed in mlp_only_layers or off the sparse step."""
    step = _get(cfg, "decoder_sparse_step", 1)
    only_mlp = set(_get(cfg, "mlp_only_layers", []))
    outside = sorted(i for i in only_mlp if i >= num_layers)
    if outside:
        raise ModelFolderError(f"config.json: mlp_only_layers {outside} are outside the {num_layers} layers")
    return tuple((i not in only_mlp) and (i + 1) % step == 0 for i in range(num_layers))


def spec_from_config(cfg: dict) -> ModelSpec:
    spec = _spec_from_config(cfg)
    planted = cfg.get("offbatch_synth_ffn_activity")
    return spec if planted is None else dataclasses.replace(spec, synth_ffn_activity=_planted_activity(planted, spec))


def _planted_activity(planted, spec: ModelSpec) -> tuple[float, float]:
    """config.json's offbatch_synth_ffn_activity, checked: a ReLU FFN with biases to plant it in."""
    ok = isinstance(planted, dict) and all(isinstance(planted.get(k), (int, float)) and not isinstance(planted.get(k), bool)
                                           and 0 < planted[k] < 1 for k in ("hot_fraction", "sparsity"))
    if not ok:
        raise ModelFolderError("config.json's offbatch_synth_ffn_activity must be {\"hot_fraction\": h, \"sparsity\": s}, "
                               "each between 0 and 1")
    if spec.activation != "relu" or spec.gated_ffn or not (spec.family == "opt" or spec.mlp_bias) or spec.moe:
        raise ModelFolderError("planted FFN activity needs a plain ReLU FFN with biases (OPT)")
    return float(planted["hot_fraction"]), float(planted["sparsity"])


def _spec_from_config(cfg: dict) -> ModelSpec:
    if not isinstance(cfg, dict):
        raise ModelFolderError(f"config.json must hold a JSON object ({{...}}), not {json_type(cfg)}")
    family = cfg.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        shown = repr(family) if isinstance(family, str) or family is None else json_type(family)
        raise ModelFolderError(
            f"model_type {shown[:60]} is not supported; supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    dtype = _get(cfg, "torch_dtype") or _get(cfg, "dtype") or "float32"
    if dtype not in CHECKPOINT_DTYPES:
        dtype = "float32"
    common: dict[str, Any] = dict(
        family=family,
        vocab_size=_need(cfg, "vocab_size", family),
        hidden_size=_need(cfg, "hidden_size", family),
        num_layers=_need(cfg, "num_hidden_layers", family),
        num_heads=_need(cfg, "num_attention_heads", family),
        max_position=_get(cfg, "max_position_embeddings", 2048),
        tie_word_embeddings=_get(cfg, "tie_word_embeddings", family == "opt"),
        torch_dtype=dtype,
        bos_token_id=_get(cfg, "bos_token_id"),
        eos_token_ids=_eos_ids(_get(cfg, "eos_token_id")),
        pad_token_id=_get(cfg, "pad_token_id"),
    )
    H, nh = common["hidden_size"], common["num_heads"]
    head_dim = _get(cfg, "head_dim")
    if H % nh and not head_dim:
        raise ModelFolderError(f"hidden_size {H} is not a multiple of num_attention_heads {nh} and no head_dim is given")

    if family == "opt":
        act = _get(cfg, "activation_function", "relu")
        if act not in ("relu", "gelu"):
            raise ModelFolderError(f"OPT activation_function {act[:40]!r} is not supported (relu, gelu)")
        proj = _get(cfg, "word_embed_proj_dim") or H
        bias = _get(cfg, "enable_bias", True)
        if not _get(cfg, "layer_norm_elementwise_affine", True):
            raise ModelFolderError("OPT models with layer_norm_elementwise_affine=false are not supported")
        pre = _get(cfg, "do_layer_norm_before", True)
        return ModelSpec(
            **common,
            num_kv_heads=nh,
            head_dim=H // nh,
            intermediate_size=_need(cfg, "ffn_dim", family),
            norm="layer",
            norm_eps=1e-5,
            activation=act,
            gated_ffn=False,
            qkv_bias=bias,
            o_bias=bias,
            mlp_bias=bias,
            positions="learned",
            pre_norm=pre,
            final_norm=pre and not _get(cfg, "_remove_final_layer_norm", False),
            embed_proj_dim=proj if proj != H else None,
        )

    act = _get(cfg, "hidden_act", "silu")
    if act not in ("silu", "relu", "gelu", "gelu_pytorch_tanh"):
        raise ModelFolderError(f"hidden_act {act[:40]!r} is not supported (silu, relu, gelu, gelu_pytorch_tanh)")
    head_dim = head_dim or H // nh
    theta, scaling = _rope(cfg, family, head_dim)
    nkv = _get(cfg, "num_key_value_heads", nh)
    if nh % nkv:
        raise ModelFolderError(f"num_attention_heads {nh} is not a multiple of num_key_value_heads {nkv}")
    window = _get(cfg, "sliding_window")
    if family in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and not _get(cfg, "use_sliding_window", False):
        window = None
    attention_bias = _get(cfg, "attention_bias", False)
    spec = dict(
        **common,
        num_kv_heads=nkv,
        head_dim=head_dim,
        intermediate_size=_get(cfg, "intermediate_size", 0),
        norm_eps=_get(cfg, "rms_norm_eps", 1e-6),
        activation="gelu_tanh" if act == "gelu_pytorch_tanh" else act,
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=window or None,
        mlp_bias=_get(cfg, "mlp_bias", False),
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
            moe=_moe(cfg, family, num_layers, "intermediate_size", norm_topk_prob=True),
            moe_layers=(True,) * num_layers,
            intermediate_size=0,
        )
    elif family in ("qwen2_moe", "qwen3_moe"):
        shared = _get(cfg, "shared_expert_intermediate_size", 0) if family == "qwen2_moe" else 0
        spec.update(
            moe=_moe(cfg, family, num_layers, "moe_intermediate_size",
                     norm_topk_prob=_get(cfg, "norm_topk_prob", False),
                     shared_expert_intermediate_size=shared, shared_expert_gate=shared > 0),
            moe_layers=_moe_layer_flags(cfg, num_layers),
        )
        if family == "qwen2_moe":
            spec.update(qkv_bias=True)
        else:
            spec.update(qk_norm="head", qkv_bias=attention_bias, o_bias=attention_bias)
    elif family == "olmoe":
        spec.update(
            moe=_moe(cfg, family, num_layers, "intermediate_size", norm_topk_prob=_get(cfg, "norm_topk_prob", False)),
            moe_layers=(True,) * num_layers,
            intermediate_size=0,
            qk_norm="full",
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            norm_eps=_get(cfg, "rms_norm_eps", 1e-5),
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
    """config.json of a model folder: a regular file holding one JSON object (its fields are checked
    by spec_from_config)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        hint = ("; a .gguf file is read by `offbatch run` or converted by `offbatch import-gguf`"
                if model_dir.suffix.lower() == ".gguf" and model_dir.is_file() else "")
        raise ModelFolderError(f"model folder {str(model_dir)!r} does not exist or is not a folder{hint}")
    path = model_dir / "config.json"
    if not exists(path):
        raise ModelFolderError(f"{path} not found: a Hugging Face model folder needs a config.json")
    return read_json_object(path)


def load_spec(model_dir: str | Path) -> ModelSpec:
    return spec_from_config(read_config(model_dir))
