"""One forward: embed, the layers, the head - the same code for the streaming engine (modules streamed
through the prefetcher, the wave's KV in an attention backend) and the reference model (every module
resident, a KV cache per sequence).

A layer is its attention module, then its FFN backend. The forward never learns where a module's
weights live or how they are stored: it acquires a module, runs it, releases it (`Modules`), and the
attention backend and FFN backends do the rest. The modules a step acquires, in order, are the
backends' declarations (offbatch.ffn.layer_modules), so the prefetcher's schedule follows them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

import torch
import torch.nn.functional as F

from offbatch.ffn import FFNBackend, Modules
from offbatch.models import layers as L
from offbatch.models.catalogue import ModuleKey
from offbatch.models.spec import ModelSpec


class Attention(Protocol):
    """What the forward asks of an attention backend: the attention output [T, nh, d] of a layer's
    q [T, nh, d], k and v [T, nkv, d] (the step's rows, in the order the step object knows), storing
    k and v in its KV."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step) -> torch.Tensor: ...


class LayerModules(Modules, Protocol):
    def norms(self, key: ModuleKey) -> Mapping[str, torch.Tensor]:
        """A module's norm tensors, readable after it was released (post-norm layers need them)."""
        ...


def embed(spec: ModelSpec, g: Mapping[str, torch.Tensor], ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Token ids [T] at positions [T] -> hidden states [T, H], on the embedding's device."""
    x = F.embedding(ids, g["embed"])
    if "project_in" in g:
        x = F.linear(x, g["project_in"])
    if spec.positions == "learned":
        x = x + F.embedding(positions + 2, g["pos_embed"])
    return x


def head(spec: ModelSpec, w: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Hidden states [N, H] -> float32 logits [N, V]."""
    if spec.final_norm:
        x = L.norm(x, w, "final_norm", spec)
    if "project_out" in w:
        x = F.linear(x, w["project_out"])
    return F.linear(x, w["lm_head"]).float()


def prefill_groups(lengths: list[int], num_heads: int, micro_batch: int, score_bytes: int) -> Iterator[list[int]]:
    """Indices of fresh prompts (of these lengths) attended together: calls whose float32 scores stay
    within score_bytes, and at most micro_batch prompts."""
    group: list[int] = []
    tmax = 0
    for j, n in enumerate(lengths):
        t = max(tmax, n)
        if group and (len(group) + 1 > micro_batch or (len(group) + 1) * num_heads * t * t * 4 > score_bytes):
            yield group
            group, t = [], n
        group.append(j)
        tmax = t
    if group:
        yield group


class Forward:
    """The layers of a model over a module source, an attention backend and FFN backends
    ({False: dense layers', True: MoE layers'}, offbatch.ffn.build_ffns)."""

    def __init__(self, spec: ModelSpec, modules: LayerModules, attention: Attention, ffns: dict[bool, FFNBackend],
                 key_scales=None):
        """key_scales: balanced keys for a compressed KV format (attention/key_balance.py), or None."""
        self.spec, self.mods, self.attention, self.ffns = spec, modules, attention, ffns
        self.key_scales = key_scales

    def layers(self, x: torch.Tensor, step, cos, sin) -> torch.Tensor:
        for i in range(self.spec.num_layers):
            x = self.layer(i, x, step, cos, sin)
        return x

    def layer(self, i: int, x: torch.Tensor, step, cos, sin) -> torch.Tensor:
        spec = self.spec
        ffn = self.ffns[spec.is_moe_layer(i)]
        if spec.pre_norm:
            x = x + self.attend(i, x, step, cos, sin)
            return x + ffn.forward(i, x)
        # Post-norm (OPT-350m): normalise after each residual add, with the norms of released modules.
        x = L.norm(x + self.attend(i, x, step, cos, sin), self.mods.norms((i, "attn")), "attn_norm", spec)
        return L.norm(x + ffn.forward(i, x), self.mods.norms((i, "ffn")), "ffn_norm", spec)

    def attend(self, i: int, x: torch.Tensor, step, cos, sin) -> torch.Tensor:
        spec = self.spec
        w = self.mods.acquire((i, "attn"))
        h = L.norm(x, w, "attn_norm", spec) if spec.pre_norm else x
        q, k, v = L.attention_qkv(h, w, spec, cos, sin)
        if self.key_scales is not None:
            q, k = self.key_scales.apply(i, q, k)
        y = L.attention_output(self.attention.attend(i, q, k, v, step), w)
        self.mods.release((i, "attn"))
        return y

    def head(self, x: torch.Tensor) -> torch.Tensor:
        w = self.mods.acquire((-1, "head"))
        logits = head(self.spec, w, x)
        self.mods.release((-1, "head"))
        return logits
