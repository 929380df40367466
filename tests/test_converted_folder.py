"""Model folders stored in a weight format (models/converted.py): read as they are stored - the weight
store, the disk tier and the reference model take the stored tensors without decoding and encoding them
again, the engine gives the reference's tokens on them - and every way such a folder can be wrong is one
clear error. The folders here are written by hand from the contract (stored_tensors), independently of
`offbatch convert`."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_factory import FAMILIES, save_hf_model
from offbatch.errors import ModelFolderError, OffbatchError
from offbatch.formats import get_format
from offbatch.models.catalogue import local_name, module_of
from offbatch.models.converted import quantization_config, stored_tensors
from offbatch.models.loader import open_checkpoint
from offbatch.models.names import expected_tensors
from offbatch.offload.disk import read_module_now
from offbatch.offload.weights import CheckpointSource, WeightStore

PROMPTS = [[3, 5, 7, 9, 11, 13, 2], [4, 8, 15, 16, 23, 42, 1, 2, 3], [99]]
NEW = 5


def write_stored(src, out, name: str, dtype=torch.float32) -> None:
    """`src` (a dense folder) stored in format `name` under `out`, by the contract."""
    fmt = get_format(name)
    out.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quantization_config(fmt, source="test")
    (out / "config.json").write_text(json.dumps(cfg))
    ckpt = open_checkpoint(src)
    tensors = {}
    for hf, info in expected_tensors(ckpt.spec).items():
        if not ckpt.has(info.canonical) or info.canonical not in ckpt.entries:
            continue
        t = ckpt.get(info.canonical)
        local = local_name(info.canonical, module_of(info.canonical, ckpt.spec))
        for stored, value in fmt.encode(local, t, dtype).items():
            tensors[hf + stored[len(local):]] = value.contiguous()
    assert set(tensors) <= set(stored_tensors(ckpt.spec, fmt))
    save_file(tensors, str(out / "model.safetensors"))


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def dense(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    save_hf_model(request.param, path)
    return path


@pytest.fixture(scope="module", params=["int4-asym-g32", "int8", "bitmap-60-int8"])
def stored(request, dense, tmp_path_factory):
    out = tmp_path_factory.mktemp("stored") / request.param
    write_stored(dense, out, request.param)
    return out, request.param


def test_a_stored_folder_opens_in_its_format_with_its_logical_shapes(stored, dense):
    out, name = stored
    ckpt, src = open_checkpoint(out), open_checkpoint(dense)
    assert ckpt.format is get_format(name)
    assert {c: e.shape for c, e in ckpt.entries.items()} == {c: e.shape for c, e in src.entries.items()}
    q = "layers.0.q.weight"
    assert ckpt.entry(q).stored and not src.entry(q).stored
    assert ckpt.entry(q).nbytes < src.entry(q).nbytes
    # The logical tensor is the format's decoding of what is stored.
    fmt = get_format(name)
    again = fmt.encode("q.weight", src.get(q), torch.float32)
    assert torch.equal(ckpt.get(q), fmt.dequantize(again, "q.weight", torch.float32, src.entry(q).shape[1]))


def test_the_store_copies_stored_tensors_as_they_are_from_host_and_disk(stored, dense):
    out, name = stored
    ckpt, fmt = open_checkpoint(out), get_format(name)
    src = open_checkpoint(dense)
    from_folder = WeightStore(CheckpointSource(ckpt), torch.float32, pin=False, fmt=fmt)
    encoded = WeightStore(CheckpointSource(src), torch.float32, pin=False, fmt=fmt)
    layers = [k for k in from_folder.keys() if k[0] >= 0]
    on_disk = WeightStore(CheckpointSource(ckpt), torch.float32, pin=False, fmt=fmt, disk=set(layers))
    reads = [r for k in layers for r in on_disk.disk[k]]
    assert all(r.direct for r in reads if r.canonical in ckpt.entries and ckpt.entry(r.canonical).stored)
    for key in layers:
        disk = on_disk.layouts[key].views(read_module_now(on_disk, key))
        host = from_folder.layouts[key].views(from_folder.host[key])
        want = encoded.layouts[key].views(encoded.host[key])
        for n, t in want.items():
            assert torch.equal(host[n], t) and torch.equal(disk[n], t), (key, n)


def test_engine_and_reference_run_the_folder_in_its_format_by_default(stored, dense):
    from offbatch.engine.api import GenRequest, SamplingParams
    from offbatch.engine.build import engine_for_folder
    from offbatch.engine.reference import ReferenceModel

    out, name = stored
    ref = ReferenceModel.load(out, dtype="float32")
    same = ReferenceModel.load(dense, dtype="float32", weights=name)  # encoded at load: the same bytes
    expected = ref.greedy(PROMPTS, NEW)
    assert expected == same.greedy(PROMPTS, NEW)
    eng = engine_for_folder(out, device="cpu", dtype="float32", num_requests=len(PROMPTS), max_len=32,
                            max_resident_bytes=0)
    assert eng.plan.weights == name and eng.store.format is get_format(name)
    reqs = [GenRequest(i, p, SamplingParams(max_tokens=NEW, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    outs = {o.key: o.token_ids for o in eng.generate(reqs)}
    assert [outs[i] for i in range(len(PROMPTS))] == expected
    # Run expanded: the decoded weights, as dense.
    expanded = ReferenceModel.load(out, dtype="float32", weights="dense")
    assert not any(k.endswith((".q4", ".q8", ".bits")) for k in expanded.modules[(0, "attn")])


def test_another_lossy_format_on_a_stored_folder_is_refused(stored):
    from offbatch.engine.build import engine_for_folder
    from offbatch.engine.reference import ReferenceModel

    out, name = stored
    other = "int8" if name != "int8" else "int4"
    with pytest.raises(ModelFolderError, match=f"stored in the {name} weight format"):
        ReferenceModel.load(out, dtype="float32", weights=other)
    with pytest.raises(OffbatchError, match=f"stored in the {name} weight format"):
        engine_for_folder(out, device="cpu", dtype="float32", num_requests=2, max_len=32, weights=other)


def _edit(folder, tmp_path, change_tensors=None, change_config=None):
    out = tmp_path / "bad"
    shutil.copytree(folder, out)
    if change_config:
        cfg = json.loads((out / "config.json").read_text())
        change_config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    if change_tensors:
        t = load_file(str(out / "model.safetensors"))
        change_tensors(t)
        save_file(t, str(out / "model.safetensors"))
    return out


def _first(t, suffix):
    return next(n for n in sorted(t) if n.endswith(suffix))


@pytest.mark.parametrize("case, match", [
    ("scale-dtype", "format stores it as float16"),
    ("q4-shape", "format imply"),
    ("missing-scale", "missing tensors"),
    ("dense-weight-too", "unexpected tensors"),
    ("other-method", "does not read"),
    ("unknown-format", "does not know"),
    ("not-an-object", "not an object"),
    ("bits-shape", "format imply"),
    ("bits-dtype", "format stores it as uint8"),
    ("bits-values-missing", "missing tensors"),
])
def test_a_broken_stored_folder_is_one_clear_error(dense, tmp_path, case, match):
    folder = tmp_path / "ok"
    write_stored(dense, folder, "bitmap-50" if case.startswith("bits") else "int4-asym-g32")
    edits = {
        "scale-dtype": dict(change_tensors=lambda t: t.update({_first(t, ".scale"): t[_first(t, ".scale")].float()})),
        "q4-shape": dict(change_tensors=lambda t: t.update({_first(t, ".q4"): t[_first(t, ".q4")][:, :-1].clone()})),
        "missing-scale": dict(change_tensors=lambda t: t.pop(_first(t, ".min"))),
        "dense-weight-too": dict(change_tensors=lambda t: t.update(
            {_first(t, ".q4").removesuffix(".q4"): torch.zeros(2, 2)})),
        "other-method": dict(change_config=lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4})),
        "unknown-format": dict(change_config=lambda c: c["quantization_config"].update(format="int3")),
        "not-an-object": dict(change_config=lambda c: c.update(quantization_config="int4")),
        "bits-shape": dict(change_tensors=lambda t: t.update({_first(t, ".bits"): t[_first(t, ".bits")][:, :-1].clone()})),
        "bits-dtype": dict(change_tensors=lambda t: t.update({_first(t, ".bits"): t[_first(t, ".bits")].to(torch.int16)})),
        "bits-values-missing": dict(change_tensors=lambda t: t.pop(_first(t, ".nz"))),
    }
    bad = _edit(folder, tmp_path, **edits[case])
    with pytest.raises(ModelFolderError, match=match):
        open_checkpoint(bad)


# ---- the commands on formats: run --weights, plan's comparison, inspect ------------------------------------

@pytest.fixture(scope="module")
def synth_folder(tmp_path_factory):
    from jobs_support import synth_llama

    return synth_llama(tmp_path_factory.mktemp("cmd") / "m")


def test_run_weights_gives_the_reference_tokens_in_that_format_and_its_own_results_key(synth_folder, tmp_path):
    from typer.testing import CliRunner

    from offbatch.cli.main import app
    from offbatch.engine.reference import ReferenceModel
    from offbatch.models.tokenizer import load_tokenizer

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": i, "prompt": p}) for i, p in
                                 enumerate(["the cat sat on", "a model reads", "one two three"])) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["run", str(synth_folder), str(prompts), "-o", str(out), "--max-tokens", "4", "--temperature", "0",
            "--ignore-eos", "--dtype", "float32", "--quiet"]
    r = CliRunner().invoke(app, [*args, "--weights", "int4"])
    assert r.exit_code == 0, r.output
    got = {json.loads(line)["id"]: json.loads(line) for line in out.read_text().splitlines() if line.strip()}
    tok = load_tokenizer(synth_folder)
    ref = ReferenceModel.load(synth_folder, dtype="float32", weights="int4")  # decoded at each use
    ids = [tok.encode(p) for p in ["the cat sat on", "a model reads", "one two three"]]
    want = ref.greedy(ids, 4)
    for i, w in enumerate(want):
        assert got[i]["completion_tokens"] == 4 and got[i]["text"] == tok.decode(w)
    # The same output without --weights is another job (dense): refused, not mixed in.
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "int4" in again.output


def test_plan_shows_a_format_against_dense():
    from typer.testing import CliRunner

    from offbatch.cli.main import app

    r = CliRunner().invoke(app, ["plan", "--synth", "llama-3-8b", "--hardware", "h200", "--gpu-memory", "8GiB",
                                 "--weights", "int4", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["plan"]["weights"] == "int4" and rep["stored_as"] == "dense"
    assert rep["weight_bytes"] < 0.4 * rep["dense"]["weight_bytes"]  # embedding and head stay bf16
    assert rep["predicted"]["decode_step"]["weight_bytes"] < rep["dense"]["decode_step"]["weight_bytes"]


def test_plan_and_inspect_name_the_stored_format(stored):
    from typer.testing import CliRunner

    from offbatch.cli.main import app

    out, name = stored
    text = CliRunner().invoke(app, ["plan", str(out), "--hardware", "h200", "--gpu-memory", "1GiB", "--prompt-len", "16",
                                    "--gen-len", "16"])
    assert text.exit_code == 0 and f"the folder is stored in {name}" in text.output
    r = CliRunner().invoke(app, ["inspect", str(out), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["weights"] == name


@pytest.mark.parametrize("name, suffix", [("int4-asym", ".q4"), ("bitmap-50", ".bits")])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_stored_in_a_format_runs_the_reference_tokens(family, name, suffix, tmp_path):
    """A folder stored in int4-asym or pruned to bitmap-50 (by the contract): the streaming engine, weights
    streamed, gives the reference forward's greedy tokens on the same folder."""
    from offbatch.engine.api import GenRequest, SamplingParams
    from offbatch.engine.build import engine_for_folder
    from offbatch.engine.reference import ReferenceModel

    src, out = tmp_path / "src", tmp_path / name
    save_hf_model(family, src)
    write_stored(src, out, name)
    ref = ReferenceModel.load(out, dtype="float32")
    assert any(k.endswith(suffix) for k in ref.modules[(0, "attn")])
    expected = ref.greedy(PROMPTS, 3)
    eng = engine_for_folder(out, device="cpu", dtype="float32", num_requests=len(PROMPTS), max_len=32,
                            max_resident_bytes=0)
    reqs = [GenRequest(i, p, SamplingParams(max_tokens=3, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    outs = {o.key: o.token_ids for o in eng.generate(reqs)}
    assert [outs[i] for i in range(len(PROMPTS))] == expected
