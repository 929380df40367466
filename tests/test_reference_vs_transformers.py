"""The reference forward computes what transformers computes, on folders transformers saved itself."""

import pytest
import torch

from hf_factory import FAMILIES, save_hf_model
from offbatch.engine.reference import ReferenceModel

PROMPTS = [[3, 5, 7, 9, 11, 13, 2], [4, 8, 15, 16, 23, 42, 1, 2, 3, 4, 5, 6], [99]]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = save_hf_model(request.param, path)
    return model, ReferenceModel.load(path, dtype="float32")


@torch.no_grad()
def test_logits_match_single_and_batched(saved):
    hf, ref = saved
    for p in PROMPTS:
        expected = hf(torch.tensor([p])).logits[0]
        got = ref.forward([ref.new_cache()], [p], all_logits=True)
        assert rel(got, expected) < 1e-4
    # Ragged batch: three sequences of different lengths in one call.
    last = ref.forward([ref.new_cache() for _ in PROMPTS], PROMPTS)
    for j, p in enumerate(PROMPTS):
        assert rel(last[j], hf(torch.tensor([p])).logits[0, -1]) < 1e-4


@torch.no_grad()
def test_greedy_with_kv_cache_matches_generate(saved):
    hf, ref = saved
    ours = ref.greedy(PROMPTS, 32)
    for p, got in zip(PROMPTS, ours):
        expected = hf.generate(torch.tensor([p]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert got == expected


@torch.no_grad()
def test_chunked_prefill_equals_whole_prefill(saved):
    _, ref = saved
    p = PROMPTS[1]
    whole = ref.forward([ref.new_cache()], [p], all_logits=True)
    cache = ref.new_cache(capacity=2)  # also exercises cache growth
    parts = [ref.forward([cache], [p[:5]], all_logits=True), ref.forward([cache], [p[5:]], all_logits=True)]
    assert rel(torch.cat(parts), whole) < 1e-5
