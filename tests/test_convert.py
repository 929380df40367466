"""`offbatch convert`: the folder it writes holds exactly the tensors the contract names
(models/converted.py `stored_tensors`), each equal to the format's `encode` of the source's weight; it opens
like any folder, the reference and the streaming engine run it in its format and agree; the size and quality
reports; and every bad input is one clear error that leaves nothing behind."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from hf_factory import save_hf_model
from jobs_support import synth_llama
from offbatch.cli.main import app
from offbatch.errors import ModelFolderError, OutputFileError
from offbatch.formats import get_format
from offbatch.models.catalogue import local_name, module_of
from offbatch.models.converted import stored_tensors
from offbatch.models.loader import open_checkpoint
from offbatch.models.names import expected_tensors
from offbatch.tools import convert as cv
from offbatch.tools import texts

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
# (family, format): every format on Llama, the MoE family (experts in a format) once.
CASES = [("llama", "int8"), ("llama", "int4"), ("llama", "int4-asym-g32"), ("llama", "nf4"), ("mixtral", "int4"),
         # --skip: experts part dense (run one by one), experts all dense (the dense grouped kernels)
         ("mixtral", "int4+keep=down,o"), ("mixtral", "int8+keep=experts"),
         # pruned: a bitmap and the kept values (magnitude: convert --weights bitmap-50 is --prune 0.5)
         ("llama", "bitmap-50"), ("mixtral", "bitmap-50"), ("llama", "bitmap-70-int8"), ("llama", "bitmap-50-int4")]
PROMPTS = [[3, 5, 7, 9, 11, 13, 2], [4, 8, 15, 16, 23, 42, 1, 2, 3], [99]]
ENGLISH = ("It was a bright cold day in April, and the clocks were striking thirteen. The hallway smelt of "
           "boiled cabbage and old rag mats. At one end of it a coloured poster, too large for indoor display, "
           "had been tacked to the wall. ")


def needs(name: str) -> None:
    if name in ("nf4", "fp4"):
        pytest.importorskip("offbatch.formats.bnb4")
        pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """family -> a tiny folder transformers writes (once per family); the FFN's 96 inputs are no whole
    number of int4's default groups of 64."""
    made = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = tmp_path_factory.mktemp(family) / "src"
            save_hf_model(family, made[family], tie_word_embeddings=family == "llama")
        return made[family]

    return get


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return load_file(folder / "model.safetensors")
    files = set(json.loads(index.read_text())["weight_map"].values())
    return {k: v for f in files for k, v in load_file(folder / f).items()}


@pytest.mark.parametrize("family, name", CASES)
def test_the_folder_holds_exactly_the_stored_tensors_the_format_encodes(sources, tmp_path, family, name):
    needs(name)
    source = sources(family)
    out = tmp_path / "out"
    summary = cv.convert(source, out, name, max_shard_bytes=16 * 1024)  # several shards
    fmt, src = get_format(name), open_checkpoint(source)
    dtype = src.dtype()

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (out / "model.safetensors").exists()
    tensors = read_folder(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == summary.bytes == sum(t.nbytes for t in tensors.values())
    # Every tensor the contract names (a tied head is the embedding: not stored), of its shape and dtype.
    want = {n: st for n, st in stored_tensors(src.spec, fmt).items() if st.canonical in src.entries}
    assert set(tensors) == set(want)
    for n, st in want.items():
        assert tuple(tensors[n].shape) == st.shape and tensors[n].dtype == (st.dtype or dtype), n
    # ... holding what the format's encode makes of the source's weights.
    compressed = 0
    for hf, info in expected_tensors(src.spec).items():
        if info.canonical not in src.entries:
            continue
        local = local_name(info.canonical, module_of(info.canonical, src.spec))
        w = src.get(info.canonical)
        if not fmt.compresses(local, tuple(w.shape)):
            assert torch.equal(tensors[hf], w.to(dtype)), hf
            continue
        compressed += 1
        for stored, value in fmt.encode(local, w, dtype).items():
            assert torch.equal(tensors[hf + stored[len(local):]], value), (hf, stored)
    assert summary.compressed == compressed > 0 and summary.format == name
    assert summary.bytes < summary.source_bytes == sum(e.nbytes for e in src.entries.values())
    assert sum(b for b, _ in summary.by_kind.values()) == summary.source_bytes
    assert sum(a for _, a in summary.by_kind.values()) == summary.bytes

    cfg, src_cfg = (json.loads((f / "config.json").read_text()) for f in (out, source))
    qc = cfg.pop("quantization_config")
    assert qc["quant_method"] == "offbatch" and qc["format"] == name and qc["source"] == "src"
    assert cfg == {**src_cfg, "torch_dtype": str(dtype).removeprefix("torch.")}
    assert (out / "generation_config.json").read_bytes() == (source / "generation_config.json").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left
    assert open_checkpoint(out).format is fmt


@pytest.mark.parametrize("family, name", CASES)
def test_the_engine_on_a_converted_folder_gives_the_reference_tokens(sources, tmp_path, family, name):
    from offbatch.engine.api import GenRequest, SamplingParams
    from offbatch.engine.build import engine_for_folder
    from offbatch.engine.reference import ReferenceModel

    needs(name)
    source = sources(family)
    out = tmp_path / "out"
    cv.convert(source, out, name)
    ref = ReferenceModel.load(out, dtype="float32")
    # The folder holds the bytes the weight store encodes at load: the same model, the same logits.
    at_load = ReferenceModel.load(source, dtype="float32", weights=name)
    caches = [ref.new_cache(), at_load.new_cache()]
    assert torch.equal(ref.forward(caches[:1], PROMPTS[:1], all_logits=True),
                       at_load.forward(caches[1:], PROMPTS[:1], all_logits=True))
    expected = ref.greedy(PROMPTS, 5)
    eng = engine_for_folder(out, device="cpu", dtype="float32", num_requests=len(PROMPTS), max_len=32,
                            max_resident_bytes=0)
    assert eng.plan.weights == name
    reqs = [GenRequest(i, p, SamplingParams(max_tokens=5, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    outs = {o.key: o.token_ids for o in eng.generate(reqs)}
    assert [outs[i] for i in range(len(PROMPTS))] == expected


# ---- options and bad inputs ----------------------------------------------------------------------

def test_skip_keeps_layers_dense():
    assert cv.format_name("int4", None, ["down,embed", "o"]) == "int4+keep=down,o"
    assert cv.format_name("int4", 32, ["head"]) == "int4-g32"  # the head is dense in every format
    fmt = get_format(cv.format_name("int4-asym", None, ["attn"]))
    assert not fmt.compresses("q.weight", (64, 64)) and fmt.compresses("experts.1.up.weight", (64, 64))
    assert fmt.compresses("shared.down.weight", (64, 64)) and not get_format("int4+keep=shared").compresses(
        "shared.down.weight", (64, 64))
    with pytest.raises(cv.FormatOptionError, match="--skip takes"):
        cv.format_name("int4", None, ["lm_head"])
    r = runner.invoke(app, ["convert", "x", "y", "--weights", "int4", "--skip", "nonsense"])
    assert r.exit_code == 2 and "--skip" in r.output


def test_format_names_and_groups():
    assert cv.format_name("int4") == "int4"
    assert cv.format_name("int4", 32) == "int4-g32"
    assert cv.format_name("int4", 64) == "int4"  # the default group has one name
    assert cv.format_name("int4-asym", 128) == "int4-asym-g128"
    assert cv.format_name("int8", 32) == "int8-g32"
    assert cv.format_name("int4-asym-g32") == "int4-asym-g32"
    for weights, group, option, match in [
        ("nf4", 64, "--group", "'nf4' takes no group"), ("int4-g32", 32, "--group", "names its group already"),
        ("int4", 48, "--group", "a multiple of 32"), ("int3", None, "--weights", "not a weight format"),
        ("dense", None, "--weights", "nothing to convert"), ("int4", 2048, "--group", "32 to 1024"),
    ]:
        with pytest.raises(cv.FormatOptionError, match=match) as e:
            cv.format_name(weights, group)
        assert e.value.option == option


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A tiny Llama with its own tokenizer (`offbatch synth`): what the quality report needs."""
    return synth_llama(tmp_path_factory.mktemp("synth") / "m")


def test_bad_inputs_are_one_clear_error_and_leave_nothing(synth, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cv.convert(synth, out, "int8")
    with pytest.raises(ModelFolderError, match="already converted to 'int8' by offbatch"):
        cv.convert(out, tmp_path / "again", "int4")
    with pytest.raises(OutputFileError, match="already exists.*--overwrite"):
        cv.convert(synth, out, "int4")
    with pytest.raises(OutputFileError, match="is \\(or holds\\) the source"):
        cv.convert(synth, synth, "int4", overwrite=True)
    with pytest.raises(ModelFolderError, match="does not exist"):
        cv.convert(tmp_path / "nowhere", tmp_path / "x", "int4")
    cv.convert(synth, out, "int4", overwrite=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "int4"

    # Interrupted half-way (Ctrl-C while encoding): neither the folder nor a temp folder is left.
    calls = []
    real = cv.encode_tensor

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cv, "encode_tensor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cv.convert(synth, tmp_path / "half", "int4", max_shard_bytes=16 * 1024)
    assert len(calls) == 5 and not (tmp_path / "half").exists()
    with pytest.raises(KeyboardInterrupt):  # replacing a folder: the old one stays as it was
        calls.clear()
        cv.convert(synth, out, "int8", overwrite=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "int4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("args, status, message", [
    (["--weights", "int3"], 2, "not a weight format"),
    (["--weights", "nf4", "--group", "32"], 2, "'nf4' takes no group"),
    (["--weights", "int4", "--group", "40"], 2, "a multiple of 32"),
    (["--weights", "int4", "--eval-text", "{tmp}/missing.txt"], 3, "no such text file"),
    (["--weights", "int4", "--eval-text", "{tmp}/short.txt"], 3, "fewer than one window"),
])
def test_cli_refuses_bad_options_before_any_work(synth, tmp_path, args, status, message):
    (tmp_path / "short.txt").write_text("Too short.")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = runner.invoke(app, ["convert", str(synth), str(tmp_path / "out"), *args])
    assert r.exit_code == status, r.output
    said = " ".join((r.output + (r.stderr if r.stderr_bytes is not None else "")).replace("│", " ").split())
    assert message in said
    assert not (tmp_path / "out").exists()


def test_cli_converts_and_reports_size_and_quality(synth, tmp_path, monkeypatch):
    from offbatch.engine.reference import ReferenceModel
    from offbatch.tools.quality import perplexity

    text = tmp_path / "english.txt"
    text.write_text(ENGLISH * 12)
    out = tmp_path / "out"
    r = runner.invoke(app, ["convert", str(synth), str(out), "--weights", "int4", "--group", "32",
                            "--eval-text", str(text), "--eval-windows", "2"])
    assert r.exit_code == 0, r.output
    assert "int4-g32" in r.output and "smaller" in r.output and "greedy agreement" in r.output
    report = json.loads((out / cv.REPORT_FILE).read_text())
    assert report["format"] == "int4-g32" and report["windows"] == 2 and report["text_file"] == str(text)
    dense, conv = report["results"]
    assert (dense["weights"], conv["weights"]) == ("dense", "int4-g32")
    assert all(math.isfinite(x["perplexity"]) and x["perplexity"] > 1 for x in (dense, conv))
    assert 0 <= conv["agreement"] <= 1 and dense["tokens"] == conv["tokens"] == report["scored_tokens"] > 0
    assert report["bytes"]["converted"] < report["bytes"]["source"]
    # The dense figure is the source's perplexity over the same windows, as eval-ppl measures it.
    _, wins, _ = cv.eval_windows(synth, text.read_text(), 2)
    assert dense["perplexity"] == pytest.approx(perplexity(ReferenceModel.load(synth), wins)[0], rel=1e-6)
    assert conv["perplexity"] == pytest.approx(perplexity(ReferenceModel.load(out), wins)[0], rel=1e-6)

    # No text anywhere: it converts, and says how quality can be measured.
    monkeypatch.delenv(texts.ENV_VAR, raising=False)
    monkeypatch.setattr(texts, "installed_text", lambda: tmp_path / "not-installed.txt")
    r = runner.invoke(app, ["convert", str(synth), str(tmp_path / "quiet"), "--weights", "int8"])
    assert r.exit_code == 0, r.output
    assert "quality not measured" in r.output and "--eval-text" in r.output and "eval-ppl" in r.output
    assert not (tmp_path / "quiet" / cv.REPORT_FILE).exists()
    # --no-eval: not a word about it.
    r = runner.invoke(app, ["convert", str(synth), str(tmp_path / "no-eval"), "--weights", "int8", "--no-eval",
                            "--eval-text", str(text)])
    assert r.exit_code == 0 and "quality" not in r.output


def test_the_default_text_is_found_where_make_setup_puts_it(tmp_path, monkeypatch):
    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    assert texts.SDIST_PIN in makefile and texts.MEMBER in makefile
    assert f"$(VENV)/{texts.SHARE_PATH.as_posix()}" in makefile
    monkeypatch.delenv(texts.ENV_VAR, raising=False)
    monkeypatch.setattr(texts.sys, "prefix", str(tmp_path))
    assert texts.default_eval_text() is None
    (tmp_path / texts.SHARE_PATH).parent.mkdir(parents=True)
    (tmp_path / texts.SHARE_PATH).write_text(ENGLISH)
    assert texts.default_eval_text() == tmp_path / texts.SHARE_PATH
    monkeypatch.setenv(texts.ENV_VAR, str(tmp_path / "mine.txt"))
    assert texts.default_eval_text() == tmp_path / "mine.txt"
    assert os.environ[texts.ENV_VAR] == str(tmp_path / "mine.txt")


def test_a_model_too_large_to_score_on_the_device_keeps_its_folder(synth, tmp_path, monkeypatch):
    """The quality step holds the whole model on one device; when that runs out of memory the converted
    folder stays, and the command says how to measure it instead (exit 0: the conversion succeeded)."""
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(cv, "measure_quality", out_of_memory)
    text = tmp_path / "english.txt"
    text.write_text(ENGLISH * 12)
    out = tmp_path / "out"
    r = runner.invoke(app, ["convert", str(synth), str(out), "--weights", "int8", "--eval-text", str(text),
                            "--eval-windows", "1"])
    assert r.exit_code == 0, r.output
    assert "quality not measured" in r.output and "--device cpu" in r.output
    assert open_checkpoint(out).format is get_format("int8")
