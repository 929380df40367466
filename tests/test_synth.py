"""offbatch synth: folders transformers loads, exact tensor names/shapes, determinism, presets, speed, CLI."""

import hashlib
import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer
from typer.testing import CliRunner

from offbatch.cli.main import app
from offbatch.models.names import expected_tensors
from offbatch.models.presets import PRESETS
from offbatch.models.spec import load_spec, spec_from_config
from offbatch.tools.synth import (
    CHUNK,
    SynthError,
    checkpoint_tensors,
    param_count,
    synth_config,
    synth_model,
    synth_tensor,
    synth_tensors,
)
from offbatch.tools.synth_tokenizer import CHATML_TEMPLATE, MAX_TOKENIZER_VOCAB, SPECIAL_IDS

VARIANTS = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "opt": ("opt", {}),
    "opt-proj": ("opt", {"embed_proj_dim": 32}),
    "opt-postnorm": ("opt", {"post_norm": True}),
    "mixtral": ("mixtral", {}),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "olmoe": ("olmoe", {}),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return {key: synth_model(family, root / key, seed=7, **ov).out_dir for key, (family, ov) in VARIANTS.items()}


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _header(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- transformers loads every tiny default, and its greedy choices are clear -------------------------

@pytest.mark.parametrize("key", list(VARIANTS))
def test_tiny_folder_runs_in_transformers_with_clear_margins(folders, key):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folders[key], dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model.eval()
    spec = load_spec(folders[key])
    ids = torch.randint(4, 500, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, output_router_logits=spec.moe is not None)
    logits = out.logits
    assert logits.shape == (3, 24, spec.vocab_size)
    assert torch.isfinite(logits).all()
    assert 1.0 < logits.std().item() < 10.0 and logits.abs().max().item() < 100.0  # spread, no blow-up
    top2 = logits.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    assert (margin > 1e-2).float().mean().item() >= 0.9
    assert margin.median().item() > 0.1
    if spec.moe is not None:  # routers choose distinct top-k experts
        k = spec.moe.top_k
        for router in out.router_logits:
            s = router.sort(-1, descending=True).values
            gap = s[:, k - 1] - s[:, k]
            assert (gap > 1e-3).float().mean().item() >= 0.9 and gap.median().item() > 0.1


def test_tiny_defaults_exercise_each_familys_features(folders):
    specs = {key: load_spec(path) for key, path in folders.items()}
    assert specs["llama"].rope_scaling["rope_type"] == "llama3"
    assert specs["mistral"].sliding_window == 16
    assert specs["qwen2"].qkv_bias and specs["qwen2"].tie_word_embeddings
    assert specs["qwen3"].qk_norm == "head" and specs["qwen3"].q_size != specs["qwen3"].hidden_size
    assert specs["olmoe"].qk_norm == "full"
    assert specs["qwen2_moe"].moe_layers == (True, False, True)
    assert specs["qwen2_moe"].moe.shared_expert_intermediate_size > 0 and specs["qwen2_moe"].moe.shared_expert_gate
    assert specs["opt-proj"].embed_proj_dim == 32
    assert not specs["opt-postnorm"].pre_norm and not specs["opt-postnorm"].final_norm
    for spec in specs.values():
        assert spec.moe is None or (spec.moe.num_experts, spec.moe.top_k) == (4, 2)
        assert spec.hidden_size == 64 and spec.torch_dtype == "float32"


@pytest.mark.parametrize("key", list(VARIANTS))
def test_tensor_names_shapes_and_metadata(folders, key):
    path = folders[key]
    spec = load_spec(path)
    header = _header(path / "model.safetensors")
    assert header.pop("__metadata__") == {"format": "pt"}
    want = {name: info.shape for name, info in expected_tensors(spec).items()}
    if spec.tie_word_embeddings:
        del want["lm_head.weight"]
    assert {name: tuple(h["shape"]) for name, h in header.items()} == want
    assert {h["dtype"] for h in header.values()} == {"F32"}


def test_folder_files_tokenizer_and_generation_config(folders):
    from transformers import AutoTokenizer

    path = folders["llama"]
    names = {p.name for p in path.iterdir()}
    assert names == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "chat_template.jinja"}
    assert (path / "chat_template.jinja").read_text() == CHATML_TEMPLATE
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [SPECIAL_IDS["<|im_end|>"], SPECIAL_IDS["<|endoftext|>"]]
    assert json.loads((folders["mistral"] / "generation_config.json").read_text())["eos_token_id"] == 2

    tok = AutoTokenizer.from_pretrained(path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 2, 3)
    assert tok.model_max_length == 256
    assert len(tok) <= load_spec(path).vocab_size
    text = "The quick brown fox, 12 jars at 4.50 each!"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id  # Llama's tokenizer prepends BOS
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert AutoTokenizer.from_pretrained(folders["qwen2"])(text).input_ids == ids[1:]  # no BOS for Qwen
    # transformers (which rebuilds Qwen2's pipeline itself) and plain `tokenizers` agree everywhere.
    hard = "Café naïve 😀 don't\n\n  x\tY 3.14159 <|im_end|>"
    for key in ("qwen2", "opt", "mixtral", "olmoe"):
        raw = Tokenizer.from_file(str(folders[key] / "tokenizer.json"))
        assert AutoTokenizer.from_pretrained(folders[key])(hard).input_ids == raw.encode(hard).ids
        assert raw.decode(raw.encode(hard).ids, skip_special_tokens=False).endswith(hard)
    chat = [{"role": "user", "content": "Hi there"}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(chat, tokenize=False).endswith("<|im_end|>\n")


def test_large_vocab_keeps_tokenizer_small(tmp_path):
    from transformers import AutoTokenizer

    synth_model("qwen2", tmp_path, vocab_size=20000)
    assert len(AutoTokenizer.from_pretrained(tmp_path)) <= MAX_TOKENIZER_VOCAB


# ---- shards ---------------------------------------------------------------------------------------------

def test_sharded_output_has_correct_index_and_same_model(folders, tmp_path):
    result = synth_model("llama", tmp_path, seed=7, shard_size=60_000)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    n = len(files)
    assert n > 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    spec = load_spec(tmp_path)
    assert set(index["weight_map"]) == set(checkpoint_tensors(spec))
    total = 0
    for fname in files:
        with safe_open(tmp_path / fname, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            sizes = [f.get_tensor(name).numel() * 4 for name in f.keys()]
            assert all(index["weight_map"][name] == fname for name in f.keys())
        assert len(sizes) == 1 or sum(sizes) <= 60_000  # only a lone tensor may exceed the shard size
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total == result.weight_bytes
    # Same seed, sharded or not: the same model.
    ids = torch.randint(4, 500, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(_hf_model(tmp_path)(ids).logits, _hf_model(folders["llama"])(ids).logits)


# ---- determinism and the in-memory API -----------------------------------------------------------------

def test_same_seed_same_bytes_other_seed_other_weights(folders, tmp_path):
    synth_model("mixtral", tmp_path / "a", seed=7)
    synth_model("mixtral", tmp_path / "b", seed=8)
    same, other = folders["mixtral"] / "model.safetensors", tmp_path / "b" / "model.safetensors"
    assert _sha(tmp_path / "a" / "model.safetensors") == _sha(same)
    assert _sha(other) != _sha(same)
    a, b = load_file(same), load_file(other)
    for name in a:
        if not name.endswith("norm.weight"):
            assert not torch.allclose(a[name], b[name])


def test_in_memory_tensors_equal_file_and_are_independent(folders):
    spec = load_spec(folders["qwen2_moe"])
    on_disk = load_file(folders["qwen2_moe"] / "model.safetensors")
    names = []
    for name, tensor in synth_tensors(spec, seed=7):
        names.append(name)
        assert torch.equal(tensor, on_disk[name])
        assert torch.equal(synth_tensor(spec, name, seed=7), tensor)  # any one tensor on demand
    assert names == list(checkpoint_tensors(spec))
    # Distinct tensors of the same shape are not copies of each other.
    e0, e1 = on_disk["model.layers.0.mlp.experts.0.up_proj.weight"], on_disk["model.layers.0.mlp.experts.1.up_proj.weight"]
    assert torch.corrcoef(torch.stack([e0.flatten(), e1.flatten()]))[0, 1].abs() < 0.1


def test_dtypes_hold_the_same_weights_and_tied_head_is_the_embedding(folders):
    spec = load_spec(folders["qwen2"])
    name = "model.layers.1.mlp.down_proj.weight"
    f32 = synth_tensor(spec, name, seed=3, dtype="float32")
    assert torch.equal(synth_tensor(spec, name, seed=3, dtype="bfloat16"), f32.to(torch.bfloat16))
    assert torch.equal(synth_tensor(spec, name, seed=3, dtype=torch.float16), f32.to(torch.float16))
    assert torch.equal(synth_tensor(spec, "lm_head.weight", 3), synth_tensor(spec, "model.embed_tokens.weight", 3))
    with pytest.raises(KeyError):
        synth_tensor(spec, "model.layers.9.mlp.up_proj.weight")


def test_large_tensor_statistics_across_chunks():
    spec = spec_from_config(synth_config("llama", hidden_size=1024, intermediate_size=2048, heads=8, kv_heads=8))
    w = synth_tensor(spec, "model.layers.0.mlp.down_proj.weight")  # (1024, 2048): 64 chunks
    assert w.numel() == 64 * CHUNK
    assert abs(w.mean().item()) < 1e-3
    assert w.std().item() == pytest.approx(1 / math.sqrt(2048), rel=0.02)
    chunks = w.flatten().view(-1, CHUNK)
    assert len({c[:8].tolist().__repr__() for c in chunks}) == 64  # every chunk from its own place
    norm = synth_tensor(spec, "model.layers.0.input_layernorm.weight")
    assert norm.mean().item() == pytest.approx(1.0, abs=0.02) and 0.05 < norm.std().item() < 0.2



def _fill_twin(dst, start, plan, pool):
    """The generator's definition, one pool slice at a time (how it was first written): _fill must equal it."""
    end, pos = start + dst.numel(), start
    while pos < end:
        j = pos // CHUNK
        stop = min(end, (j + 1) * CHUNK)
        src = pool[plan.offsets[j] + pos - j * CHUNK:][: stop - pos]
        t = torch.mul(src, plan.scales[j])
        if plan.mean != 0.0:
            t.add_(plan.mean)
        dst[pos - start: stop - start].copy_(t)
        pos = stop


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fill_equals_its_one_slice_at_a_time_twin(dtype, monkeypatch):
    from offbatch.tools import synth as S

    monkeypatch.setattr(S, "FILL_CHUNKS", 3)  # several gather steps, each ending inside a write's range
    spec = spec_from_config(synth_config("llama", hidden_size=512, intermediate_size=1000, heads=8, kv_heads=8))
    pool = S._pool(0)
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight"):  # mean 0 and 1
        info = expected_tensors(spec)[name]
        plan = S._plan(spec, name, info, 0)
        gen = torch.Generator().manual_seed(hash(name) % 1000)
        cuts = sorted(torch.randint(0, plan.numel, (5,), generator=gen).tolist())  # ragged, as the block writer cuts
        for a, b in zip([0] + cuts, cuts + [plan.numel]):
            got, want = torch.empty(b - a, dtype=dtype), torch.empty(b - a, dtype=dtype)
            S._fill(got, a, plan, pool)
            _fill_twin(want, a, plan, pool)
            assert torch.equal(got, want), (name, a, b)
    whole = synth_tensor(spec, "model.layers.0.mlp.up_proj.weight")
    twin = torch.empty(whole.numel(), dtype=whole.dtype)
    _fill_twin(twin, 0, S._plan(spec, "model.layers.0.mlp.up_proj.weight",
                               expected_tensors(spec)["model.layers.0.mlp.up_proj.weight"], 0), pool)
    assert torch.equal(whole.flatten(), twin)


@pytest.mark.gpu
def test_synth_tensor_on_the_gpu_equals_the_cpus():
    spec = spec_from_config(synth_config("llama", hidden_size=1024, intermediate_size=2816, heads=8, kv_heads=8))
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(synth_tensor(spec, name, device="cuda").cpu(), synth_tensor(spec, name))

# ---- presets at real shapes (config only: no weights written) ------------------------------------------

@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_count_matches_published(name):
    preset = PRESETS[name]
    spec = spec_from_config(synth_config(preset.family, name))
    assert spec.family == preset.family and spec.torch_dtype == preset.dtype
    assert param_count(spec) == pytest.approx(preset.params, rel=0.003)


def test_known_preset_sizes_and_features(tmp_path):
    from transformers import AutoConfig

    mixtral = spec_from_config(synth_config("mixtral", "mixtral-8x7b"))
    assert param_count(mixtral) == pytest.approx(46.70e9, rel=0.002)
    assert (mixtral.moe.num_experts, mixtral.moe.top_k, mixtral.num_layers) == (8, 2, 32)
    cfg = synth_config("llama-3-8b")  # a preset name in place of FAMILY
    llama = spec_from_config(cfg)
    assert param_count(llama) == pytest.approx(8.03e9, rel=0.002)
    assert llama.rope_scaling["rope_type"] == "llama3" and llama.rope_scaling["factor"] == 8.0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = AutoConfig.from_pretrained(tmp_path)
    rope = getattr(hf, "rope_parameters", None) or hf.rope_scaling
    assert rope["rope_type"] == "llama3" and hf.num_key_value_heads == 8
    qwen = spec_from_config(synth_config("qwen2_moe", "qwen1.5-moe-a2.7b"))
    assert qwen.moe.shared_expert_gate and qwen.moe.num_experts == 60


def test_overrides_apply_on_top_of_presets():
    spec = spec_from_config(synth_config("mixtral", "mixtral-8x7b", layers=2, experts=4, dtype="float16"))
    assert (spec.num_layers, spec.moe.num_experts, spec.hidden_size, spec.torch_dtype) == (2, 4, 4096, "float16")
    spec = spec_from_config(synth_config("opt", hidden_size=128, tie=False))
    assert spec.embed_proj_dim is None and not spec.tie_word_embeddings
    spec = spec_from_config(synth_config("qwen3_moe", moe_intermediate_size=16, mlp_only_layers=[0]))
    assert spec.moe.expert_intermediate_size == 16 and spec.moe_layers == (False, True)
    assert spec_from_config(synth_config("mistral", sliding_window=None, layers=None)).sliding_window is None
    with pytest.raises(SynthError, match="top-k 5 is larger"):
        synth_config("olmoe", top_k=5)
    with pytest.raises(SynthError, match="not a multiple of kv heads"):
        synth_config("llama", kv_heads=3)


# ---- a larger model (its write rate: scripts/bench_speed.py) ------------------------------------------------

def test_write_throughput(tmp_path):
    cfg = synth_config("llama", hidden_size=1024, intermediate_size=4096, layers=3, heads=8, kv_heads=8,
                       vocab_size=32000, dtype="bfloat16")
    from offbatch.tools.synth import write_model

    result = write_model(cfg, tmp_path, shard_size=100_000_000)
    # The write rate is measured by scripts/bench_speed.py, not asserted here (no wall-clock assertions
    # in tests: a loaded CI machine fails them).
    assert 200e6 < result.weight_bytes < 260e6 and len(list(tmp_path.glob("*.safetensors"))) == 3


# ---- CLI ---------------------------------------------------------------------------------------------------

def _run(*args):
    result = CliRunner().invoke(app, ["synth", *map(str, args)])
    text = result.output
    try:
        text += result.stderr
    except (ValueError, AttributeError):
        pass
    return result.exit_code, text


def test_cli_writes_a_folder(tmp_path):
    code, text = _run("qwen3", tmp_path / "m", "--layers", "3", "--seed", "5", "--dtype", "bfloat16")
    assert code == 0, text
    assert re.search(r"wrote .*qwen3, [\d,]+ parameters, bfloat16", text)
    spec = load_spec(tmp_path / "m")
    assert spec.num_layers == 3 and spec.torch_dtype == "bfloat16"
    code, text = _run("qwen3", tmp_path / "m", "--quiet", "--force", "--shard-size", "100KB")
    assert code == 0 and text == ""
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    assert not (tmp_path / "m" / "model.safetensors").exists()  # the old single file is gone


@pytest.mark.parametrize("args, message", [
    (["gpt2", "{out}"], "unknown family 'gpt2'"),
    (["llama", "{out}", "--preset", "mixtral-8x7b"], "preset 'mixtral-8x7b' is a 'mixtral' model, not 'llama'"),
    (["llama", "{out}", "--preset", "llama-9"], "unknown preset 'llama-9'"),
    (["llama", "{out}", "--post-norm"], "--post-norm applies to the opt family only"),
    (["qwen2", "{out}", "--experts", "8"], "--experts applies to MoE families only"),
    (["llama", "{out}", "--hidden-size", "65"], "hidden_size 65 is not a multiple of heads 4"),
    (["llama", "{out}", "--dtype", "int8"], "dtype 'int8' is not one of"),
    (["llama", "{out}", "--shard-size", "lots"], "--shard-size: not a byte size"),
    (["llama", "{out}", "--vocab-size", "100"], "vocab_size 100 is too small"),
])
def test_cli_bad_input_gives_a_clear_error(tmp_path, args, message):
    code, text = _run(*[a.format(out=tmp_path / "m") for a in args])
    assert code != 0
    assert message in text
    assert "Traceback" not in text
    assert not (tmp_path / "m" / "config.json").exists()


def test_cli_refuses_to_overwrite_without_force(tmp_path):
    assert _run("llama", tmp_path)[0] == 0
    code, text = _run("llama", tmp_path, "--seed", "1")
    assert code != 0 and "already holds a model" in text and "--force" in text


@pytest.mark.gpu
@pytest.mark.parametrize("weights", ["int4", "int8", "bitmap-50"])
def test_encoding_on_the_gpu_stores_what_the_cpu_would(weights):
    """convert/synth encode on the GPU when there is one: the same stored tensors as on the CPU for the
    integer formats; magnitude pruning keeps the same magnitudes in every row (top-k may break ties between
    equal magnitudes at other positions)."""
    from offbatch.formats import get_format
    from offbatch.tools.convert import format_name

    fmt = get_format(format_name(weights))
    spec = spec_from_config(synth_config("llama", hidden_size=1024, intermediate_size=2816, heads=8, kv_heads=8))
    w = synth_tensor(spec, "model.layers.0.mlp.up_proj.weight")
    cpu = fmt.encode("up.weight", w, torch.bfloat16)
    gpu = {k: v.cpu() for k, v in fmt.encode("up.weight", w.cuda(), torch.bfloat16).items()}
    assert cpu.keys() == gpu.keys()
    if not weights.startswith("bitmap"):
        for k in cpu:
            assert torch.equal(cpu[k], gpu[k]), k
        return
    a = fmt.dequantize(cpu, "up.weight", torch.float32)
    b = fmt.dequantize(gpu, "up.weight", torch.float32)
    assert torch.equal(a.abs().sort(1).values, b.abs().sort(1).values)
    assert ((a != 0) == (b != 0)).float().mean() > 0.99


@pytest.mark.parametrize("value,message", [("bogus", "cpu, cuda or cuda:N"), ("gpu", "cpu, cuda or cuda:N"),
                                           ("cuda:99", "no such CUDA device")])
def test_a_bad_encode_device_is_one_clear_error_and_writes_nothing(tmp_path, monkeypatch, value, message):
    monkeypatch.setenv("OFFBATCH_ENCODE_DEVICE", value)
    code, text = _run("llama", tmp_path / "out", "--weights", "int4", "--quiet")
    assert code != 0 and message in text and "internal error" not in text
    assert not (tmp_path / "out").exists()
