"""Every broken-folder case is one clear error naming the tensor and file, found before any compute: the
config field table and its limits, weight files and the index, tokenizer files, chat template limits, GGUF
metadata. (The CLI-level corpus of hostile folders is test_hostile_folders.py.)"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_factory import save_hf_model
from offbatch.errors import ModelFolderError
from offbatch.models import chat_template as ct
from offbatch.models.chat_template import ChatTemplate, ChatTemplateError
from offbatch.models.loader import open_checkpoint, read_safetensors_header
from offbatch.models.spec import MAX_LAYERS, spec_from_config
from offbatch.models.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    save_hf_model("llama", path, num_hidden_layers=2)
    return path


@pytest.fixture()
def folder(good, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(good, dst)
    return dst


def shard(folder, n_shards=2):
    """Rewrite model.safetensors as n shards plus an index, the way large checkpoints come."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for s in range(n_shards):
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::n_shards]}
        save_file(part, folder / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def expect_error(folder, *fragments):
    with pytest.raises(ModelFolderError) as e:
        open_checkpoint(folder)
    for f in fragments:
        assert f in str(e.value), str(e.value)


def test_good_folder_single_and_sharded(folder):
    ckpt = open_checkpoint(folder)
    n = ckpt.num_params
    q = ckpt.get("layers.1.q.weight").clone()
    weight_map = shard(folder, 3)
    sharded = open_checkpoint(folder)
    assert sharded.num_params == n
    assert len({e.file for e in sharded.entries.values()}) == 3
    assert torch.equal(sharded.get("layers.1.q.weight"), q)
    assert len(weight_map) == len(sharded.entries)


def test_missing_config(folder):
    (folder / "config.json").unlink()
    expect_error(folder, "config.json")


def test_not_a_folder(tmp_path):
    expect_error(tmp_path / "nope", "does not exist")


def test_unsupported_family(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt_bigcode"
    (folder / "config.json").write_text(json.dumps(cfg))
    expect_error(folder, "gpt_bigcode", "llama", "mixtral", "olmoe")


def test_config_missing_key():
    with pytest.raises(ModelFolderError, match="'hidden_size'"):
        spec_from_config({"model_type": "llama", "vocab_size": 10, "num_hidden_layers": 1, "num_attention_heads": 1})


def test_missing_tensor(folder):
    t = load_file(folder / "model.safetensors")
    del t["model.layers.1.mlp.down_proj.weight"]
    save_file(t, folder / "model.safetensors")
    expect_error(folder, "missing", "model.layers.1.mlp.down_proj.weight", "model.safetensors")


def test_unexpected_tensor(folder):
    t = load_file(folder / "model.safetensors")
    t["model.layers.7.mlp.down_proj.weight"] = torch.zeros(2, 2)
    save_file(t, folder / "model.safetensors")
    expect_error(folder, "unexpected", "model.layers.7.mlp.down_proj.weight")


def test_misshaped_tensor(folder):
    t = load_file(folder / "model.safetensors")
    t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    save_file(t, folder / "model.safetensors")
    expect_error(folder, "model.layers.0.self_attn.k_proj.weight", "[8, 64]", "[32, 64]", "model.safetensors")


def test_unsupported_dtype(folder):
    t = load_file(folder / "model.safetensors")
    t["model.norm.weight"] = t["model.norm.weight"].to(torch.float64)
    save_file(t, folder / "model.safetensors")
    expect_error(folder, "model.norm.weight", "F64")


def test_missing_shard(folder):
    shard(folder, 2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    expect_error(folder, "model-00002-of-00002.safetensors", "missing")


def test_truncated_file(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    expect_error(folder, "model.safetensors", "truncated")


def test_corrupt_header(folder):
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8
    path.write_bytes(bytes(data))
    expect_error(folder, "model.safetensors", "corrupt")


def test_no_weights(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"x")
    expect_error(folder, "no safetensors", "pytorch_model.bin")


def test_untied_config_without_lm_head(folder):
    t = load_file(folder / "model.safetensors")
    del t["lm_head.weight"]
    save_file(t, folder / "model.safetensors")
    expect_error(folder, "lm_head.weight")


# ---- one validation pass: config fields, limits, files, index containment -----------------------

LLAMA = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "intermediate_size": 96}


def test_every_published_preset_is_inside_the_limits():
    """The limits refuse absurd configs, not real ones: every real shape offbatch knows reads back."""
    from offbatch.models.presets import PRESETS
    from offbatch.tools.synth import synth_config

    for name, preset in PRESETS.items():
        spec = spec_from_config(synth_config(preset.family, name))
        assert spec.num_layers == preset.config["num_hidden_layers"], name


def test_config_field_types_and_nulls():
    # ints where floats belong are fine (configs write rope_theta: 500000); null counts as absent
    spec = spec_from_config(dict(LLAMA, rope_theta=500000, rms_norm_eps=1, num_key_value_heads=None,
                                 head_dim=None, sliding_window=None, eos_token_id=[1, 2], pad_token_id=-1))
    assert spec.rope_theta == 500000.0 and isinstance(spec.rope_theta, float)
    assert (spec.num_kv_heads, spec.head_dim, spec.eos_token_ids, spec.pad_token_id) == (4, 16, (1, 2), -1)
    for field, value, fragment in [
        ("num_hidden_layers", MAX_LAYERS + 1, "from 1 to 1024"),
        ("max_position_embeddings", 2**25, "'max_position_embeddings' must be an integer from 1 to 16777216"),
        ("intermediate_size", 0, "'intermediate_size' must be an integer from 1"),
        ("tie_word_embeddings", "yes", "'tie_word_embeddings' must be true or false"),
        ("hidden_act", ["silu"], "'hidden_act' must be a string"),
        ("eos_token_id", [1, "2"], "'eos_token_id' must be a token id or a list"),
        ("eos_token_id", -1, "'eos_token_id' must be a token id"),
        ("rms_norm_eps", float("inf"), "'rms_norm_eps' must be a number from 0 to 1"),
    ]:
        with pytest.raises(ModelFolderError, match=fragment):
            spec_from_config(dict(LLAMA, **{field: value}))


def test_config_cross_field_checks():
    moe = dict(LLAMA, model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    with pytest.raises(ModelFolderError, match="num_experts_per_tok 8 is more than the 4 experts"):
        spec_from_config(dict(moe, num_experts_per_tok=8))
    with pytest.raises(ModelFolderError, match=r"mlp_only_layers \[5\] are outside the 2 layers"):
        spec_from_config(dict(moe, mlp_only_layers=[5]))
    with pytest.raises(ModelFolderError, match="'mlp_only_layers' must be a list of integers"):
        spec_from_config(dict(moe, mlp_only_layers=["0"]))
    with pytest.raises(ModelFolderError, match="'high_freq_factor' must be larger"):
        spec_from_config(dict(LLAMA, rope_scaling={"rope_type": "llama3", "factor": 8, "low_freq_factor": 4,
                                                   "high_freq_factor": 4}))
    with pytest.raises(ModelFolderError, match="config.json must hold a JSON object"):
        spec_from_config([LLAMA])


def test_weight_file_that_is_a_device_or_link(folder, tmp_path):
    """Without an index, model.safetensors may be the user's own link to a file elsewhere (weights on
    another disk); a link to a device is refused before it is opened."""
    elsewhere = tmp_path / "disk2" / "weights.safetensors"
    elsewhere.parent.mkdir()
    (folder / "model.safetensors").rename(elsewhere)
    (folder / "model.safetensors").symlink_to(elsewhere)
    assert open_checkpoint(folder).num_params > 0
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to("/dev/zero")
    expect_error(folder, "model.safetensors is a device, not a regular file")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(tmp_path / "gone")
    expect_error(folder, "model.safetensors is a broken symbolic link")


def test_hub_cache_snapshot_links_into_its_blobs(good, tmp_path):
    """A Hugging Face cache snapshot's files are links into ../../blobs: inside, not outside."""
    repo = tmp_path / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in good.iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f.name)
    tensors = load_file(blobs / "model.safetensors")
    (snap / "model.safetensors").unlink()
    save_file(tensors, blobs / "shard-a")
    (snap / "model-00001-of-00001.safetensors").symlink_to(Path("..") / ".." / "blobs" / "shard-a")
    index = {"weight_map": {n: "model-00001-of-00001.safetensors" for n in tensors}}
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    assert open_checkpoint(snap).num_params == sum(t.numel() for t in tensors.values())


def test_header_is_what_the_safetensors_library_accepts(folder):
    """Every file a header check passes, safetensors' own reader opens; the layout rules are its rules."""
    from safetensors import safe_open

    header, start = read_safetensors_header(folder / "model.safetensors")
    assert "__metadata__" not in header and start % 8 == 0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(header)


def test_tokenizer_alone_and_generation_config_warnings(tmp_path):
    """A tokenizer folder needs no config.json; wrong-typed sampling defaults in generation_config.json
    are left for resolve_defaults, which ignores them with a word (they are harmless)."""
    from jobs_support import write_tokenizer

    from offbatch.jobs.params import resolve_defaults

    write_tokenizer(tmp_path, generation_config={"temperature": "hot", "do_sample": True})
    tok = load_tokenizer(tmp_path)
    defaults = resolve_defaults(tok.generation_defaults, {})
    assert defaults.sources["temperature"] == "default"  # not "hot"
    assert any("temperature" in why for why in defaults.ignored)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ModelFolderError, match="config.json: 'eos_token_id' must be"):
        load_tokenizer(tmp_path)


# ---- chat templates: limits, found by render ------------------------------------------------------
def test_chat_template_renders_and_keeps_messages():
    t = ChatTemplate("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] ~ '.' }}{% endfor %}"
                     "{% if add_generation_prompt %}[assistant]{% endif %}{{ extra|default('') }}")
    msgs = [{"role": "user", "content": "x" * 100_000}]  # a long document is no problem
    out = t.render({"messages": msgs, "add_generation_prompt": True, "extra": "!"})
    assert out == "[user] " + "x" * 100_000 + ".[assistant]!"


def test_chat_template_step_budget(monkeypatch):
    monkeypatch.setattr(ct, "MAX_RENDER_STEPS", 1000)
    t = ChatTemplate("{% for i in range(100) %}{% for j in range(100) %}{% endfor %}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="more than 1,000 steps"):
        t.render({})
    assert ChatTemplate("{% for i in range(100) %}{{ i }}{% endfor %}").render({}).endswith("9899")


def test_chat_template_character_budget_is_per_render(monkeypatch):
    monkeypatch.setattr(ct, "MAX_RENDER_CHARS", 20_000)
    t = ChatTemplate("{{ messages[0]['content'] * 3 }}")  # 9000 characters made, 9000 output
    assert len(t.render({"messages": [{"content": "x" * 3000}]})) == 9000
    assert len(t.render({"messages": [{"content": "x" * 3000}]})) == 9000  # a fresh budget each time
    with pytest.raises(ChatTemplateError, match="more than 20,000 characters"):
        t.render({"messages": [{"content": "x" * 4000}]})
    for source in ["{{ 'ab' ~ 'x' * 12000 ~ 'x' * 12000 }}", "{{ ['a'] * 30000 }}", "{{ 'x'|center(30000) }}",
                   "{{ ('a' * 100)|replace('', 'b' * 200) }}",
                   "{{ '{:>30000}'.format('x') }}", "{% for i in range(30000) %}x{% endfor %}"]:
        with pytest.raises(ChatTemplateError):
            ChatTemplate(source).render({})


def test_chat_template_errors_are_per_request():
    for source, fragment in [("{% for %}", "TemplateSyntaxError"), ("{{ raise_exception('no tools') }}", "no tools"),
                             ("{{ 1 / 0 }}", "division"), ("{{ ''.__class__ }}", ""),
                             ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion")]:
        try:
            out = ChatTemplate(source).render({})
        except ChatTemplateError as e:
            assert fragment in str(e)
        else:
            assert source == "{{ ''.__class__ }}" and out == ""  # the sandbox hides it


def test_template_kwargs_cannot_replace_messages(tmp_path):
    from jobs_support import write_tokenizer

    write_tokenizer(tmp_path, chat_template="{{ messages[0]['content'] }}|{{ add_generation_prompt }}|{{ x }}")
    tok = load_tokenizer(tmp_path)
    msgs = [{"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(msgs, messages="evil", x=1) == "hello|True|1"
    assert tok.decode(tok.encode_chat(msgs, x=2)) == tok.decode(tok.encode("hello|True|2", add_special_tokens=False))


# ---- GGUF metadata: the same limits -----------------------------------------------------------------
def _gguf_with(path, **overrides):
    """A GGUF with llama metadata and a token embedding only: enough for build_config to run."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    meta = {"block_count": 2, "embedding_length": 8, "feed_forward_length": 16, "head_count": 2,
            "context_length": 64, **overrides}
    if isinstance(meta["block_count"], str):
        w.add_string("llama.block_count", meta["block_count"])
    else:
        w.add_uint32("llama.block_count", meta["block_count"])
    w.add_uint32("llama.embedding_length", meta["embedding_length"])
    w.add_uint32("llama.feed_forward_length", meta["feed_forward_length"])
    w.add_uint32("llama.attention.head_count", meta["head_count"])
    w.add_uint32("llama.context_length", meta["context_length"])
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


@pytest.mark.parametrize("overrides, fragment", [
    ({"block_count": 10**9}, "GGUF metadata llama.block_count must be an integer from 1 to 1024, "
                             "not the number 1000000000"),
    ({"block_count": "many"}, "llama.block_count must be an integer"),
    ({"head_count": 0}, "llama.attention.head_count must be an integer from 1"),
    ({"context_length": 2**30}, "llama.context_length must be an integer from 1 to 16777216"),
])
def test_gguf_metadata_limits(tmp_path, overrides, fragment):
    """block_count 1e9 used to build a tensor list of 1e9 layers (memory without bound)."""
    from offbatch.tools.gguf_import import import_gguf

    path = _gguf_with(tmp_path / "m.gguf", **overrides)
    with pytest.raises(ModelFolderError, match=fragment):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gguf_tokenizer_metadata_types():
    pytest.importorskip("gguf")
    from offbatch.tools.gguf_import import build_tokenizer

    base = {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"]}
    for change, fragment in [({"tokenizer.ggml.tokens": ["a", 5]}, "tokenizer.ggml.tokens must be a list"),
                             ({"tokenizer.ggml.model": ["gpt2"]}, "tokenizer.ggml.model must be a string"),
                             ({"tokenizer.ggml.eos_token_id": "1"}, "eos_token_id must be an integer"),
                             ({"tokenizer.ggml.add_bos_token": 1}, "add_bos_token must be true or false"),
                             ({"tokenizer.chat_template": "x" * (2**20 + 1)}, "limit for a chat template")]:
        with pytest.raises(ModelFolderError, match=fragment):
            build_tokenizer({**base, **change}, [])
