"""Import a llama.cpp GGUF file as a Hugging Face model folder.

The GGUF is read with the `gguf` package (GGUFReader, gguf.quants.dequantize) and written as safetensors
beside config.json, generation_config.json, tokenizer.json (built with `tokenizers` from the
tokenizer.ggml.* metadata), tokenizer_config.json and chat_template.jinja. Its weights either:
- stay quantized ("kept"): when every bulk linear weight (the ones a weight format compresses: attention
  q/k/v/o, the FFN's gate/up/down) is of one of the block types that are exactly one of offbatch's formats,
  the blocks are rearranged into that format's stored tensors without expanding them, and config.json
  names the format (offbatch/models/converted.py). Q4_0 is "int4-g32" (W = (q - 8) * d), Q4_1
  "int4-asym-g32" (W = q * d + m), Q8_0 "int8-g32" (W = q * d): the same float16 scales, the same codes, the
  same arithmetic, so the folder computes with exactly the values llama.cpp's blocks hold. The other
  tensors (embedding, norms, output head) are expanded to the output dtype, as below. The K-quants are
  not kept: their scales are products of two numbers (Q4_K: d * sc with a 6-bit sc) that float16 does not
  hold exactly, and Q4_K_M files mix Q4_K with Q6_K while a folder holds one format;
- or are expanded: every tensor dequantised to float32, put back into the Hugging Face layout and cast to
  the output dtype (a folder any tool reads).
By default (`weights="auto"`) a file is kept where it can be, else expanded (saying why, when it holds
quantized weights); "keep" refuses a file that cannot be kept, "expand" always expands.

Two things llama.cpp changes on the way in, and we undo:
- its convert script permutes the rows of q_proj/k_proj of "llama" models so that rope pairs
  adjacent elements (GPT-J style) instead of the two halves of each head (GPT-NeoX style);
- Llama 3.1-style rope scaling is stored as a `rope_freqs` tensor of per-frequency divisors,
  not as config keys; we recognise the standard Llama 3 parameters from it.

Both are undone on kept weights too: the permutation moves whole rows, and a row's blocks (codes,
scales and minimums) move with it.

Everything is written into a hidden temp folder next to the target and renamed at the end, so a crash
never leaves a half-written model folder, and two processes importing the same file cannot mix files.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType
from gguf.quants import dequantize

from offbatch.errors import ModelFolderError
from offbatch.formats import WeightFormat, get_format
from offbatch.formats.int4 import pack_nibbles
from offbatch.models.chat_template import MAX_TEMPLATE_CHARS
from offbatch.models.converted import quantization_config, stored_tensors
from offbatch.models.files import json_type
from offbatch.models.names import expected_tensors
from offbatch.models.spec import (CONFIG_FIELDS, MAX_POSITION, MAX_TOKEN_ID, MAX_VOCAB, ROPE_FIELDS, Field,
                                  spec_from_config)
from offbatch.tools.folder_writer import (DEFAULT_MAX_SHARD_BYTES, TensorGroup, atomic_folder, check_target,
                                          tensor_bytes, write_weights)

IMPORTER_VERSION = 2  # bump when the output of the same GGUF file changes (invalidates caches); 2: kept blocks
MARKER_FILE = ".offbatch-import.json"  # written last: its presence means the folder is complete

OUTPUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SUPPORTED_TENSOR_TYPES = (
    QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
    QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K,
)  # fmt: skip
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
# The block types that are one of offbatch's weight formats exactly (the same codes, scales and arithmetic).
KEPT_FORMATS = {QT.Q4_0: "int4-g32", QT.Q4_1: "int4-asym-g32", QT.Q8_0: "int8-g32"}
WEIGHT_MODES = ("auto", "keep", "expand")


@dataclass(frozen=True)
class _Arch:
    model_type: str
    hf_class: str
    permuted_qk: bool  # llama.cpp permutes q/k rows only for its "llama" architecture
    qk_norm: bool = False


ARCHITECTURES = {
    "llama": _Arch("llama", "LlamaForCausalLM", permuted_qk=True),
    # Mistral GGUFs are normally written as "llama"; accept the name too (same layout).
    "mistral": _Arch("llama", "LlamaForCausalLM", permuted_qk=True),
    "qwen2": _Arch("qwen2", "Qwen2ForCausalLM", permuted_qk=False),
    "qwen3": _Arch("qwen3", "Qwen3ForCausalLM", permuted_qk=False, qk_norm=True),
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tensors llama.cpp writes that carry nothing a HF folder needs (rope_freqs is read separately).
_IGNORED = re.compile(r"(rope_freqs\.weight|blk\.\d+\.attn_rot_embd\.weight)")


@dataclass
class ImportSummary:
    out_dir: Path
    architecture: str
    num_tensors: int
    total_bytes: int
    tensor_types: dict[str, int]
    seconds: float
    notes: list[str] = field(default_factory=list)
    weights: str = "dense"  # the weight format of the folder: dense (expanded), or the format kept


# ---------------------------------------------------------------------------
# reading
class _Reader(gguf.GGUFReader):
    """GGUFReader over a plain ndarray view of the file mapping.

    np.memmap runs Python-level hooks on every slice, and the reader slices a few times per
    vocabulary entry; on a plain view of the same mapping opening a 49k-token file is ~3x faster.
    """

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value


def open_gguf(path: str | Path):
    """Open a GGUF file; any failure is one clear ModelFolderError."""
    path = Path(path)
    if not path.is_file():
        what = ("is a folder" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist")
        raise ModelFolderError(f"GGUF file {str(path)!r} {what}")
    try:
        return _Reader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError, IndexError, numpy errors...
        raise ModelFolderError(
            f"{path} is not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})"
        ) from None


def _field_value(f) -> Any:
    """A metadata field as a Python value: str, int, float, bool, list of str, or numpy array."""
    if not f.types:
        return None
    main = f.types[0]
    if main == GGUFValueType.ARRAY:
        sub = f.types[-1]
        if sub == GGUFValueType.ARRAY:
            return None  # nested arrays carry nothing we use
        if sub == GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        if not f.data:
            return np.zeros(0)
        return np.concatenate([f.parts[i] for i in f.data])
    part = f.parts[f.data[0]]
    if main == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    value = part[0].item()
    return bool(value) if main == GGUFValueType.BOOL else value


def read_metadata(reader) -> dict[str, Any]:
    try:
        return {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except UnicodeDecodeError as e:
        raise ModelFolderError(f"GGUF metadata holds a string that is not UTF-8: {e}") from None


# ---------------------------------------------------------------------------
# metadata values, checked like config.json's fields (the same limits: spec.py)
def _meta(meta: dict, key: str, spec: Field, default: Any = None, required_for: str | None = None) -> Any:
    value = meta.get(key)
    if value is None:
        if required_for is not None:
            raise ModelFolderError(f"GGUF metadata lacks {key}, needed for a {required_for!r} model")
        return default
    return spec.check(value, f"GGUF metadata {key}")


def _meta_list(meta: dict, key: str, item_type: type, limit: int) -> list | None:
    """A metadata array of strings (tokens, merges): a list of `item_type`, at most `limit` long."""
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > limit or not all(isinstance(v, item_type) for v in value):
        raise ModelFolderError(f"GGUF metadata {key} must be a list of at most {limit:,} strings")
    return value


def _meta_array(meta: dict, key: str, length: int) -> np.ndarray | None:
    """A numeric metadata array with one entry per token (scores, token types)."""
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, np.ndarray) or value.ndim != 1 or len(value) != length or value.dtype.kind not in "iuf":
        raise ModelFolderError(f"GGUF metadata {key} must be a list of {length:,} numbers, one per token")
    return value


def _hf_shape(t) -> tuple[int, ...]:
    # GGUF lists dimensions fastest-first (ne0 = row length); torch lists them slowest-first.
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def hf_tensor_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> Hugging Face name; None for names we do not know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's convert-time q/k permutation (rows of a weight, or a bias).

    llama.cpp reshapes each head's rows as (2, head_dim/2) and swaps the two axes, interleaving the
    two halves that HF's rotate_half pairs; reshaping as (head_dim/2, 2) and swapping back restores them.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------
# config
def _llama3_rope_scaling(rope_factors: np.ndarray, theta: float, head_dim: int) -> dict:
    """Recognise Llama 3.1-style rope scaling from llama.cpp's `rope_freqs` tensor.

    llama.cpp stores only the per-frequency divisors; the Llama 3.x releases all use
    low_freq_factor 1, high_freq_factor 4 and an original context of 8192, with `factor` the largest
    divisor. We rebuild the divisors from those values and insist they match.
    """
    factors = np.asarray(rope_factors, dtype=np.float64).reshape(-1)
    scaling = {
        "rope_type": "llama3",
        "factor": float(np.round(factors.max(), 4)),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    lo, hi, omp, f = 1.0, 4.0, 8192, scaling["factor"]
    smooth = np.clip((omp / wavelen - lo) / (hi - lo), 0.0, 1.0)
    expected = np.where(wavelen < omp / hi, 1.0, np.where(wavelen > omp / lo, f, 1.0 / ((1 - smooth) / f + smooth)))
    if factors.shape != expected.shape or not np.allclose(factors, expected, rtol=1e-3):
        raise ModelFolderError(
            "this GGUF has a rope_freqs tensor that is not Llama 3 rope scaling "
            "(low_freq_factor 1, high_freq_factor 4, original context 8192); it is not supported"
        )
    return scaling


def _rope_scaling(meta: dict, arch: str) -> dict | None:
    kind = _meta(meta, f"{arch}.rope.scaling.type", Field("str"))
    factor_key = f"{arch}.rope.scaling.factor"
    if kind is None and meta.get(f"{arch}.rope.scale_linear"):  # older files
        kind, factor_key = "linear", f"{arch}.rope.scale_linear"
    if kind in (None, "none"):
        return None
    factor = _meta(meta, factor_key, Field("float", 0, ROPE_FIELDS["linear"]["factor"].hi))  # 0: none
    if not factor or factor == 1.0 and kind == "linear":
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": factor}
    original = _meta(meta, f"{arch}.rope.scaling.original_context_length", Field("int", 1, MAX_POSITION))
    if original:
        scaling["original_max_position_embeddings"] = original
    return scaling


def _token_id(meta: dict, what: str) -> int | None:
    return _meta(meta, f"tokenizer.ggml.{what}_token_id", Field("int", 0, MAX_TOKEN_ID))


def build_config(meta: dict, tensors: dict[str, Any], dtype: str) -> dict:
    """config.json for the GGUF's model, from its metadata (and tensor shapes where metadata is silent)."""
    arch_name = meta.get("general.architecture")
    if not isinstance(arch_name, str) or arch_name not in ARCHITECTURES:
        shown = repr(arch_name) if isinstance(arch_name, str) or arch_name is None else json_type(arch_name)
        raise ModelFolderError(
            f"GGUF architecture {shown[:60]} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    arch = ARCHITECTURES[arch_name]

    def need(key: str, config_key: str):
        return _meta(meta, f"{arch_name}.{key}", CONFIG_FIELDS[config_key], required_for=arch_name)

    def get(key: str, config_key: str, default=None):
        return _meta(meta, f"{arch_name}.{key}", CONFIG_FIELDS[config_key], default)

    if "token_embd.weight" not in tensors:
        raise ModelFolderError("GGUF file has no token_embd.weight tensor")
    hidden = need("embedding_length", "hidden_size")
    heads = need("attention.head_count", "num_attention_heads")
    kv_heads = get("attention.head_count_kv", "num_key_value_heads") or heads
    head_dim = get("attention.key_length", "head_dim") or hidden // heads
    rope_dims = get("rope.dimension_count", "head_dim")
    if rope_dims is not None and rope_dims != head_dim:
        raise ModelFolderError(
            f"partial rotary embeddings (rope over {rope_dims} of {head_dim} dims) are not supported"
        )
    theta = get("rope.freq_base", "rope_theta") or 10000.0
    rope_scaling = _rope_scaling(meta, arch_name)
    if "rope_freqs.weight" in tensors:
        rope_scaling = _llama3_rope_scaling(dequantize(tensors["rope_freqs.weight"].data, QT.F32), theta, head_dim)

    eos = _token_id(meta, "eos")
    cfg: dict[str, Any] = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "vocab_size": _hf_shape(tensors["token_embd.weight"])[0],
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length", "intermediate_size"),
        "num_hidden_layers": need("block_count", "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": get("context_length", "max_position_embeddings") or 2048,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", "rms_norm_eps") or 1e-6,
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": dtype,
        "bos_token_id": _token_id(meta, "bos"),
        "eos_token_id": eos,
        "pad_token_id": _token_id(meta, "padding"),
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if arch.model_type in ("llama", "qwen3"):
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if arch.model_type == "llama":
        cfg["mlp_bias"] = False
    if arch.model_type in ("qwen2", "qwen3"):
        cfg["use_sliding_window"] = False
        cfg["sliding_window"] = None
    return cfg


def _generation_config(meta: dict) -> dict:
    # Chat models end turns with eot/eom tokens (Llama 3: <|eot_id|>); generation stops on any of them.
    eos = [i for i in (_token_id(meta, "eos"), _token_id(meta, "eot"), _token_id(meta, "eom")) if i is not None]
    out: dict[str, Any] = {}
    if _token_id(meta, "bos") is not None:
        out["bos_token_id"] = _token_id(meta, "bos")
    if eos:
        eos = list(dict.fromkeys(eos))
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if _token_id(meta, "padding") is not None:
        out["pad_token_id"] = _token_id(meta, "padding")
    return out


# ---------------------------------------------------------------------------
# tensors
def plan_tensors(reader, cfg: dict) -> list[tuple[str, Any]]:
    """(HF name, GGUF tensor) in writing order, after checking names, types and shapes."""
    mapped: dict[str, Any] = {}
    for t in reader.tensors:
        if _IGNORED.fullmatch(t.name):
            continue
        name = hf_tensor_name(t.name)
        if name is None:
            raise ModelFolderError(f"GGUF tensor {t.name!r} has no place in a {cfg['model_type']!r} model")
        if t.tensor_type not in SUPPORTED_TENSOR_TYPES:
            raise ModelFolderError(
                f"GGUF tensor {t.name!r} has type {t.tensor_type.name}, which is not supported; "
                f"supported: {', '.join(q.name for q in SUPPORTED_TENSOR_TYPES)}"
            )
        mapped[name] = t

    expected = expected_tensors(spec_from_config(cfg))
    if cfg["tie_word_embeddings"]:
        expected.pop("lm_head.weight", None)
    missing = [n for n in expected if n not in mapped]
    extra = [n for n in mapped if n not in expected]
    if missing or extra:
        raise ModelFolderError(
            "GGUF tensors do not match its metadata"
            + (f"; missing: {', '.join(missing[:5])}" if missing else "")
            + (f"; unexpected: {', '.join(extra[:5])}" if extra else "")
        )
    for name, info in expected.items():
        if _hf_shape(mapped[name]) != info.shape:
            raise ModelFolderError(
                f"GGUF tensor {mapped[name].name!r} has shape {_hf_shape(mapped[name])}, "
                f"the metadata implies {info.shape}"
            )
    return [(name, mapped[name]) for name in expected]  # expected_tensors' order: embed, layers, head


def _permuted_heads(t, cfg: dict, permuted_qk: bool) -> int | None:
    """The heads whose rows llama.cpp permuted in this tensor (q/k of "llama" files), else None."""
    if permuted_qk and re.fullmatch(r"blk\.\d+\.attn_[qk]\.(weight|bias)", t.name):
        return cfg["num_attention_heads"] if ".attn_q." in t.name else cfg["num_key_value_heads"]
    return None


def load_tensor(t, cfg: dict, permuted_qk: bool, dtype: torch.dtype) -> torch.Tensor:
    """One GGUF tensor, dequantised, in HF layout, cast to `dtype`."""
    w = dequantize(t.data, t.tensor_type)  # float32, rows = HF rows
    w = w.reshape(_hf_shape(t))
    heads = _permuted_heads(t, cfg, permuted_qk)
    if heads is not None:
        w = unpermute_qk(w, heads)
    if not w.flags.writeable:  # F32 tensors come back as views of the read-only file mapping
        w = w.copy()
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(dtype)


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of every block: [rows, blocks, bytes] -> [rows, blocks]."""
    return np.ascontiguousarray(blocks[..., at : at + 2]).view(np.float16)[..., 0]


def kept_tensors(t, name: str, cfg: dict, permuted_qk: bool) -> dict[str, torch.Tensor]:
    """A Q4_0 / Q4_1 / Q8_0 weight as the stored tensors of its format (KEPT_FORMATS), not expanded: the
    blocks' float16 scales (and minimums) as they are, one per group of 32 inputs; Q8_0's int8 codes as
    they are; the 4-bit codes moved from GGUF's order (in a block of 32, byte j holds input j in its low
    nibble and input j + 16 in its high one) to the int4 format's (byte j of a row: inputs 2j, 2j + 1);
    then rows put back in HF order where llama.cpp permuted them."""
    n, k = _hf_shape(t)
    qtype = t.tensor_type
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = np.asarray(t.data).view(np.uint8).reshape(n, k // block, type_size)
    if qtype == QT.Q8_0:  # d (f16), 32 x int8
        out = {".q8": np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, k), ".scale": _half(blocks, 0)}
    else:  # Q4_0: d (f16), 16 bytes of codes; Q4_1: d (f16), m (f16), 16 bytes of codes
        codes = blocks[..., 4:] if qtype == QT.Q4_1 else blocks[..., 2:]
        q = np.concatenate([codes & 15, codes >> 4], axis=-1).reshape(n, k)  # inputs in order, one per byte
        out = {".q4": pack_nibbles(torch.from_numpy(q)).numpy(), ".scale": _half(blocks, 0)}
        if qtype == QT.Q4_1:
            out[".min"] = _half(blocks, 2)
    heads = _permuted_heads(t, cfg, permuted_qk)
    if heads is not None:
        out = {suffix: unpermute_qk(a, heads) for suffix, a in out.items()}
    return {name + suffix: torch.from_numpy(np.array(a, copy=True, order="C")) for suffix, a in out.items()}


def _float_types(types) -> bool:
    return all(q in FLOAT_TYPES for q in types)


def keep_format(plan: list[tuple[str, Any]], spec, weights: str) -> tuple[WeightFormat | None, str | None]:
    """The format the file's bulk weights are kept in (None: expand them), and why they are expanded when
    the file holds quantized ones (None when kept, or nothing was quantized, or expanding was asked)."""
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {WEIGHT_MODES}, not {weights!r}")
    if weights == "expand":
        return None, None
    # Every kept format compresses the same tensors (int8.py's `quantizable`): ask one of them which.
    stored = stored_tensors(spec, get_format("int8-g32"))
    bulk = {name[: -len(st.suffix)] for name, st in stored.items() if st.suffix}
    types = Counter(t.tensor_type for name, t in plan if name in bulk)
    kinds = sorted(types, key=lambda q: q.name)
    if len(kinds) == 1 and kinds[0] in KEPT_FORMATS:
        return get_format(KEPT_FORMATS[kinds[0]]), None
    found = ", ".join(f"{types[q]} {q.name}" for q in kinds) or "none"
    kept_names = ", ".join(q.name for q in KEPT_FORMATS)
    if _float_types(kinds):
        if weights == "auto":  # nothing quantized to keep: nothing to say
            return None, None
        why = f"its bulk linear weights are not quantized ({found})"
    elif len(kinds) > 1:
        why = (f"its bulk linear weights mix block types ({found}), and a folder holds one weight format; "
               f"a file is kept quantized when they are all {kept_names}, all of one type")
    else:
        why = (f"its bulk linear weights are {found}, which is not exactly one of offbatch's weight formats "
               f"(only {kept_names} are; the K-quants' scales are products that float16 does not hold exactly)")
    if weights == "keep":
        raise ModelFolderError(f"cannot keep this GGUF file quantized: {why}; import it without --keep-quantized "
                               "to expand it")
    return None, f"weights expanded to the output dtype: {why}"


def _groups(plan, cfg: dict, permuted_qk: bool, dtype: torch.dtype, fmt: WeightFormat | None,
            spec) -> list[TensorGroup]:
    """What the folder's weight files hold, tensor by tensor (made when their shard is written)."""
    kept: dict[str, list[tuple[str, Any]]] = {}
    if fmt is not None:
        for fname, st in stored_tensors(spec, fmt).items():
            if st.suffix:
                kept.setdefault(fname[: -len(st.suffix)], []).append((fname, st))
    groups = []
    for name, t in plan:
        if name in kept:
            names = tuple(f for f, _ in kept[name])
            nbytes = sum(tensor_bytes(st.shape, st.dtype) for _, st in kept[name])
            groups.append(TensorGroup(names, nbytes, partial(kept_tensors, t, name, cfg, permuted_qk)))
        else:
            nbytes = tensor_bytes(_hf_shape(t), dtype)
            groups.append(TensorGroup((name,), nbytes, partial(_dense_tensor, t, name, cfg, permuted_qk, dtype)))
    return groups


def _dense_tensor(t, name: str, cfg: dict, permuted_qk: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: load_tensor(t, cfg, permuted_qk, dtype)}


# ---------------------------------------------------------------------------
# tokenizer
# Pre-tokenizer regexes of the Hugging Face tokenizers llama.cpp names in tokenizer.ggml.pre.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = ("default", "gpt2", "gpt-2", "olmo", "mpt", "jais")
_DIGITS_PRE = ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva-7b")  # GPT-2 + one digit per token
_LLAMA3_PRE = ("llama3", "llama-bpe", "llama-v3", "smaug-bpe", "dbrx", "falcon3")
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen", "megrez")


def _byte_level_pre_tokenizer(pre: str | None, notes: list[str]):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre is None or pre in _GPT2_PRE:
        return byte_level, False
    if pre in _DIGITS_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), False
    if pre in _LLAMA3_PRE or pre in _QWEN2_PRE:
        pattern = _LLAMA3_SPLIT if pre in _LLAMA3_PRE else _QWEN2_SPLIT
        split = pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
        no_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        # Llama 3 takes a whole word that is in the vocabulary as one token, merges or not.
        return pre_tokenizers.Sequence([split, no_regex]), pre in _LLAMA3_PRE
    notes.append(f"tokenizer pre-type {pre!r} is not known to offbatch; using GPT-2's splitting rules")
    return byte_level, False


def _spm_merges(tokens: list[str], scores, types) -> list[tuple[str, str]]:
    """BPE merges equivalent to a SentencePiece-BPE vocabulary: every split of a normal piece into two
    pieces of the vocabulary, ranked by the merged piece's score (SentencePiece merges the best-scoring
    pair first), which is the rule llama.cpp's SPM tokenizer applies."""
    index = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, t in enumerate(tokens):
        if types is not None and int(types[i]) != gguf.TokenType.NORMAL:
            continue
        for k in range(1, len(t)):
            if t[:k] in index and t[k:] in index:
                ranked.append((-float(scores[i]) if scores is not None else i, i, index[t[:k]], t[:k], t[k:]))
    ranked.sort()
    return [(a, b) for *_, a, b in ranked]


def build_tokenizer(meta: dict, notes: list[str]):
    """A `tokenizers.Tokenizer` and the tokenizer_config.json dict from tokenizer.ggml.* metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    kind = _meta(meta, "tokenizer.ggml.model", Field("str"))
    tokens = _meta_list(meta, "tokenizer.ggml.tokens", str, MAX_VOCAB)
    if not tokens:
        raise ModelFolderError("GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
    types = _meta_array(meta, "tokenizer.ggml.token_type", len(tokens))
    scores = _meta_array(meta, "tokenizer.ggml.scores", len(tokens))
    pre = _meta(meta, "tokenizer.ggml.pre", Field("str"))
    add_space_prefix = _meta(meta, "tokenizer.ggml.add_space_prefix", Field("bool"), True)
    ids = {what: _token_id(meta, what) for what in ("bos", "eos", "unknown", "padding")}
    for what, i in ids.items():
        if i is not None and not 0 <= i < len(tokens):
            raise ModelFolderError(f"GGUF tokenizer {what} token id {i} is outside its {len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated string keeps its first id

    if kind == "gpt2":
        merges = [tuple(m.split(" ")) for m in _meta_list(meta, "tokenizer.ggml.merges", str, 2**25) or []]
        if any(len(m) != 2 for m in merges):
            raise ModelFolderError("GGUF tokenizer merges are malformed (expected 'left right' pairs)")
        pre_tokenizer, ignore_merges = _byte_level_pre_tokenizer(pre, notes)
        try:
            model = models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False)
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception type
            raise ModelFolderError(f"GGUF tokenizer vocabulary and merges do not fit together: {e}") from None
        tok = Tokenizer(model)
        tok.pre_tokenizer = pre_tokenizer
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":  # SentencePiece BPE (Llama 1/2, Mistral, TinyLlama): byte fallback, "▁" for spaces
        unk = tokens[ids["unknown"] if ids["unknown"] is not None else 0]
        merges = _spm_merges(tokens, scores, types)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
        steps = [normalizers.Replace(" ", "▁")]
        if add_space_prefix:
            steps.insert(0, normalizers.Prepend("▁"))
        tok.normalizer = normalizers.Sequence(steps)
        strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    else:
        raise ModelFolderError(
            f"GGUF tokenizer model {kind!r} is not supported; supported: gpt2 (byte-level BPE), llama (SentencePiece)"
        )

    # Control tokens (and the bos/eos/unk/pad tokens) are special: matched whole, skipped when decoding.
    special_ids = {i for i in ids.values() if i is not None}
    user_ids = set()
    if types is not None:
        special_ids |= set(
            np.flatnonzero((types == gguf.TokenType.CONTROL) | (types == gguf.TokenType.UNKNOWN)).tolist()
        )
        user_ids = set(np.flatnonzero(types == gguf.TokenType.USER_DEFINED).tolist()) - special_ids
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special_ids)])
    if user_ids:
        tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in sorted(user_ids)])

    add_bos = _meta(meta, "tokenizer.ggml.add_bos_token", Field("bool"), kind == "llama")
    add_eos = _meta(meta, "tokenizer.ggml.add_eos_token", Field("bool"), False)
    if (add_bos and ids["bos"] is not None) or (add_eos and ids["eos"] is not None):
        bos = [tokens[ids["bos"]]] if add_bos and ids["bos"] is not None else []
        eos = [tokens[ids["eos"]]] if add_eos and ids["eos"] is not None else []
        single = [f"{t}:0" for t in bos] + ["$A:0"] + [f"{t}:0" for t in eos]
        pair = single + [f"{t}:1" for t in bos] + ["$B:1"] + [f"{t}:1" for t in eos]
        specials = [(t, vocab[t]) for t in dict.fromkeys(bos + eos)]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _meta(meta, f"{meta.get('general.architecture')}.context_length",
                                  CONFIG_FIELDS["max_position_embeddings"], 2048),
    }
    for key, what in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        if ids[what] is not None:
            tok_config[key] = tokens[ids[what]]
    template = _meta(meta, "tokenizer.chat_template", Field("str"))
    if template and len(template) > MAX_TEMPLATE_CHARS:
        raise ModelFolderError(f"GGUF metadata tokenizer.chat_template is {len(template):,} characters; "
                               f"offbatch's limit for a chat template is {MAX_TEMPLATE_CHARS:,}")
    if template:
        tok_config["chat_template"] = template
    return tok, tok_config


# ---------------------------------------------------------------------------
def source_stamp(path: Path, dtype: str, weights: str = "auto") -> dict:
    """What the marker file records: a folder is current when its marker equals this."""
    st = path.stat()
    return {
        "source": str(path.resolve()),
        "source_size": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
        "dtype": dtype,
        "weights": weights,
        "importer_version": IMPORTER_VERSION,
    }


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def import_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    *,
    weights: str = "auto",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> ImportSummary:
    """Turn a GGUF file into a Hugging Face model folder at `out_dir` (created atomically). weights: "auto"
    (keep the bulk weights quantized where they are exactly a weight format, else expand), "keep" (refuse a
    file that cannot be kept), "expand" (every tensor dequantised to `dtype`)."""
    start = time.perf_counter()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in OUTPUT_DTYPES:
        raise ModelFolderError(f"output dtype {dtype!r} is not supported; supported: {', '.join(OUTPUT_DTYPES)}")
    check_target(out_dir, overwrite, "--force", ModelFolderError)

    reader = open_gguf(gguf_path)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = build_config(meta, tensors, dtype)
    arch = ARCHITECTURES[meta["general.architecture"]]
    plan = plan_tensors(reader, cfg)
    spec = spec_from_config(cfg)
    fmt, why_expanded = keep_format(plan, spec, weights)
    notes: list[str] = [why_expanded] if why_expanded else []
    tokenizer, tok_config = build_tokenizer(meta, notes)
    if fmt is not None:
        kept_type = next(q for q, name in KEPT_FORMATS.items() if name == fmt.name)
        cfg["quantization_config"] = quantization_config(fmt, source=gguf_path.name, gguf_type=kept_type.name)
    groups = _groups(plan, cfg, arch.permuted_qk, OUTPUT_DTYPES[dtype], fmt, spec)

    with atomic_folder(out_dir, overwrite, ModelFolderError) as tmp:
        total = write_weights(tmp, groups, max_shard_bytes, progress)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(meta), indent=2) + "\n")
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
        if meta.get("tokenizer.chat_template"):
            (tmp / "chat_template.jinja").write_text(meta["tokenizer.chat_template"])
        (tmp / MARKER_FILE).write_text(json.dumps(source_stamp(gguf_path, dtype, weights), indent=2) + "\n")
    return ImportSummary(
        out_dir=out_dir,
        architecture=meta["general.architecture"],
        num_tensors=len(plan),
        total_bytes=total,
        tensor_types=dict(Counter(t.tensor_type.name for _, t in plan)),
        seconds=time.perf_counter() - start,
        notes=notes,
        weights=fmt.name if fmt is not None else "dense",
    )
