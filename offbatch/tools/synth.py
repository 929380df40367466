"""Synthetic Hugging Face model folders: real configs and shapes, random weights, written fast.

Why: tests and benchmarks need models of every supported family, at tiny and at real shapes, and
nothing may be downloaded. `transformers` is the correctness oracle on these folders.

How the weights stay fast and deterministic: one pool of N(0, 1) floats is drawn per seed (64 MiB,
once per process). A tensor is split into 32K-element chunks; chunk j is pool[o_j : o_j + len] times
±std, with o_j and the sign drawn from a generator seeded by (seed, tensor name). So any single tensor
can be made on demand, and filling is memory-bandwidth bound. Chunks stay below torch's parallel grain
size on purpose: torch then runs them inline on one core, which is ~10x faster than a two-thread
OpenMP team on a loaded two-core machine. Files are written in 8 MiB blocks while the next block is
filled (a writer thread), so peak memory is two blocks plus the pool, whatever the model size.

Scales (see `_init_rule`): linear weights N(0, 1/fan_in) keep activations O(1) through pre-norm
blocks; norm weights 1 + N(0, 0.1²); lm_head makes logits ~N(0, 4²), so greedy decoding has clear
winners; routers make expert logits ~N(0, 2²), so top-k is not tied.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import math
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from offbatch.errors import OffbatchError
from offbatch.tools import synth_tokenizer
from offbatch.models.names import TensorInfo, expected_tensors
from offbatch.models.presets import PRESETS, TINY
from offbatch.models.spec import SUPPORTED_FAMILIES, ModelSpec, load_spec, spec_from_config

POOL_SIZE = 1 << 24  # N(0,1) floats per seed: 64 MiB
CHUNK = 1 << 15  # elements per pool slice; <= torch's GRAIN_SIZE so each op runs on one thread
BLOCK_BYTES = 8 << 20  # write granularity (two such buffers alternate)
DEFAULT_SHARD_SIZE = 2_000_000_000

LOGIT_STD = 4.0  # std of logits before training: clear top-1 vs top-2 margins
ROUTER_STD = 2.0  # std of router logits: distinct expert choices
NORM_NOISE = 0.1
BIAS_STD = 0.1

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "opt": "OPTForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
# Families whose generation_config lists two eos ids (as Llama-3.1 and Qwen instruct models do).
EOS_LIST_FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe")
# Families whose tokenizer prepends BOS on encode.
ADD_BOS_FAMILIES = ("llama", "opt")


class SynthError(OffbatchError):
    """A synthetic model cannot be made as asked (unknown family/preset, inconsistent shape)."""


# ---------------------------------------------------------------------------------------------
# config.json


def _family_base(family: str) -> dict[str, Any]:
    """Keys every config.json of `family` carries, in the classic names transformers 4.x and 5.x read."""
    ids = synth_tokenizer.SPECIAL_IDS
    eos = ids[synth_tokenizer.EOS_TOKEN]
    cfg: dict[str, Any] = {
        "model_type": family,
        "architectures": [ARCHITECTURES[family]],
        "bos_token_id": ids[synth_tokenizer.BOS_TOKEN],
        # Llama-3.1 lists its eos ids in config.json too; the others keep one there.
        "eos_token_id": [eos, ids[synth_tokenizer.ENDOFTEXT]] if family == "llama" else eos,
        "pad_token_id": ids[synth_tokenizer.PAD_TOKEN],
        "use_cache": True,
    }
    if family == "opt":
        cfg.update(
            activation_function="relu", do_layer_norm_before=True, enable_bias=True,
            layer_norm_elementwise_affine=True, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            layerdrop=0.0, init_std=0.02, tie_word_embeddings=True, _remove_final_layer_norm=False,
        )
        return cfg
    cfg.update(
        hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, attention_dropout=0.0,
        tie_word_embeddings=False, initializer_range=0.02,
    )
    if family in ("llama", "qwen3", "qwen3_moe", "olmoe"):
        cfg["attention_bias"] = False
    if family == "llama":
        cfg["mlp_bias"] = False
    if family in ("mistral", "mixtral"):
        cfg["sliding_window"] = None
    if family in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        cfg.update(use_sliding_window=False, sliding_window=None)
    if family == "olmoe":
        cfg["clip_qkv"] = None
    if family in MOE_FAMILIES:
        cfg.update(output_router_logits=False, router_aux_loss_coef=0.001)
    return cfg


def resolve_preset(family: str, preset: str | None) -> tuple[str, str | None]:
    """(family, preset) after checks; FAMILY may also be a preset name (`synth mixtral-8x7b out`)."""
    if preset is None and family in PRESETS:
        preset = family
        family = PRESETS[preset].family
    if preset is not None:
        if preset not in PRESETS:
            raise SynthError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        want = PRESETS[preset].family
        if family != want:
            raise SynthError(
                f"preset {preset!r} is a {want!r} model, not {family!r}: "
                f"use `offbatch synth {want} OUT_DIR --preset {preset}`"
            )
    if family not in SUPPORTED_FAMILIES:
        raise SynthError(
            f"unknown family {family!r}; families: {', '.join(SUPPORTED_FAMILIES)}; presets: {', '.join(PRESETS)}"
        )
    return family, preset


FRIENDLY_OVERRIDES = frozenset({
    "layers", "hidden_size", "intermediate_size", "heads", "kv_heads", "head_dim", "experts", "top_k",
    "moe_intermediate_size", "vocab_size", "max_position", "dtype", "tie", "embed_proj_dim", "post_norm",
})


def _override_key(family: str, name: str) -> str:
    """Config key a friendly override name sets for this family (raw config keys pass through)."""
    moe_only = {"experts", "top_k", "moe_intermediate_size"}
    if name in moe_only and family not in MOE_FAMILIES:
        raise SynthError(f"--{name.replace('_', '-')} applies to MoE families only ({', '.join(MOE_FAMILIES)})")
    opt_only = {"embed_proj_dim", "post_norm"}
    if name in opt_only and family != "opt":
        raise SynthError(f"--{name.replace('_', '-')} applies to the opt family only")
    if family == "opt" and name in ("kv_heads", "head_dim"):
        raise SynthError(f"--{name.replace('_', '-')} does not apply to opt (head_dim = hidden_size / heads)")
    keys = {
        "layers": "num_hidden_layers",
        "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads",
        "max_position": "max_position_embeddings",
        "tie": "tie_word_embeddings",
        "dtype": "torch_dtype",
        "top_k": "num_experts_per_tok",
        "experts": "num_local_experts" if family == "mixtral" else "num_experts",
        "embed_proj_dim": "word_embed_proj_dim",
        "intermediate_size": "ffn_dim" if family == "opt" else "intermediate_size",
        # Mixtral and OLMoE name the expert width intermediate_size.
        "moe_intermediate_size": "intermediate_size" if family in ("mixtral", "olmoe") else "moe_intermediate_size",
    }
    return keys.get(name, name)


def synth_config(family: str, preset: str | None = None, **overrides: Any) -> dict[str, Any]:
    """A complete config.json dict: the family's tiny default or a preset, with overrides on top.

    Friendly override names (None = not given): layers, hidden_size, intermediate_size, heads, kv_heads,
    head_dim, experts, top_k, moe_intermediate_size, vocab_size, max_position, dtype, tie, embed_proj_dim
    (OPT), post_norm (OPT). Any other name is set as a raw config.json key, None included
    (e.g. mlp_only_layers=[0], sliding_window=None).
    """
    family, preset = resolve_preset(family, preset)
    cfg = _family_base(family)
    if preset is not None:
        cfg.update(copy.deepcopy(PRESETS[preset].config))
        cfg["torch_dtype"] = PRESETS[preset].dtype
    else:
        cfg.update(copy.deepcopy(TINY[family]))
        cfg["torch_dtype"] = "float32"
    if family == "opt" and "word_embed_proj_dim" not in cfg:
        cfg["word_embed_proj_dim"] = cfg["hidden_size"]
    hidden_given = overrides.get("hidden_size") is not None
    for name, value in overrides.items():
        if value is None and name in FRIENDLY_OVERRIDES:
            continue  # a CLI flag not given
        key = _override_key(family, name)
        if name == "post_norm":
            cfg["do_layer_norm_before"] = not value
        else:
            cfg[key] = value
    if family == "opt" and hidden_given and overrides.get("embed_proj_dim") is None:
        cfg["word_embed_proj_dim"] = cfg["hidden_size"]  # a narrower width only when asked for
    _check_config(cfg)
    return cfg


def _check_config(cfg: dict) -> None:
    """Shape checks with messages in the CLI's terms, then offbatch's own reading of the config."""
    family = cfg["model_type"]
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
                "intermediate_size", "ffn_dim", "num_key_value_heads", "head_dim", "num_experts", "num_local_experts",
                "num_experts_per_tok", "moe_intermediate_size", "word_embed_proj_dim"):
        value = cfg.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise SynthError(f"{key} must be a positive integer, got {value!r}")
    if cfg["torch_dtype"] not in TORCH_DTYPES:
        raise SynthError(f"dtype {cfg['torch_dtype']!r} is not one of {', '.join(TORCH_DTYPES)}")
    if cfg["vocab_size"] < synth_tokenizer.MIN_VOCAB:
        raise SynthError(f"vocab_size {cfg['vocab_size']} is too small: the tokenizer needs {synth_tokenizer.MIN_VOCAB}")
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    if H % nh and not cfg.get("head_dim"):
        raise SynthError(f"hidden_size {H} is not a multiple of heads {nh} (give --head-dim)")
    nkv = cfg.get("num_key_value_heads") or nh
    if nh % nkv:
        raise SynthError(f"heads {nh} is not a multiple of kv heads {nkv}")
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    if family in MOE_FAMILIES and cfg["num_experts_per_tok"] > experts:
        raise SynthError(f"top-k {cfg['num_experts_per_tok']} is larger than the number of experts {experts}")
    bad = [i for i in cfg.get("mlp_only_layers") or [] if not 0 <= i < cfg["num_hidden_layers"]]
    if bad:
        raise SynthError(f"mlp_only_layers {bad} are outside the {cfg['num_hidden_layers']} layers")
    spec = spec_from_config(cfg)  # offbatch must accept what we write
    if spec.synth_ffn_activity is not None:  # refused now, not halfway through the files
        activity_probabilities(spec.intermediate_size, *spec.synth_ffn_activity, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# tensors


def checkpoint_tensors(spec: ModelSpec) -> dict[str, TensorInfo]:
    """The tensors a checkpoint of `spec` holds, in file order: embeddings, layers, final norm, heads.

    lm_head is left out when tied (transformers reads it from the embedding).
    """
    tensors = expected_tensors(spec)
    if spec.tie_word_embeddings:
        tensors.pop("lm_head.weight")

    def group(item):
        canonical = item[1].canonical
        if canonical in ("embed", "pos_embed", "project_in"):
            return 0
        return 1 if canonical.startswith("layers.") else 2

    return dict(sorted(tensors.items(), key=group))  # stable: layers keep their order


def param_count(spec: ModelSpec) -> int:
    return sum(math.prod(info.shape) for info in checkpoint_tensors(spec).values())


def _init_rule(spec: ModelSpec, canonical: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a tensor's entries; see the module docstring for why."""
    width = spec.embed_proj_dim or spec.hidden_size
    if canonical in ("embed", "pos_embed"):
        # Tied: the embedding is the lm_head, so it carries the logit scale; untied: O(1) residual.
        return 0.0, LOGIT_STD / math.sqrt(width) if spec.tie_word_embeddings else 1.0
    if canonical == "lm_head":
        return 0.0, LOGIT_STD / math.sqrt(width)
    if canonical.endswith("norm.weight"):
        last = "final_norm.weight" if spec.final_norm else f"layers.{spec.num_layers - 1}.ffn_norm.weight"
        if spec.tie_word_embeddings and canonical == last:
            # Tied: the residual still holds the input token's own embedding, which would give that
            # token a logit bonus of ~LOGIT_STD² and make greedy decoding repeat it forever. Norm
            # weights of random sign cancel that bonus in expectation.
            return 0.0, 1.0
        return 1.0, NORM_NOISE
    if canonical.endswith("norm.bias"):
        return 0.0, NORM_NOISE / 5
    if canonical.endswith(".bias"):
        return 0.0, BIAS_STD
    if canonical.endswith("router.weight"):
        return 0.0, ROUTER_STD / math.sqrt(shape[1])
    # Linear weights (out, in), project_in/out and the shared-expert gate: unit gain.
    return 0.0, 1.0 / math.sqrt(shape[-1])


@lru_cache(maxsize=2)
def _pool(seed: int) -> torch.Tensor:
    rng = np.random.default_rng([seed, 0x5EED])
    return torch.from_numpy(rng.standard_normal(POOL_SIZE, dtype=np.float32))


@dataclass
class _Plan:
    """Where each chunk of one tensor comes from in the pool, and its signed scale."""

    numel: int
    mean: float
    offsets: list[int]
    scales: list[float]


def _plan(spec: ModelSpec, name: str, info: TensorInfo, seed: int) -> _Plan:
    numel = math.prod(info.shape)
    mean, std = _init_rule(spec, info.canonical, info.shape)
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    rng = np.random.default_rng([seed, int.from_bytes(digest, "little")])
    n_chunks = max(1, -(-numel // CHUNK))
    offsets = rng.integers(0, POOL_SIZE - CHUNK + 1, size=n_chunks)
    signs = rng.integers(0, 2, size=n_chunks) * 2 - 1
    return _Plan(numel, mean, offsets.tolist(), (signs * std).tolist())


FILL_CHUNKS = 256  # pool slices gathered per step of _fill: bounds its temporaries (32 MiB of float32)


def _pool_on(seed: int, device: torch.device | str) -> torch.Tensor:
    pool = _pool(seed)
    return pool if torch.device(device).type == "cpu" else _device_pool(seed, str(device))


@lru_cache(maxsize=2)
def _device_pool(seed: int, device: str) -> torch.Tensor:
    return _pool(seed).to(device)


def _fill(dst: torch.Tensor, start: int, plan: _Plan, pool: torch.Tensor) -> None:
    """Write elements [start, start + dst.numel()) of the planned tensor into the flat `dst` (on the pool's
    device).

    Values are computed in float32 and rounded once to dst's dtype, so every dtype holds the same
    weights up to rounding. Slices of the pool are gathered many at a time (one op each, all threads or a
    GPU): per-slice ops ran single-threaded at about 100 M elements/s, minutes for a 70B shape.
    """
    n = dst.numel()
    if n == 0:
        return
    windows = pool.as_strided((pool.numel() - CHUNK + 1, CHUNK), (1, 1))  # every slice the plan may pick
    first, last = start // CHUNK, (start + n - 1) // CHUNK + 1
    for b in range(first, last, FILL_CHUNKS):
        e = min(last, b + FILL_CHUNKS)
        rows = windows[torch.tensor(plan.offsets[b:e], device=pool.device)]
        rows.mul_(torch.tensor(plan.scales[b:e], dtype=torch.float32, device=pool.device)[:, None])
        if plan.mean != 0.0:
            rows.add_(plan.mean)
        lo, hi = max(start, b * CHUNK), min(start + n, e * CHUNK)
        dst[lo - start: hi - start].copy_(rows.view(-1)[lo - b * CHUNK: hi - b * CHUNK])


def _dtype(spec: ModelSpec, dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        dtype = spec.torch_dtype
    if isinstance(dtype, str):
        if dtype not in TORCH_DTYPES:
            raise SynthError(f"dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
        return TORCH_DTYPES[dtype]
    return dtype


def parse_ffn_activity(text: str) -> dict:
    """'hot=0.2,sparsity=0.9' (the CLI's --ffn-activity) -> config.json's offbatch_synth_ffn_activity."""
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = {"hot": "hot_fraction", "hot_fraction": "hot_fraction", "sparsity": "sparsity"}.get(key.strip())
        try:
            number = float(value)
        except ValueError:
            number = None
        if key is None or number is None or not 0 < number < 1:
            raise SynthError(f"--ffn-activity {text!r}: give hot=H,sparsity=S, each between 0 and 1")
        out[key] = number
    if set(out) != {"hot_fraction", "sparsity"}:
        raise SynthError(f"--ffn-activity {text!r}: give both hot=H and sparsity=S")
    return out


HOT_SHARE = 0.8  # planted activity: the hot neurons carry this share of all activations


def activity_probabilities(n: int, hot_fraction: float, sparsity: float, rng: np.random.Generator) -> np.ndarray:
    """Each of n neurons' chance to be active, with a mean of 1 - sparsity: the hottest hot_fraction of the
    neurons carry HOT_SHARE of the activations, the rest the remainder, each group a power law over its
    ranks (p ~ rank^-0.5, none above 0.99), in random neuron order."""
    top = min(n - 1, max(1, int(round(hot_fraction * n))))
    mass = (1.0 - sparsity) * n
    if HOT_SHARE * mass > 0.99 * top or (1 - HOT_SHARE) * mass > 0.99 * (n - top):
        raise SynthError(f"--ffn-activity hot={hot_fraction:g},sparsity={sparsity:g}: the hot neurons would have to "
                         "be active nearly always; give a larger hot share or a higher sparsity")

    def group(count: int, total: float) -> np.ndarray:
        p = np.arange(1, count + 1, dtype=np.float64) ** -0.5
        p *= total / p.sum()
        for _ in range(50):  # no chance above 0.99: what a clip removes goes to the rest of the group
            over = p > 0.99
            if not over.any():
                break
            p[over] = 0.99
            p[~over] *= (total - 0.99 * over.sum()) / p[~over].sum()
        return p

    p = np.concatenate([group(top, HOT_SHARE * mass), group(n - top, (1 - HOT_SHARE) * mass)])
    return rng.permutation(p)


def _planted_bias(spec: ModelSpec, info: TensorInfo, seed: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The first FFN projection's bias of a model with planted activity: b_j = |w_j| * ndtri(p_j), so that
    over unit-variance inputs (a normed hidden state) neuron j's pre-activation x.w_j + b_j is above 0 with
    chance p_j. None for any other tensor."""
    m = re.fullmatch(r"layers\.(\d+)\.up\.bias", info.canonical)
    if spec.synth_ffn_activity is None or m is None:
        return None
    layer = int(m.group(1))
    name, winfo = next((n, i) for n, i in expected_tensors(spec).items() if i.canonical == f"layers.{layer}.up.weight")
    w = synth_tensor(spec, name, seed, torch.float32, info=winfo)
    hot, sparsity = spec.synth_ffn_activity
    p = activity_probabilities(w.shape[0], hot, sparsity, np.random.default_rng([seed, layer, 0xAC7]))
    return (w.norm(dim=1) * torch.special.ndtri(torch.from_numpy(p).float())).to(dtype)


def synth_tensor(spec: ModelSpec, name: str, seed: int = 0, dtype: str | torch.dtype | None = None,
                 info: TensorInfo | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """One checkpoint tensor, exactly as `write_model` writes it for this seed (dtype: the spec's), made
    on `device` (the same values on any device)."""
    if info is None:
        tensors = expected_tensors(spec)
        if name not in tensors:
            raise KeyError(f"{name!r} is not a tensor of this {spec.family!r} model")
        info = tensors[name]
        if info.canonical == "lm_head" and spec.tie_word_embeddings:  # tied: the embedding itself
            name, info = next((n, i) for n, i in tensors.items() if i.canonical == "embed")
    planted = _planted_bias(spec, info, seed, _dtype(spec, dtype))
    if planted is not None:
        return planted.to(device)
    plan = _plan(spec, name, info, seed)
    out = torch.empty(plan.numel, dtype=_dtype(spec, dtype), device=device)
    _fill(out, 0, plan, _pool_on(seed, device))
    return out.view(info.shape)


def synth_tensors(spec: ModelSpec, seed: int = 0, dtype: str | torch.dtype | None = None
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) for the whole model, one tensor at a time, in file order."""
    for name, info in checkpoint_tensors(spec).items():
        yield name, synth_tensor(spec, name, seed, dtype, info=info)


# ---------------------------------------------------------------------------------------------
# files


class _BlockWriter:
    """Packs tensor bytes into two alternating blocks; a thread writes one while the other fills."""

    def __init__(self, f, executor: ThreadPoolExecutor):
        self.f, self.executor = f, executor
        self.blocks = [torch.empty(BLOCK_BYTES, dtype=torch.uint8) for _ in range(2)]
        self.cur, self.pos, self.pending = 0, 0, None

    def write(self, dtype: torch.dtype, numel: int, fill: Callable[[torch.Tensor, int], None]) -> None:
        size = dtype.itemsize
        done = 0
        while done < numel:
            k = min(numel - done, (BLOCK_BYTES - self.pos) // size)
            fill(self.blocks[self.cur][self.pos : self.pos + k * size].view(dtype), done)
            self.pos += k * size
            done += k
            if self.pos == BLOCK_BYTES:
                self.flush()

    def flush(self) -> None:
        if self.pos == 0:
            return
        data = self.blocks[self.cur][: self.pos].numpy()
        if self.pending is not None:
            self.pending.result()  # the other block is free again
        self.pending = self.executor.submit(self.f.write, data)
        self.cur, self.pos = 1 - self.cur, 0

    def close(self) -> None:
        self.flush()
        if self.pending is not None:
            self.pending.result()
            self.pending = None


def _write_safetensors(path: Path, spec: ModelSpec, tensors: dict[str, TensorInfo], seed: int,
                       dtype: torch.dtype, executor: ThreadPoolExecutor) -> int:
    """Stream one safetensors file (8-byte header length, JSON header, raw little-endian data)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, info in tensors.items():
        nbytes = math.prod(info.shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(info.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    pool = _pool(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        writer = _BlockWriter(f, executor)
        for name, info in tensors.items():
            planted = _planted_bias(spec, info, seed, dtype)
            if planted is not None:  # small (one per layer): computed whole
                writer.write(dtype, planted.numel(), lambda dst, start, t=planted: dst.copy_(t.view(-1)[start : start + dst.numel()]))
                continue
            plan = _plan(spec, name, info, seed)
            writer.write(dtype, plan.numel, lambda dst, start, plan=plan: _fill(dst, start, plan, pool))
        writer.close()
    return offset


def _shards(tensors: dict[str, TensorInfo], itemsize: int, shard_size: int) -> list[dict[str, TensorInfo]]:
    """Greedy split in file order; a tensor larger than shard_size gets a shard of its own."""
    shards: list[dict[str, TensorInfo]] = [{}]
    used = 0
    for name, info in tensors.items():
        nbytes = math.prod(info.shape) * itemsize
        if shards[-1] and used + nbytes > shard_size:
            shards.append({})
            used = 0
        shards[-1][name] = info
        used += nbytes
    return shards


@dataclass
class SynthResult:
    out_dir: Path
    spec: ModelSpec
    config: dict
    files: list[str] = field(default_factory=list)
    weight_bytes: int = 0
    num_params: int = 0
    seconds: float = 0.0


def _generation_config(family: str) -> dict[str, Any]:
    ids = synth_tokenizer.SPECIAL_IDS
    eos = ids[synth_tokenizer.EOS_TOKEN]
    return {
        "bos_token_id": ids[synth_tokenizer.BOS_TOKEN],
        "eos_token_id": [eos, ids[synth_tokenizer.ENDOFTEXT]] if family in EOS_LIST_FAMILIES else eos,
        "pad_token_id": ids[synth_tokenizer.PAD_TOKEN],
    }


def _prepare_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise SynthError(f"{out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    old = [p for p in out_dir.iterdir() if p.name == "config.json" or p.name.startswith("model")
           and (p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json"))]
    if old and not force:
        raise SynthError(f"{out_dir} already holds a model ({old[0].name}); pass --force to overwrite it")
    for p in old:  # stale shards of a previous model would confuse loaders
        p.unlink()


def write_model(cfg: dict, out_dir: str | Path, seed: int = 0, shard_size: int = DEFAULT_SHARD_SIZE,
                force: bool = False) -> SynthResult:
    """Write a complete model folder for `cfg` (from `synth_config`) into out_dir."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    _check_config(cfg)
    spec = spec_from_config(cfg)
    dtype = _dtype(spec, cfg["torch_dtype"])
    _prepare_dir(out_dir, force)
    result = SynthResult(out_dir=out_dir, spec=spec, config=cfg)

    tensors = checkpoint_tensors(spec)
    shards = _shards(tensors, dtype.itemsize, shard_size)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="synth-writer") as executor:
        if len(shards) == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for fname, shard in zip(names, shards):
            result.weight_bytes += _write_safetensors(out_dir / fname, spec, shard, seed, dtype, executor)
            result.files.append(fname)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": result.weight_bytes},
            "weight_map": {name: fname for fname, shard in zip(names, shards) for name in shard},
        }
        _write_json(out_dir / "model.safetensors.index.json", index)
        result.files.append("model.safetensors.index.json")

    add_bos = spec.family in ADD_BOS_FAMILIES
    for fname, text in synth_tokenizer.tokenizer_files(spec.vocab_size, spec.max_position, add_bos).items():
        (out_dir / fname).write_text(text)
        result.files.append(fname)
    _write_json(out_dir / "generation_config.json", _generation_config(spec.family))
    # config.json last: a folder interrupted earlier is visibly incomplete.
    _write_json(out_dir / "config.json", cfg)
    result.files += ["generation_config.json", "config.json"]

    if load_spec(out_dir) != spec:
        raise SynthError(f"{out_dir / 'config.json'} does not read back as the spec it was written from")
    result.num_params = param_count(spec)
    result.seconds = time.perf_counter() - t0
    return result


class SynthCheckpoint:
    """The checkpoint `write_model` writes for (spec, seed), read tensor by tensor without writing it: the
    source `write_in_format` converts from (what tools/convert.py reads of a loader.Checkpoint)."""

    @dataclass(frozen=True)
    class Entry:
        nbytes: int

    def __init__(self, spec: ModelSpec, seed: int, dtype: torch.dtype, device: str = "cpu"):
        self.spec, self.seed, self._dtype, self.device = spec, seed, dtype, device
        self._names = {info.canonical: (name, info) for name, info in checkpoint_tensors(spec).items()}
        self.entries = {c: self.Entry(math.prod(info.shape) * dtype.itemsize) for c, (_, info) in self._names.items()}

    def get(self, canonical: str) -> torch.Tensor:
        name, info = self._names[canonical]
        return synth_tensor(self.spec, name, self.seed, self._dtype, info=info, device=self.device)

    def dtype(self) -> torch.dtype:
        return self._dtype


def write_in_format(cfg: dict, out_dir: str | Path, weights: str, seed: int = 0,
                    shard_size: int = DEFAULT_SHARD_SIZE, force: bool = False, progress=None):
    """The folder `write_model` would write, stored in the weight format `weights` (`offbatch convert`'s
    folder: config.json's quantization_config names it), each tensor generated and encoded in turn: the
    dense model is never held, in memory or on disk (a 70B shape in bitmap-50-int8 on a 64 GiB disk).
    -> tools.convert.ConvertSummary."""
    from offbatch.tools.convert import encode_device, format_name, write_converted
    from offbatch.formats import get_format

    out_dir = Path(out_dir)
    _check_config(cfg)
    spec = spec_from_config(cfg)
    fmt = get_format(format_name(weights))
    ckpt = SynthCheckpoint(spec, seed, _dtype(spec, cfg["torch_dtype"]), device=encode_device())
    add_bos = spec.family in ADD_BOS_FAMILIES

    def add_files(tmp: Path) -> None:
        for fname, text in synth_tokenizer.tokenizer_files(spec.vocab_size, spec.max_position, add_bos).items():
            (tmp / fname).write_text(text)
        _write_json(tmp / "generation_config.json", _generation_config(spec.family))

    return write_converted(ckpt, out_dir, fmt, cfg, overwrite=force, max_shard_bytes=shard_size, progress=progress,
                           about={"source": f"synth seed {seed}"}, add_files=add_files)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def synth_model(family: str, out_dir: str | Path, preset: str | None = None, seed: int = 0,
                shard_size: int = DEFAULT_SHARD_SIZE, force: bool = False, **overrides: Any) -> SynthResult:
    """synth_config + write_model: `synth_model("llama", tmp_path)` writes the tiny Llama."""
    return write_model(synth_config(family, preset, **overrides), out_dir, seed, shard_size, force)
