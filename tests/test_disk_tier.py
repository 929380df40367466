"""The disk tier: modules left in the checkpoint are read at each use into pinned staging buffers and
streamed like the others. Bytes read equal the packed host bytes (direct reads and dtype-converting
reads), the prefetcher keeps its order with disk modules in it, the engine's tokens do not change, the
planner puts weights on disk only when host memory is short and prices the reads, and a file that
changes under a run is a clear error."""

import json
import os

import pytest
import torch

from hf_factory import save_hf_model
from offbatch.engine.api import GenRequest, SamplingParams
from offbatch.engine.build import engine_for_folder
from offbatch.errors import OffbatchError
from offbatch.formats import DENSE
from offbatch.models.loader import open_checkpoint
from offbatch.engine.reference import ReferenceModel
from offbatch.models.spec import spec_from_config
from offbatch.tools.synth import synth_config
from offbatch.offload.disk import read_module_now
from offbatch.offload.prefetch import Prefetcher
from offbatch.offload.weights import CheckpointSource, WeightStore
from offbatch.plan import Plan
from offbatch.planner.solve import make_plan, predict
from offbatch.planner.shape import shape_from_spec
from offbatch.planner.hardware import PROFILES
from offbatch.planner.workload import Workload

GiB = 1 << 30
PROMPTS = [[3, 5, 7, 9, 11, 13, 2], [4, 8, 15, 16, 23, 42, 1, 2, 3, 4, 5, 6], [99], list(range(1, 15)), [7, 7, 7]]
NEW = 10


@pytest.fixture(scope="module", params=["llama", "mixtral", "qwen2_moe", "opt"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    save_hf_model(request.param, path)
    return path


def layer_modules(store):
    return {k for k in store.keys() if k[1] != "embed"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_disk_reads_equal_the_packed_host_bytes(model, dtype):
    # float32 is the checkpoint's dtype (positioned reads of the raw bytes); float16 converts.
    ckpt = open_checkpoint(model)
    pinned = WeightStore(CheckpointSource(ckpt), dtype, pin=False)
    on_disk = WeightStore(CheckpointSource(ckpt), dtype, pin=False, disk=layer_modules(pinned))
    assert set(on_disk.disk) == layer_modules(pinned) and set(on_disk.host) == {(-1, "embed")}
    assert all(r.direct == (dtype == torch.float32) for reads in on_disk.disk.values() for r in reads)
    for key in on_disk.disk:
        got = read_module_now(on_disk, key)
        want = pinned.host[key]
        # Alignment padding between tensors is not written by either: compare the tensors themselves.
        for name, t in pinned.layouts[key].views(want).items():
            assert torch.equal(on_disk.layouts[key].views(got)[name], t), (key, name)


def test_loading_reads_modules_in_parallel_to_the_same_bytes(model, monkeypatch):
    """The host tier's load reads several modules at once (buffered, not O_DIRECT): the packed bytes equal a
    one-thread load's, in the checkpoint's dtype (raw reads) and converted; the load's times are kept."""
    import offbatch.offload.weights as weights

    ckpt = open_checkpoint(model)
    for dtype in (torch.float32, torch.bfloat16):
        parallel = WeightStore(CheckpointSource(ckpt), dtype, pin=False)
        monkeypatch.setattr(weights, "LOAD_THREADS", 1)
        serial = WeightStore(CheckpointSource(ckpt), dtype, pin=False)
        monkeypatch.undo()
        for key, flat in serial.host.items():
            for name, t in serial.layouts[key].views(flat).items():
                assert torch.equal(parallel.layouts[key].views(parallel.host[key])[name], t), (key, name)
        st = parallel.load_stats
        assert st["bytes"] == sum(f.numel() for f in parallel.host.values()) and st["total_s"] >= st["read_s"] >= 0


def test_the_load_line_says_where_the_start_up_went(tmp_path):
    """`run` with the streaming engine: the load event carries the engine's start-up (host buffers, reading,
    resident weights, KV) and the message says it in words."""
    from typer.testing import CliRunner

    from jobs_support import synth_llama
    from offbatch.cli.main import app

    model = synth_llama(tmp_path / "m")
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"id": 1, "prompt": "hello there", "max_tokens": 3}\n')
    r = CliRunner().invoke(app, ["run", str(model), str(prompts), "-o", str(tmp_path / "o.jsonl"), "--engine",
                                 "streaming", "--device", "cpu", "--log-format", "json"])
    assert r.exit_code == 0, r.output
    events = [json.loads(line) for line in r.output.splitlines() if line.startswith("{")]
    [loaded] = [e for e in events if e.get("message", "").startswith("model loaded")]
    st = loaded["startup"]
    assert set(st) >= {"alloc_s", "read_s", "total_s", "bytes", "resident_s", "kv_s"} and st["bytes"] > 0
    assert st["total_s"] >= st["read_s"] >= 0 and "allocating host buffers" in loaded["message"]


def test_a_truncated_file_at_load_is_a_clear_error(tmp_path):
    path = tmp_path / "m"
    save_hf_model("llama", path)
    weights = next(p for p in path.iterdir() if p.suffix == ".safetensors")
    ckpt = open_checkpoint(path)
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(OffbatchError, match="ended while reading"):
        WeightStore(CheckpointSource(ckpt), torch.float32, pin=False)


def run(path, dtype="float32", **options):
    eng = engine_for_folder(path, device="cpu", dtype=dtype, num_requests=len(PROMPTS), max_len=32, **options)
    reqs = [GenRequest(i, p, SamplingParams(max_tokens=NEW, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    outs = {o.key: o.token_ids for o in eng.generate(reqs)}
    return eng, [outs[i] for i in range(len(PROMPTS))]


def test_engine_with_weights_on_disk_gives_the_reference_tokens(model):
    expected = ReferenceModel.load(model, dtype="float32").greedy(PROMPTS, NEW)
    probe, _ = run(model, max_resident_bytes=0, max_wave=2)
    disk = layer_modules(probe.store)
    # Every module read from disk at each use, through one staging buffer (the tightest ring), while
    # sequences wait for KV slots: the order of reads, copies and releases must hold.
    eng, got = run(model, max_resident_bytes=0, max_wave=2, plan_overrides=dict(disk=disk, staging_buffers=1))
    assert got == expected
    reader = eng.pf.reader
    assert reader is not None and reader.bytes_read > 0
    streamed = {k for k in disk if k not in eng.plan.resident}
    assert eng.pf.disk == streamed
    # Each step reads its streamed disk modules once (unused experts are cancelled, never read twice).
    per_step = sum(eng.store.nbytes(k) for k in streamed)
    steps = len(eng.step_kinds)
    assert reader.bytes_read <= steps * per_step
    assert not reader.ready and not reader.pending and len(reader.free) == len(reader.buffers)


def test_disk_tier_in_another_dtype_gives_the_same_tokens_as_pinned(model):
    _, pinned = run(model, dtype="float16", max_resident_bytes=0)
    probe, _ = run(model, dtype="float16", max_resident_bytes=0)
    disk = {k for k in layer_modules(probe.store) if k[0] % 2 == 0}  # some on disk, some pinned, some resident
    _, got = run(model, dtype="float16", max_resident_bytes=0, plan_overrides=dict(disk=disk, staging_buffers=2))
    assert got == pinned


class ExpertStore:
    """Modules (0, 'expert.e') of 4 floats each, value e, every one on disk through a real file."""

    format = DENSE

    def __init__(self, tmp_path, experts=6):
        from safetensors.torch import save_file

        from offbatch.offload.disk import TensorRead

        tensors = {f"e{e}": torch.full((4,), float(e)) for e in range(experts)}
        path = tmp_path / "experts.safetensors"
        save_file(tensors, str(path))
        from offbatch.models.loader import read_safetensors_header

        header, data_start = read_safetensors_header(path)
        self.layouts, self.host, self.disk = {}, {}, {}
        for e in range(experts):
            key = (0, f"expert.{e}")
            self.layouts[key] = DENSE.layout([("w", (4,))], torch.float32)
            begin, _ = header[f"e{e}"]["data_offsets"]
            self.disk[key] = [TensorRead(f"e{e}", str(path), data_start + begin, 16, 0, True)]

    def keys(self):
        return list(self.layouts)

    def nbytes(self, key):
        return self.layouts[key].nbytes


def test_prefetcher_cancels_unrouted_disk_modules_and_keeps_order(tmp_path):
    store = ExpertStore(tmp_path)
    pf = Prefetcher(store, "cpu", {"expert": 2}, resident=set(), staging=2)
    keys = [(0, f"expert.{e}") for e in range(6)]
    for _ in range(3):
        pf.schedule(keys)
        pf.unschedule({keys[1], keys[4]})  # no token routed to these
        for k in keys:
            if k in (keys[1], keys[4]):
                continue
            assert pf.acquire(k)["w"][0].item() == int(k[1].split(".")[1])
            pf.release(k)
    r = pf.reader
    assert not r.ready and not r.pending and len(r.free) == 2
    assert r.bytes_read <= 3 * 6 * store.nbytes(keys[0])
    pf.close()


def test_a_file_changed_under_the_run_is_a_clear_error(tmp_path):
    path = tmp_path / "m"
    save_hf_model("llama", path)
    probe, _ = run(path, max_resident_bytes=0)
    eng = engine_for_folder(path, device="cpu", dtype="float32", num_requests=len(PROMPTS), max_len=32,
                            max_resident_bytes=0, plan_overrides=dict(disk=layer_modules(probe.store)))
    weights = next(p for p in path.iterdir() if p.suffix == ".safetensors")
    os.truncate(weights, 4096)
    reqs = [GenRequest(i, p, SamplingParams(max_tokens=NEW, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    with pytest.raises(OffbatchError, match="reading weights from disk failed.*ended while reading"):
        list(eng.generate(reqs))


def test_synthetic_weights_cannot_use_the_disk_tier():
    from offbatch.offload.weights import SynthSource

    spec = spec_from_config(synth_config("llama-3-8b", layers=1, hidden_size=64, intermediate_size=128,
                                         vocab_size=512, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(OffbatchError, match="disk tier reads modules from a model folder"):
        WeightStore(SynthSource(spec), torch.float32, pin=False, disk={(0, "attn")})


# ---- the planner's side ---------------------------------------------------------------------------------
def spec_of(preset, layers=None):
    return spec_from_config(synth_config(preset, layers=layers))


@pytest.mark.parametrize("preset,layers", [("mixtral-8x7b", 8), ("llama-3-8b", None)])
def test_planner_uses_disk_only_when_host_memory_is_short_and_prices_it(preset, layers):
    spec = spec_of(preset, layers)
    shape = shape_from_spec(spec, torch.bfloat16)
    wl = Workload.uniform(1024, 256, 64)
    roomy = make_plan(spec, torch.bfloat16, "cuda", 8 * GiB, wl, hardware="h200", cpu_memory=120 * GiB)
    assert not roomy.disk and roomy.host_memory.get("staging", 0) == 0
    prev = roomy.predicted["e2e_tok_s"]
    for host in (48, 32, 24, 16, 12, 8):
        plan = make_plan(spec, torch.bfloat16, "cuda", 8 * GiB, wl, hardware="h200", cpu_memory=host * GiB)
        assert sum(plan.host_memory.values()) <= host * GiB, host
        assert plan.predicted["e2e_tok_s"] <= prev * (1 + 1e-9), host  # less host memory is never faster
        prev = plan.predicted["e2e_tok_s"]
        # What the solver priced is what the plan holds: re-pricing the plan from its modules agrees.
        again = predict(plan, shape, PROFILES["h200"], wl)
        assert again["e2e_tok_s"] == pytest.approx(plan.predicted["e2e_tok_s"], rel=0.02), host
        assert not any(k[1] == "embed" for k in plan.disk)
        if plan.disk - plan.resident:  # streamed modules on disk: reads are priced, staging held
            assert plan.host_memory["staging"] > 0 and plan.predicted["decode_step"]["disk_s"] > 0
    tight = make_plan(spec, torch.bfloat16, "cuda", 8 * GiB, wl, hardware="h200", cpu_memory=8 * GiB)
    assert tight.disk - tight.resident
    assert tight.predicted["bottleneck_kind"] == "disk" and "disk" in tight.predicted["bottleneck"]
    assert tight.predicted["e2e_tok_s"] < roomy.predicted["e2e_tok_s"] / 5


def test_resident_modules_go_to_disk_first():
    spec = spec_of("llama-3-8b")
    wl = Workload.uniform(1024, 256, 64)
    # 24 GiB of GPU: much is resident; a host budget just under all-pinned moves resident modules only.
    full = make_plan(spec, torch.bfloat16, "cuda", 24 * GiB, wl, hardware="h200", cpu_memory=120 * GiB,
                     attention="device-kv")
    need = sum(full.host_memory.values())
    plan = make_plan(spec, torch.bfloat16, "cuda", 24 * GiB, wl, hardware="h200", cpu_memory=need - 2 * GiB,
                     attention="device-kv", wave_size=full.wave_size)
    assert plan.disk and plan.disk <= plan.resident
    assert plan.predicted["decode_step"]["disk_s"] == 0
    assert plan.predicted["e2e_tok_s"] == pytest.approx(full.predicted["e2e_tok_s"], rel=1e-6)


def test_plan_files_keep_the_disk_tier(tmp_path):
    spec = spec_of("mixtral-8x7b", 8)
    plan = make_plan(spec, torch.bfloat16, "cuda", 8 * GiB, Workload.uniform(256, 256, 64), hardware="h200",
                     cpu_memory=12 * GiB)
    assert plan.disk
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.disk == plan.disk and again.staging_buffers == plan.staging_buffers


# ---- pinned packing ----------------------------------------------------------------------------------------
def test_pinned_chunks_are_powers_of_two_hold_every_module_once_and_waste_little():
    from offbatch.offload.weights import pack_pinned

    mixtral_layer = [84 << 20] + [352 << 20] * 8 + [1 << 16]  # attention, eight experts, router
    for sizes in ([352 << 20] * 64, mixtral_layer * 8, [5, 700, 3, 1 << 20, 9 << 20], [1 << 33, 17]):
        chunks, place = pack_pinned(sizes)
        assert all(c & (c - 1) == 0 for c in chunks)
        spans = {}
        for n, (c, off) in zip(sizes, place):
            assert off + n <= chunks[c]
            spans.setdefault(c, []).append((off, off + n))
        for c, s in spans.items():
            s.sort()
            assert all(a[1] <= b[0] for a, b in zip(s, s[1:]))  # no overlap
        if sum(sizes) > 1 << 30:
            # One module per power-of-two allocation would take up to 2x; packed, a few percent.
            assert sum(chunks) <= 1.1 * sum(sizes), sum(chunks) / sum(sizes)


def test_planner_counts_host_weights_as_the_store_packs_them(tmp_path):
    from offbatch.offload.weights import pinned_bytes
    from offbatch.planner.memory import host_weight_bytes
    from offbatch.planner.shape import shape_from_store

    save_hf_model("mixtral", tmp_path)
    store = WeightStore(CheckpointSource(open_checkpoint(tmp_path)), torch.float32, pin=False)
    shape = shape_from_store(store)
    keys = sorted(k for k in store.keys() if k[1] != "embed")
    embed = store.nbytes((-1, "embed"))
    assert host_weight_bytes(shape, pinned=True) == embed + pinned_bytes([store.nbytes(k) for k in keys])
    assert host_weight_bytes(shape, pinned=False) == store.host_bytes()
