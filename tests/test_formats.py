"""Weight formats are a seam: a format registered from this file alone - each linear weight stored as
values in the compute dtype plus an int8 power-of-two exponent per row, so it is exact - is laid out,
packed, read from disk and run by the streaming engine with no other code knowing of it. And the
store's modules may be row slices of tensors (the catalogue's `Part.rows`)."""

import pytest
import torch
import torch.nn.functional as F

from hf_factory import save_hf_model
from offbatch.formats import DENSE, WeightFormat, get_format, register_format
from offbatch.formats.base import ALIGN
from offbatch.models.catalogue import Part, modules_of
from offbatch.models.loader import open_checkpoint
from offbatch.offload.disk import read_module_now
from offbatch.offload.weights import CheckpointSource, SynthSource, WeightStore
from offbatch.planner.shape import shape_from_spec

PROMPTS = [[3, 5, 7, 9, 11, 13, 2], [4, 8, 15, 16, 23, 42, 1, 2, 3], [99], [7, 7, 7]]
NEW = 6


class Pow2RowFormat(WeightFormat):
    """Each 2-D "*.weight" tensor (the linear layers') as values = W / 2**e in the compute dtype and e,
    the row's exponent, as int8 [rows, 1]; everything else dense. Scaling by a power of two is exact."""

    name = "toy-pow2-rows"
    decoded = 0  # linear layers computed from the encoded weights

    def compresses(self, local, shape):
        return local.endswith(".weight") and len(shape) == 2

    def stored(self, local, shape, dtype):
        if not self.compresses(local, shape):
            return super().stored(local, shape, dtype)
        return [(f"{local}.values", tuple(shape), dtype), (f"{local}.exp", (shape[0], 1), torch.int8)]

    def encode(self, local, tensor, dtype):
        if not self.compresses(local, tuple(tensor.shape)):
            return super().encode(local, tensor, dtype)
        t = tensor.to(dtype).float()
        _, exp = torch.frexp(t.abs().amax(dim=1, keepdim=True))
        values = t * torch.exp2(-exp.float())
        return {f"{local}.values": values.to(dtype), f"{local}.exp": exp.to(torch.int8)}

    def decode(self, w, local):
        values = w[f"{local}.values"]
        return values * torch.exp2(w[f"{local}.exp"].float()).to(values.dtype)

    def linear(self, x, w, name):
        if f"{name}.weight.exp" not in w:
            return super().linear(x, w, name)
        self.decoded += 1
        return F.linear(x, self.decode(w, f"{name}.weight"), w.get(f"{name}.bias"))


TOY = register_format(Pow2RowFormat())


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    save_hf_model(request.param, path)
    return path


def test_a_toy_layout_holds_two_dtypes_and_round_trips_exactly():
    torch.manual_seed(0)
    w = {"q.weight": torch.randn(5, 8) * 0.03, "q.bias": torch.randn(5), "attn_norm.weight": torch.randn(8)}
    layout = TOY.layout([(k, tuple(t.shape)) for k, t in w.items()], torch.float32)
    assert {it.dtype for it in layout.items} == {torch.float32, torch.int8}
    assert [it.name for it in layout.items] == sorted(["q.weight.values", "q.weight.exp", "q.bias", "attn_norm.weight"])
    assert all(it.offset % ALIGN == 0 for it in layout.items) and layout.nbytes == 4 * ALIGN
    assert layout.item("q.weight.exp").shape == (5, 1)
    flat = torch.zeros(layout.nbytes, dtype=torch.uint8)
    views = layout.views(flat)
    for local, t in w.items():
        for name, stored in TOY.encode(local, t, torch.float32).items():
            views[name].copy_(stored)
    mw = TOY.weights(layout.views(flat))
    assert torch.equal(TOY.decode(mw, "q.weight"), w["q.weight"])
    assert torch.equal(mw["attn_norm.weight"], w["attn_norm.weight"])
    x = torch.randn(3, 8)
    assert torch.equal(mw.linear(x, "q"), F.linear(x, w["q.weight"], w["q.bias"]))
    assert get_format(TOY.name) is TOY


def logical(w, local):
    """A logical tensor of a module's weights, decoded where the toy format encoded it."""
    return TOY.decode(w, local) if f"{local}.exp" in w else w[local]


def test_the_store_packs_and_reads_a_toy_format_as_the_planner_sizes_it(model):
    ckpt = open_checkpoint(model)
    dense = WeightStore(CheckpointSource(ckpt), torch.float32, pin=False)
    toy = WeightStore(CheckpointSource(ckpt), torch.float32, pin=False, fmt=TOY)
    assert toy.format is TOY and toy.keys() == dense.keys()
    assert shape_from_spec(ckpt.spec, torch.float32, TOY).nbytes == {k: toy.nbytes(k) for k in toy.keys()}
    assert all(toy.nbytes(k) > dense.nbytes(k) for k in toy.keys() if k[0] >= 0)  # exponents take room
    on_disk = WeightStore(CheckpointSource(ckpt), torch.float32, pin=False, fmt=TOY,
                          disk={k for k in toy.keys() if k[1] != "embed"})
    for key, parts in toy.modules.items():
        w = toy.host_views(key)
        for part in parts:
            assert torch.equal(logical(w, part.local), dense.host_views(key)[part.local]), (key, part.local)
        if key in on_disk.disk:
            # Linear weights are encoded (read, then converted), the rest read as they are.
            assert all(r.direct == (not TOY.compresses(r.part.local, ckpt.entry(r.canonical).shape))
                       for r in on_disk.disk[key])
            from_disk = on_disk.layouts[key].views(read_module_now(on_disk, key))
            for name, t in toy.layouts[key].views(toy.host[key]).items():
                assert torch.equal(from_disk[name], t), (key, name)


def split_ffn(modules, hot: int, inter: int):
    """The catalogue with layer 0's FFN split by its neurons: rows :hot of gate and up in "ffn.hot",
    the other rows (and all of down, whose rows are the hidden size) in "ffn"."""
    out = dict(modules)
    parts = out.pop((0, "ffn"))
    hot_parts, cold_parts = [], []
    for p in parts:
        if p.local in ("gate.weight", "up.weight"):
            hot_parts.append(Part(p.local, p.canonical, (0, hot)))
            cold_parts.append(Part(p.local, p.canonical, (hot, inter)))
        else:
            cold_parts.append(p)
    out[(0, "ffn.hot")], out[(0, "ffn")] = hot_parts, cold_parts
    return out


@pytest.mark.parametrize("fmt", [DENSE, TOY], ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_parts_that_are_row_slices_are_cut_at_load(tmp_path, fmt, dtype):
    # float32: rows read from the file as they are; float16 (or a format that encodes): converted.
    save_hf_model("llama", tmp_path)
    ckpt = open_checkpoint(tmp_path)
    inter = ckpt.spec.intermediate_size
    modules = split_ffn(modules_of(CheckpointSource(ckpt).tensor_names(), ckpt.spec), 40, inter)
    whole = WeightStore(CheckpointSource(ckpt), dtype, pin=False)
    sources = {"checkpoint": CheckpointSource(ckpt), "synth": SynthSource(ckpt.spec)}
    synth_whole = WeightStore(sources["synth"], dtype, pin=False)
    for kind, source in sources.items():
        ref = whole if kind == "checkpoint" else synth_whole
        stores = [WeightStore(source, dtype, pin=False, fmt=fmt, modules=modules)]
        if kind == "checkpoint":
            stores.append(WeightStore(source, dtype, pin=False, fmt=fmt, modules=modules,
                                      disk={(0, "ffn.hot"), (0, "ffn")}))
        for store in stores:
            assert store.layouts[(0, "ffn.hot")].nbytes == shape_of(fmt, modules[(0, "ffn.hot")], ckpt, dtype)
            full = ref.host_views((0, "ffn"))
            for key, rows in (((0, "ffn.hot"), slice(0, 40)), ((0, "ffn"), slice(40, inter))):
                w = store.host_views(key)
                assert w["gate.weight" if fmt is DENSE else "gate.weight.values"].shape[0] == rows.stop - rows.start
                for local in ("gate.weight", "up.weight"):
                    assert torch.equal(logical(w, local), full[local][rows]), (kind, key, local)
            assert torch.equal(logical(store.host_views((0, "ffn")), "down.weight"), full["down.weight"])
            if store.disk:
                direct = [r.direct for r in store.disk[(0, "ffn.hot")]]
                assert direct == [dtype == torch.float32 and fmt is DENSE] * 2


def shape_of(fmt, parts, ckpt, dtype):
    return fmt.layout([(p.local, p.shape(ckpt.entry(p.canonical).shape)) for p in parts], dtype).nbytes


def test_a_part_outside_its_tensor_is_refused():
    with pytest.raises(ValueError, match="outside"):
        Part("gate.weight", "layers.0.gate.weight", (90, 100)).shape((96, 64))


def test_the_streaming_engine_runs_a_toy_format_with_the_reference_tokens(model):
    from offbatch.engine.api import GenRequest, SamplingParams
    from offbatch.engine.build import engine_for_folder
    from offbatch.engine.reference import ReferenceModel

    expected = ReferenceModel.load(model, dtype="float32").greedy(PROMPTS, NEW)
    eng = engine_for_folder(model, device="cpu", dtype="float32", num_requests=len(PROMPTS), max_len=32,
                            max_resident_bytes=0, weights=TOY.name)
    assert eng.store.format is TOY and eng.plan.weights == TOY.name
    # The planner sized the slots by the format's modules, which are larger than dense ones here.
    dense = engine_for_folder(model, device="cpu", dtype="float32", num_requests=len(PROMPTS), max_len=32,
                              max_resident_bytes=0)
    assert dense.plan.weights == "dense" and eng.plan.memory["weight_slots"] > dense.plan.memory["weight_slots"]
    assert eng.plan.memory["weight_slots"] + eng.plan.memory["resident_weights"] == eng.pf.device_bytes
    before = TOY.decoded
    reqs = [GenRequest(i, p, SamplingParams(max_tokens=NEW, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    outs = {o.key: o.token_ids for o in eng.generate(reqs)}
    assert [outs[i] for i in range(len(PROMPTS))] == expected
    assert TOY.decoded > before
