"""Every family written by `offbatch synth` (single file and sharded) loads in transformers and in
offbatch, with fp32 logits equal to 1e-4 and 32 identical greedy tokens from the KV cache."""

import pytest
import torch

# Optional: a machine without transformers (the GPU image may lack it) skips this file at collection.
AutoModelForCausalLM = pytest.importorskip("transformers").AutoModelForCausalLM

from offbatch.engine.reference import ReferenceModel
from offbatch.models.spec import SUPPORTED_FAMILIES
from offbatch.tools.synth import synth_model
from offbatch.models.tokenizer import load_tokenizer

TEXTS = ["the capital of france is", "one two three four five six seven", "a"]


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_synth_family_matches_transformers(family, sharded, tmp_path):
    synth_model(family, tmp_path, seed=1, shard_size=100_000 if sharded else 2_000_000_000)
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    tok = load_tokenizer(tmp_path)
    prompts = [tok.encode(t) for t in TEXTS]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # compare 32 free-running tokens; no eos stop or suppression
    ours = ReferenceModel.load(tmp_path, dtype="float32")
    with torch.no_grad():
        for p in prompts:
            expected = hf(torch.tensor([p])).logits[0]
            got = ours.forward([ours.new_cache()], [p], all_logits=True)
            assert ((got - expected).norm() / expected.norm()).item() < 1e-4
        greedy = ours.greedy(prompts, 32)
        for p, g in zip(prompts, greedy):
            ids = torch.tensor([p])  # explicit mask: synth's bos is id 0, which generate would take for padding
            expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                                   pad_token_id=3)[0, len(p):].tolist()
            assert len(expected) == 32
            assert g == expected


@pytest.mark.parametrize("overrides", [{"post_norm": True}, {"embed_proj_dim": 16}])
def test_opt_variants_match_transformers(overrides, tmp_path):
    synth_model("opt", tmp_path, seed=2, **overrides)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = ReferenceModel.load(tmp_path, dtype="float32")
    p = [5, 9, 13, 2, 7, 11]
    with torch.no_grad():
        expected = hf(torch.tensor([p])).logits[0]
    got = ours.forward([ours.new_cache()], [p], all_logits=True)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4
