"""Reference forward in plain torch: the correctness oracle for every engine, and the CPU path.

All weights are held on one device in one dtype, as the modules the engine streams; the forward is the
engine's (engine/forward.py) with every module resident and a KV cache per sequence. Sequences are
ragged: a call takes, for each sequence, its KV cache and its new tokens (a whole prompt, a chunk of
it, or one decode token), runs them flattened through the model, and returns logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

from offbatch.engine.forward import Attention, Forward, embed
from offbatch.ffn import LoopMoE, build_ffns
from offbatch.formats import ModuleWeights, WeightFormat, get_format
from offbatch.models import layers as L
from offbatch.models.catalogue import ModuleKey, Part, modules_of
from offbatch.models.dtypes import resolve_dtype
from offbatch.models.loader import Checkpoint, check_finite, check_format, open_checkpoint
from offbatch.models.spec import ModelSpec

UNCHUNKED = 1 << 62  # FFN rows per call: all of them

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


class ResidentModules:
    """Every module of the model held on the device: acquire hands it out, release and skip are nothing."""

    def __init__(self, modules: dict[ModuleKey, ModuleWeights]):
        self.modules = modules

    def acquire(self, key: ModuleKey) -> ModuleWeights:
        return self.modules[key]

    def release(self, key: ModuleKey) -> None:
        pass

    def skip(self, keys) -> None:
        pass

    def norms(self, key: ModuleKey) -> ModuleWeights:
        return self.modules[key]


class CacheAttention:
    """Attention over a KV cache per sequence; a step is (caches, new tokens per sequence), the rows of
    each sequence consecutive. Ragged: any number of new tokens after any cache."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step) -> torch.Tensor:
        caches, lens = step
        outs, start = [], 0
        for cache, n in zip(caches, lens):
            kk, vv = cache.extend(layer, k[start : start + n], v[start : start + n])
            outs.append(L.causal_attention(q[start : start + n], kk, vv, cache.length, self.spec.sliding_window))
            start += n
        return torch.cat(outs)


class ReferenceModel:
    def __init__(self, spec: ModelSpec, modules: dict[ModuleKey, ModuleWeights], device, dtype,
                 attention: Attention | None = None):
        """modules: every module of the model (catalogue.modules_of), its tensors on `device`.
        attention: what attends over the caches (default: the exact CacheAttention; eval-ppl --kv/--hgca
        passes attention/lossy_reference.py's LossyCacheAttention). The modules may be another model's:
        they are only read."""
        self.spec = spec
        self.modules = modules
        self.device = torch.device(device)
        self.dtype = dtype
        self.inv_freq = L.rope_inv_freq(spec) if spec.positions == "rope" else None
        resident = ResidentModules(modules)
        # The engine's forward with every module resident, one FFN call over all tokens, experts one by one.
        self.attention = attention if attention is not None else CacheAttention(spec)
        self.fwd = Forward(spec, resident, self.attention, build_ffns(spec, resident, UNCHUNKED, LoopMoE.name))

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, device="cpu", dtype=None,
                        weights: str | WeightFormat | None = None, expand: bool = False,
                        attention: Attention | None = None) -> "ReferenceModel":
        """weights: the format the modules are stored in (a name or a format; default: the folder's own),
        encoded as the weight store encodes them, so the engine over a format can be checked against
        the reference over it. A folder in a format, read in it, is used as it is stored.
        expand: decode the format's weights once here into the compute dtype (the twin's own arithmetic,
        so the same products) instead of at every use: on the CPU, where nothing streams, 3x faster.
        attention: as in the constructor (default: exact)."""
        spec = ckpt.spec
        dtype = resolve_dtype(dtype, ckpt.dtype())
        fmt = ckpt.format if weights is None else get_format(weights) if isinstance(weights, str) else weights
        check_format(ckpt, fmt)
        as_stored = ckpt.format.name == fmt.name

        def load(part: Part) -> dict[str, torch.Tensor]:
            # Every tensor is read here anyway: refusing NaN/inf weights costs one more pass.
            if as_stored and ckpt.entry(part.canonical).stored:
                held = {part.local + sfx: check_finite(ckpt, part.canonical, t)
                        for sfx, t in ckpt.get_stored(part.canonical).items()}
                return {n: (t if part.rows is None else t[part.rows[0] : part.rows[1]]).to(device) for n, t in held.items()}
            t = check_finite(ckpt, part.canonical, ckpt.get(part.canonical))
            if part.rows is not None:
                t = t[part.rows[0] : part.rows[1]]
            if fmt.unchanged(part.local, tuple(t.shape), dtype):
                return {part.local: t.to(device=device, dtype=dtype)}
            return {name: s.to(device) for name, s in fmt.encode(part.local, t, dtype).items()}

        def expanded(part: Part) -> dict[str, torch.Tensor]:
            held = load(part)
            if part.local in held:  # stored as it is
                return held
            return {part.local: fmt.dequantize(held, part.local, dtype, ckpt.entry(part.canonical).shape[-1])}

        names = list(ckpt.entries) + (["lm_head"] if ckpt.has("lm_head") and "lm_head" not in ckpt.entries else [])
        read, kept = (expanded, get_format("dense")) if expand and fmt.expands else (load, fmt)
        modules = {key: kept.weights({k: v for p in parts for k, v in read(p).items()})
                   for key, parts in modules_of(names, spec).items()}
        return cls(spec, modules, device, dtype, attention)

    @classmethod
    def load(cls, model_dir: str | Path, device="cpu", dtype=None,
             weights: str | WeightFormat | None = None, expand: bool = False,
             attention: Attention | None = None) -> "ReferenceModel":
        return cls.from_checkpoint(open_checkpoint(model_dir), device, dtype, weights, expand, attention)

    def new_cache(self, capacity: int = 16) -> KVCache:
        return KVCache(self.spec, self.device, self.dtype, capacity)

    # ---- forward ---------------------------------------------------------
    @torch.inference_mode()
    def forward(self, caches: list[KVCache], tokens: list[list[int]], all_logits: bool = False) -> torch.Tensor:
        """Run each sequence's new tokens after its cache. Returns float32 logits: of each sequence's
        last new token ([B, V]), or of every new token ([sum of lengths, V]) with all_logits."""
        lens = [len(t) for t in tokens]
        if any(n == 0 for n in lens):
            raise ValueError("every sequence needs at least one new token")
        ids = torch.tensor([t for seq in tokens for t in seq], device=self.device, dtype=torch.long)
        positions = torch.cat([torch.arange(c.length, c.length + n) for c, n in zip(caches, lens)]).to(self.device)
        x = embed(self.spec, self.modules[(-1, "embed")], ids, positions)
        cos = sin = None
        if self.inv_freq is not None:
            cos, sin = L.rope_cos_sin(self.inv_freq, positions, self.dtype)
        x = self.fwd.layers(x, (caches, lens), cos, sin)
        for c, n in zip(caches, lens):
            c.advance(n)
        if not all_logits:
            x = x[torch.tensor(lens, device=self.device).cumsum(0) - 1]
        return self.fwd.head(x)

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
