"""On the GPU: the streaming engine's greedy tokens equal the reference forward's for every family,
with a cap small enough that most modules stream, and peak reserved memory stays under the cap."""

import pytest
import torch

from hf_factory import FAMILIES, save_hf_model
from offbatch.engine.api import GenRequest, SamplingParams
from offbatch.engine.build import engine_for_folder
from offbatch.engine.reference import ReferenceModel

pytestmark = pytest.mark.gpu

PROMPTS = [[3, 5, 7, 9, 11, 13, 2], [4, 8, 15, 16, 23, 42, 1, 2, 3, 4, 5, 6], [99], list(range(1, 15)), [7, 7, 7]]
NEW = 16


@pytest.fixture(autouse=True)
def exact_fp32():
    # TF32 would make engine and reference round differently; the comparison is of algorithms.
    # (The engine's process-wide cap and the allocator's state are reset around every GPU test by
    # conftest's isolated_gpu_memory.)
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


KV_MODES = [{}, {"attention": "host-kv-gpu"}, {"attention": "host-kv-cpu"}]
CASES = [(f, {}) for f in FAMILIES] + [(f, m) for f in ("llama", "mixtral", "opt") for m in KV_MODES[1:]]


@pytest.mark.parametrize("family,kv_mode", CASES)
def test_gpu_streamed_greedy_equals_reference(family, kv_mode, tmp_path, reserved_before_engine):
    save_hf_model(family, tmp_path)
    ref = ReferenceModel.load(tmp_path, device="cuda", dtype="float32")
    expected = ref.greedy(PROMPTS, NEW)
    del ref
    start = reserved_before_engine()  # 0: the reference's blocks and workspaces given back, peak reset
    weights = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    cap = 64 << 20  # the allocator reserves in 2 MiB segments: a cap of a few MiB would be all rounding
    eng = engine_for_folder(tmp_path, device="cuda", dtype="float32", gpu_memory=cap, num_requests=len(PROMPTS),
                            max_len=40, prefill_tokens=16, attn_micro_batch=2, ffn_micro_tokens=8,
                            max_resident_bytes=0, max_wave=3, plan_overrides=kv_mode)
    reqs = [GenRequest(i, p, SamplingParams(max_tokens=NEW, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    outs = {o.key: o.token_ids for o in eng.generate(reqs)}
    assert [outs[i] for i in range(len(PROMPTS))] == expected
    assert eng.pf.stats.bytes_copied > weights  # modules streamed, more than once
    assert torch.cuda.max_memory_reserved() - start <= cap  # what this engine reserved, at its peak


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_gpu_bf16_streamed_matches_reference_logits(family, tmp_path):
    save_hf_model(family, tmp_path)
    ref = ReferenceModel.load(tmp_path, device="cuda", dtype="bfloat16")
    caches = [ref.new_cache() for _ in PROMPTS]
    expected = ref.forward(caches, PROMPTS)
    eng = engine_for_folder(tmp_path, device="cuda", dtype="bfloat16", gpu_memory=64 << 20, num_requests=len(PROMPTS),
                            max_len=40, prefill_tokens=64, max_resident_bytes=0)
    seqs = []
    from offbatch.engine.streaming import LiveSeq
    for i, p in enumerate(PROMPTS):
        seqs.append(LiveSeq(GenRequest(i, p, SamplingParams()), None, slot=eng.kv.allocate()))
    got = eng.step([], [(s, len(s.req.prompt_ids)) for s in seqs])
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 2e-2
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_gpu_weights_on_disk_give_the_reference_tokens(family, tmp_path):
    """The disk tier on the GPU: every layer module read from the checkpoint at each use into pinned
    staging buffers, copied from there on the copy stream; the reader reuses a buffer only after its
    copy's event."""
    save_hf_model(family, tmp_path)
    ref = ReferenceModel.load(tmp_path, device="cuda", dtype="float32")
    expected = ref.greedy(PROMPTS, NEW)
    del ref
    options = dict(device="cuda", dtype="float32", gpu_memory=64 << 20, num_requests=len(PROMPTS), max_len=40,
                   prefill_tokens=16, attn_micro_batch=2, ffn_micro_tokens=8, max_resident_bytes=0, max_wave=3)
    probe = engine_for_folder(tmp_path, **options)
    disk = {k for k in probe.store.keys() if k[1] != "embed"}
    del probe
    for staging in (1, 2):
        eng = engine_for_folder(tmp_path, plan_overrides=dict(disk=disk, staging_buffers=staging), **options)
        reqs = [GenRequest(i, p, SamplingParams(max_tokens=NEW, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
        outs = {o.key: o.token_ids for o in eng.generate(reqs)}
        assert [outs[i] for i in range(len(PROMPTS))] == expected, staging
        assert eng.pf.reader.bytes_read > 0 and all(b.is_pinned() for b in eng.pf.reader.buffers)
        eng.pf.close()


def test_gpu_cap_above_the_card_is_refused(tmp_path):
    """A cap above the GPU's memory is one clear BudgetError, planned or pinned (it used to be clamped
    silently by the allocator's fraction, or planned as if the memory were there)."""
    from offbatch.errors import BudgetError

    save_hf_model("llama", tmp_path)
    too_much = torch.cuda.get_device_properties(0).total_memory + (1 << 30)
    options = dict(device="cuda", dtype="float32", num_requests=len(PROMPTS), max_len=40)
    with pytest.raises(BudgetError, match="is more than this machine's"):
        engine_for_folder(tmp_path, gpu_memory=too_much, **options)
    plan = engine_for_folder(tmp_path, gpu_memory=64 << 20, **options).plan
    with pytest.raises(BudgetError, match="is more than this GPU's"):
        engine_for_folder(tmp_path, gpu_memory=too_much, plan=plan, device="cuda", dtype="float32")
