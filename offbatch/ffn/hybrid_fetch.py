"""The hybrid FFN's cold neurons fetched to the device (issue 17's neuron-granular streaming).

The host threads' cold part (ffn/hybrid.py ColdPart) costs the union of a step's active cold neurons times
its tokens in host compute, in the device's chain: fine for a few tokens, slow for a few dozen. Here the GPU
reads the union's rows itself from pinned host memory (kernels.gather_rows: only those rows cross the bus,
no host thread touches them, no round trip through the host) in chunks of FETCH_ROWS neurons, and
multiplies them where the hot neurons are: the cost is the union's bytes over the link, shared with the
weight stream. The planner (planner/hybrid_ffn.py) picks, by step size, which of the two a step takes.

The same arithmetic as ColdPart.partial: a token's cold neuron counts where its predictor marks it (with
the oracle: where its activation is truly non-zero, or above the profile's threshold).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from offbatch import kernels
from offbatch.models import layers as L
from offbatch.models.spec import ModelSpec

# Neurons gathered and multiplied per chunk: the device scratch holds this many rows of up (and gate) and of
# down^T. 2048 OPT-30B neurons are 59 MB; a larger union runs in several chunks, so any union fits.
FETCH_ROWS = 2048


def fetch_scratch_bytes(spec: ModelSpec, dsize: int, tokens: int, rows: int = FETCH_ROWS) -> int:
    """Device bytes the fetch path holds: the row scratch, and a chunk's activations for `tokens` tokens."""
    mats = 3 if spec.gated_ffn else 2
    return rows * mats * spec.hidden_size * dsize + 3 * tokens * rows * dsize


class FetchLayer:
    """One hybrid layer's device-side indices for the fetch path: its cold neurons' ids and biases."""

    def __init__(self, cold_part, device, dtype):
        self.part = cold_part
        self.cold = cold_part.cold.to(device)
        self.up_b = None if cold_part.up_b is None else cold_part.up_b[cold_part.cold].to(device=device, dtype=dtype)
        gb = cold_part.gate_b
        self.gate_b = None if gb is None else gb[cold_part.cold].to(device=device, dtype=dtype)


class ColdFetcher:
    """The device scratch the fetched rows land in (one set for every layer: layers run one at a time)."""

    def __init__(self, spec: ModelSpec, device, dtype, rows: int = FETCH_ROWS):
        self.spec, self.rows = spec, rows
        hidden = spec.hidden_size

        def buf():
            return torch.empty(rows, hidden, dtype=dtype, device=device)

        self.up, self.down = buf(), buf()
        self.gate = buf() if spec.gated_ffn else None
        self.nbytes = sum(b.numel() * b.element_size() for b in (self.up, self.down, self.gate) if b is not None)

    def partial(self, layer: FetchLayer, h: torch.Tensor, active: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """(the cold neurons' sum [T, hidden] in h's dtype, for each token where `active` [T, cold] says - None:
        the oracle; how many neurons were fetched)."""
        part, spec = layer.part, self.spec
        if active is None:
            used = torch.arange(part.count, device=h.device)
        else:
            used = active.any(dim=0).nonzero().squeeze(1)  # the union: one synchronisation
        n_used = int(used.numel())
        y = torch.zeros(h.shape[0], spec.hidden_size, dtype=h.dtype, device=h.device)
        for c0 in range(0, n_used, self.rows):
            u = used[c0 : c0 + self.rows]
            idx = layer.cold[u]
            a = F.linear(h, kernels.gather_rows(part.up, idx, out=self.up), _at(layer.up_b, u))
            if self.gate is not None:
                g = F.linear(h, kernels.gather_rows(part.gate, idx, out=self.gate), _at(layer.gate_b, u))
                a = L.activation(spec.activation, g) * a
            else:
                a = L.activation(spec.activation, a)
            keep = a.abs() > part.threshold if active is None else active[:, u]
            a = torch.where(keep, a, torch.zeros((), dtype=a.dtype, device=a.device))
            y.addmm_(a, kernels.gather_rows(part.down_t, u, out=self.down))
        return y, n_used


def _at(t, idx):
    return None if t is None else t[idx]
