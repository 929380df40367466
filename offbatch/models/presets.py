"""Named model shapes for `offbatch synth`: tiny per-family defaults and real published shapes.

Each entry is a partial config.json (classic Hugging Face keys); synth.py adds the keys common to a
family (model_type, architectures, token ids, dtype). Real presets copy the published configs'
shapes; token ids are not copied, since a synthetic folder's ids must match its synthetic tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# Tiny shapes for CPU tests; each turns on the features its family's code path must handle.
_TINY_ATTN = dict(
    vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256,
)
TINY: dict[str, dict] = {
    # Llama-3.1-style rope scaling; original_max 64 puts the head_dim-16 frequencies in all three
    # bands (kept, smoothed, divided by factor).
    "llama": dict(
        _TINY_ATTN, intermediate_size=128, rope_theta=10000.0, rms_norm_eps=1e-5,
        rope_scaling=dict(LLAMA3_ROPE, original_max_position_embeddings=64),
    ),
    "mistral": dict(_TINY_ATTN, intermediate_size=128, rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=16),
    "qwen2": dict(_TINY_ATTN, intermediate_size=128, rope_theta=1000000.0, tie_word_embeddings=True),
    # head_dim * heads != hidden_size, as in Qwen3-0.6B.
    "qwen3": dict(_TINY_ATTN, intermediate_size=128, head_dim=32, rope_theta=1000000.0),
    "opt": dict(
        vocab_size=512, hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, word_embed_proj_dim=64,
    ),
    "mixtral": dict(_TINY_ATTN, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6),
    # Layer 1 dense (mlp_only_layers), layers 0 and 2 sparse with a gated shared expert.
    "qwen2_moe": dict(
        _TINY_ATTN, num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
        mlp_only_layers=[1], norm_topk_prob=False, rope_theta=1e6,
    ),
    "qwen3_moe": dict(
        _TINY_ATTN, intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        head_dim=32, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, rope_theta=1e6,
    ),
    "olmoe": dict(
        _TINY_ATTN, num_key_value_heads=4, intermediate_size=64, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=False, rms_norm_eps=1e-5,
    ),
}


@dataclass(frozen=True)
class Preset:
    family: str
    config: dict
    params: float  # published parameter count, for documentation and tests
    dtype: str = "bfloat16"


PRESETS: dict[str, Preset] = {
    "llama-3-8b": Preset("llama", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
        rms_norm_eps=1e-5), 8.03e9),
    "llama-3-70b": Preset("llama", dict(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
        rms_norm_eps=1e-5), 70.55e9),
    "mistral-7b": Preset("mistral", dict(  # v0.1: 4096-token sliding window
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=32768, rope_theta=10000.0, sliding_window=4096,
        rms_norm_eps=1e-5), 7.24e9),
    "mixtral-8x7b": Preset("mixtral", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
        rope_theta=1e6, sliding_window=None, rms_norm_eps=1e-5), 46.70e9),
    "qwen2-7b": Preset("qwen2", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
        sliding_window=131072, use_sliding_window=False, max_window_layers=28), 7.62e9),
    "qwen3-8b": Preset("qwen3", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6),
        8.19e9),
    "qwen3-30b-a3b": Preset("qwen3_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6), 30.53e9),
    "qwen2-57b-a14b": Preset("qwen2_moe", dict(
        vocab_size=151936, hidden_size=3584, intermediate_size=18944, moe_intermediate_size=2560,
        shared_expert_intermediate_size=20480, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        num_experts=64, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False,
        max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6), 57.41e9),
    "qwen1.5-moe-a2.7b": Preset("qwen2_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
        num_experts=60, num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False,
        max_position_embeddings=8192, rope_theta=1e6, rms_norm_eps=1e-6), 14.32e9),
    "olmoe-1b-7b": Preset("olmoe", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
        max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5), 6.92e9),
    "opt-6.7b": Preset("opt", dict(
        vocab_size=50272, hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32,
        max_position_embeddings=2048, word_embed_proj_dim=4096), 6.66e9, dtype="float16"),
    "opt-30b": Preset("opt", dict(
        vocab_size=50272, hidden_size=7168, ffn_dim=28672, num_hidden_layers=48, num_attention_heads=56,
        max_position_embeddings=2048, word_embed_proj_dim=7168), 29.97e9, dtype="float16"),
}
