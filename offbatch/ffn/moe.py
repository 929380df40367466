"""What every MoE backend does around its experts: route the layer's tokens, learn on the host which
experts got any (the one host sync of a MoE layer: which experts to fetch), drop the others from the
step's schedule, run the shared expert; the routed experts are the backend's (`experts`)."""

from __future__ import annotations

import time

import torch

from offbatch.ffn.base import FFNBackend
from offbatch.models import layers as L
from offbatch.models.spec import ModelSpec


class MoEBackend(FFNBackend):
    moe = True

    def __init__(self, spec, modules, micro_tokens):
        super().__init__(spec, modules, micro_tokens)
        self.sync_s = 0.0  # host time waiting for the routing counts (wall clock)

    @staticmethod
    def modules(spec: ModelSpec, layer: int) -> list[str]:
        shared = ["shared"] if spec.moe.shared_expert_intermediate_size else []
        return ["router", *shared, *(f"expert.{e}" for e in range(spec.moe.num_experts))]

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        spec, mods = self.spec, self.mods
        wr = mods.acquire((layer, "router"))
        h = L.norm(x, wr, "ffn_norm", spec)
        top_w, top_i = L.route(h, wr, spec)
        mods.release((layer, "router"))
        order, counts = L.group_by_expert(top_i, spec.moe.num_experts)
        t0 = time.perf_counter()
        counts = counts.tolist()
        self.sync_s += time.perf_counter() - t0
        mods.skip({(layer, f"expert.{e}") for e, n in enumerate(counts) if n == 0})
        y = torch.zeros_like(h)
        if spec.moe.shared_expert_intermediate_size:
            ws = mods.acquire((layer, "shared"))
            y += self._shared(h, ws)
            mods.release((layer, "shared"))
        self.experts(layer, h, order, counts, top_w.reshape(-1), y)
        return y

    def _shared(self, h: torch.Tensor, ws) -> torch.Tensor:
        step = self.micro_tokens
        return torch.cat([L.shared_expert(h[a : a + step], ws, self.spec) for a in range(0, h.shape[0], step)])

    def experts(self, layer: int, h: torch.Tensor, order: torch.Tensor, counts: list[int], flat_w: torch.Tensor,
                out: torch.Tensor) -> None:
        """out[t] += sum over t's routed experts e of w(t, e) * expert_e(h[t]). order: the flattened
        (token, k) pairs sorted by expert (L.group_by_expert); counts: their number per expert, on the
        host; flat_w: routing weights [T*k]."""
        raise NotImplementedError
