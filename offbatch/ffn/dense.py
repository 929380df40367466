"""The dense FFN: a layer's one MLP module, over the step's tokens in chunks of the plan's FFN
micro-batch (its activations stay bounded however many tokens a step runs)."""

from __future__ import annotations

import torch

from offbatch.ffn.base import FFNBackend, register_ffn
from offbatch.models import layers as L
from offbatch.models.spec import ModelSpec


def mlp_chunked(h: torch.Tensor, w, spec: ModelSpec, step: int, prefix: str = "") -> torch.Tensor:
    if h.shape[0] <= step:
        return L.mlp(h, w, spec, prefix)
    return torch.cat([L.mlp(h[a : a + step], w, spec, prefix) for a in range(0, h.shape[0], step)])


@register_ffn
class DenseFFN(FFNBackend):
    name = "dense"

    @staticmethod
    def modules(spec: ModelSpec, layer: int) -> list[str]:
        return ["ffn"]

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        w = self.mods.acquire((layer, "ffn"))
        h = L.norm(x, w, "ffn_norm", spec) if spec.pre_norm else x
        y = mlp_chunked(h, w, spec, self.micro_tokens)
        self.mods.release((layer, "ffn"))
        return y
