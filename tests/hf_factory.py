"""Tiny random models built and saved by transformers itself: proof that we read real folders."""

import torch

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)

# Per family: the config features that family's code path must handle.
FAMILY_EXTRAS = {
    "llama": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(sliding_window=5),
    "qwen2": {},
    "qwen3": dict(head_dim=32),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[1]),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16, norm_topk_prob=True),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "opt": dict(ffn_dim=96, word_embed_proj_dim=32),
}
FAMILIES = list(FAMILY_EXTRAS)


def build_hf_model(family: str, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(TINY, **FAMILY_EXTRAS[family], **overrides)
    if family == "opt":
        kw.pop("intermediate_size")
        kw.pop("num_key_value_heads")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kw)).eval()
    # Default init (std 0.02) makes every logit nearly equal; spread them so greedy is decisive.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 1.0 if "embed" in name else 0.5 / p.shape[-1] ** 0.5)
            else:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model


def save_hf_model(family: str, path, seed: int = 0, **overrides):
    model = build_hf_model(family, seed, **overrides)
    model.save_pretrained(path)
    return model
