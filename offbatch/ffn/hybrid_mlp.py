"""The arithmetic of PowerInfer's hybrid FFN, without placement: a layer's neurons split into hot ones
(computed for every token: on the GPU, where they will be resident) and cold ones (computed only for the
tokens where a predictor marks them active: on the CPU threads), the two partial sums added.

A neuron j of an FFN is row j of up (and gate) and column j of down:
    y = sum_j h_j(x) down[:, j] + down bias,   h_j(x) = act(x . up_j + b_j)   (gated: act(x . gate_j) (x . up_j))
so any split of the neurons into disjoint sets gives partial sums that add up to the dense FFN, and leaving
out a neuron for a token where h_j(x) = 0 changes nothing: with an exact activity oracle on a ReLU FFN the
hybrid output equals the dense one (to float rounding). With a predictor, a missed active neuron is the loss.

The backend that places hot neurons on the GPU and runs the cold part beside it (issue 17) builds on these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from offbatch.models import layers as L
from offbatch.models.spec import ModelSpec


def neuron_activations(x: torch.Tensor, w, spec: ModelSpec, neurons: torch.Tensor, prefix: str = "") -> torch.Tensor:
    """h [T, len(neurons)]: the given neurons' activations for tokens x [T, hidden] (dense weights)."""
    up = F.linear(x, w[f"{prefix}up.weight"][neurons], _rows(w.get(f"{prefix}up.bias"), neurons))
    if spec.gated_ffn:
        gate = F.linear(x, w[f"{prefix}gate.weight"][neurons], _rows(w.get(f"{prefix}gate.bias"), neurons))
        return L.activation(spec.activation, gate) * up
    return L.activation(spec.activation, up)


def _rows(bias, neurons):
    return None if bias is None else bias[neurons]


def partial_ffn(x: torch.Tensor, w, spec: ModelSpec, neurons: torch.Tensor, active: torch.Tensor | None = None,
                prefix: str = "") -> torch.Tensor:
    """sum over `neurons` of h_j(x) down[:, j], without the down bias: [T, hidden]. active [T, len(neurons)]
    (bool): only where True (a token's predicted-active cold neurons); None: all of them (the hot part)."""
    if neurons.numel() == 0:
        return x.new_zeros(x.shape[0], w[f"{prefix}down.weight"].shape[0])
    if active is not None:
        # Only the neurons some token needs are computed at all (the union over the micro-batch).
        used = active.any(dim=0)
        neurons, active = neurons[used], active[:, used]
        if neurons.numel() == 0:
            return x.new_zeros(x.shape[0], w[f"{prefix}down.weight"].shape[0])
    h = neuron_activations(x, w, spec, neurons, prefix)
    if active is not None:
        h = torch.where(active, h, torch.zeros((), dtype=h.dtype, device=h.device))
    return F.linear(h, w[f"{prefix}down.weight"][:, neurons])


def hybrid_ffn(x: torch.Tensor, w, spec: ModelSpec, hot: torch.Tensor, cold: torch.Tensor,
               cold_active: torch.Tensor, prefix: str = "") -> torch.Tensor:
    """The FFN's output from its hot neurons (every token) and its cold ones (where cold_active [T, len(cold)]
    says), plus the down bias: equals the dense FFN wherever cold_active holds every non-zero activation."""
    y = partial_ffn(x, w, spec, hot, None, prefix) + partial_ffn(x, w, spec, cold, cold_active, prefix)
    bias = w.get(f"{prefix}down.bias")
    return y if bias is None else y + bias


def oracle_activity(x: torch.Tensor, w, spec: ModelSpec, neurons: torch.Tensor, prefix: str = "") -> torch.Tensor:
    """The exact activity [T, len(neurons)] of the given neurons: where their activation is not 0."""
    return neuron_activations(x, w, spec, neurons, prefix) != 0


def split_by_activity(activity: torch.Tensor, hot_count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hot, cold) neuron indices: the hot_count most often active (`offbatch profile`'s activity), the rest."""
    order = activity.argsort(descending=True, stable=True)
    return order[:hot_count].sort().values, order[hot_count:].sort().values
