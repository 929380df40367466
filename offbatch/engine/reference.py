"""Reference forward in plain torch: the correctness oracle for every engine, and the CPU path.

All weights are held on one device in one dtype. Sequences are ragged: a call takes, for each
sequence, its KV cache and its new tokens (a whole prompt, a chunk of it, or one decode token),
runs them flattened through the model, and returns logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from offbatch.models import layers as L
from offbatch.models.loader import Checkpoint, check_finite, open_checkpoint
from offbatch.models.spec import ModelSpec

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use bfloat16, float16 or float32")
    return DTYPES[dtype]


class KVCache:
    """One sequence's keys and values for every layer, grown by doubling."""

    def __init__(self, spec: ModelSpec, device, dtype, capacity: int = 16):
        self.spec, self.device, self.dtype = spec, device, dtype
        self.length = 0
        shape = (spec.num_layers, max(capacity, 1), spec.num_kv_heads, spec.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)

    def _reserve(self, n: int):
        cap = self.k.shape[1]
        if n <= cap:
            return
        new = max(n, 2 * cap)
        for name in ("k", "v"):
            old = getattr(self, name)
            buf = torch.empty((old.shape[0], new, *old.shape[2:]), device=self.device, dtype=self.dtype)
            buf[:, : self.length] = old[:, : self.length]
            setattr(self, name, buf)

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this step's k/v ([t, nkv, d]) after the cached ones; return all keys and values so far."""
        end = self.length + k.shape[0]
        self._reserve(end)
        self.k[layer, self.length : end] = k
        self.v[layer, self.length : end] = v
        return self.k[layer, :end], self.v[layer, :end]

    def advance(self, n: int):
        self.length += n


class ReferenceModel:
    def __init__(self, spec: ModelSpec, globals_: dict[str, torch.Tensor], layer_weights: list[dict], device, dtype):
        self.spec = spec
        self.g = globals_
        self.layers = layer_weights
        self.device = torch.device(device)
        self.dtype = dtype
        self.inv_freq = L.rope_inv_freq(spec) if spec.positions == "rope" else None

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, device="cpu", dtype=None) -> "ReferenceModel":
        spec = ckpt.spec
        dtype = resolve_dtype(dtype, ckpt.dtype())

        def load(name):  # every tensor is read here anyway: refusing NaN/inf weights costs one more pass
            return check_finite(ckpt, name, ckpt.get(name)).to(device=device, dtype=dtype)

        globals_ = {c: load(c) for c in ("embed", "pos_embed", "project_in", "project_out",
                                         "final_norm.weight", "final_norm.bias", "lm_head") if ckpt.has(c)}
        layer_weights = []
        for i in range(spec.num_layers):
            prefix = f"layers.{i}."
            layer_weights.append({c[len(prefix):]: load(c) for c in ckpt.entries if c.startswith(prefix)})
        return cls(spec, globals_, layer_weights, device, dtype)

    @classmethod
    def load(cls, model_dir: str | Path, device="cpu", dtype=None) -> "ReferenceModel":
        return cls.from_checkpoint(open_checkpoint(model_dir), device, dtype)

    def new_cache(self, capacity: int = 16) -> KVCache:
        return KVCache(self.spec, self.device, self.dtype, capacity)

    # ---- forward ---------------------------------------------------------
    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.g["embed"])
        if "project_in" in self.g:
            x = F.linear(x, self.g["project_in"])
        if self.spec.positions == "learned":
            x = x + F.embedding(positions + 2, self.g["pos_embed"])
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.final_norm:
            x = L.norm(x, self.g, "final_norm", spec)
        if "project_out" in self.g:
            x = F.linear(x, self.g["project_out"])
        return F.linear(x, self.g["lm_head"]).float()

    def attention(self, i: int, x: torch.Tensor, caches, lens, cos, sin) -> torch.Tensor:
        spec, w = self.spec, self.layers[i]
        q, k, v = L.attention_qkv(x, w, spec, cos, sin)
        outs, start = [], 0
        for cache, n in zip(caches, lens):
            kk, vv = cache.extend(i, k[start : start + n], v[start : start + n])
            outs.append(L.causal_attention(q[start : start + n], kk, vv, cache.length, spec.sliding_window))
            start += n
        return L.attention_output(torch.cat(outs), w)

    def layer(self, i: int, x: torch.Tensor, caches, lens, cos, sin) -> torch.Tensor:
        spec, w = self.spec, self.layers[i]
        if spec.pre_norm:
            x = x + self.attention(i, L.norm(x, w, "attn_norm", spec), caches, lens, cos, sin)
            return x + L.ffn(L.norm(x, w, "ffn_norm", spec), w, spec, i)
        # Post-norm (OPT-350m): normalise after each residual add.
        x = L.norm(x + self.attention(i, x, caches, lens, cos, sin), w, "attn_norm", spec)
        return L.norm(x + L.ffn(x, w, spec, i), w, "ffn_norm", spec)

    @torch.inference_mode()
    def forward(self, caches: list[KVCache], tokens: list[list[int]], all_logits: bool = False) -> torch.Tensor:
        """Run each sequence's new tokens after its cache. Returns float32 logits: of each sequence's
        last new token ([B, V]), or of every new token ([sum of lengths, V]) with all_logits."""
        lens = [len(t) for t in tokens]
        if any(n == 0 for n in lens):
            raise ValueError("every sequence needs at least one new token")
        ids = torch.tensor([t for seq in tokens for t in seq], device=self.device, dtype=torch.long)
        positions = torch.cat([torch.arange(c.length, c.length + n) for c, n in zip(caches, lens)]).to(self.device)
        x = self.embed(ids, positions)
        cos = sin = None
        if self.inv_freq is not None:
            cos, sin = L.rope_cos_sin(self.inv_freq, positions, self.dtype)
        for i in range(self.spec.num_layers):
            x = self.layer(i, x, caches, lens, cos, sin)
        for c, n in zip(caches, lens):
            c.advance(n)
        if not all_logits:
            x = x[torch.tensor(lens, device=self.device).cumsum(0) - 1]
        return self.head(x)

    @torch.inference_mode()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt for exactly max_new_tokens (no eos stop): a test oracle."""
        caches = [self.new_cache(len(p) + max_new_tokens) for p in prompts]
        logits = self.forward(caches, prompts)
        out = [[] for _ in prompts]
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1).tolist()
            for o, t in zip(out, nxt):
                o.append(t)
            if step + 1 < max_new_tokens:
                logits = self.forward(caches, [[t] for t in nxt])
        return out
