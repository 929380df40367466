"""MoE experts one at a time: each expert that got tokens runs the plain MLP over its rows (in chunks
of the FFN micro-batch). The fallback for experts the grouped kernels do not take, and a baseline."""

from __future__ import annotations

import torch

from offbatch.ffn.base import register_ffn
from offbatch.ffn.dense import mlp_chunked
from offbatch.ffn.moe import MoEBackend


@register_ffn
class LoopMoE(MoEBackend):
    name = "moe-loop"

    def experts(self, layer: int, h: torch.Tensor, order: torch.Tensor, counts: list[int], flat_w: torch.Tensor,
                out: torch.Tensor) -> None:
        k = self.spec.moe.top_k
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sel = order[start : start + n]
            start += n
            rows = sel // k
            key = (layer, f"expert.{e}")
            we = self.mods.acquire(key)
            out.index_add_(0, rows, mlp_chunked(h[rows], we, self.spec, self.micro_tokens, f"experts.{e}.") * flat_w[sel, None])
            self.mods.release(key)
