"""Every broken-folder case is one clear error naming the tensor and file, found before any compute."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_factory import save_hf_model
from offbatch.errors import ModelFolderError
from offbatch.models.loader import open_checkpoint
from offbatch.models.spec import spec_from_config


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
