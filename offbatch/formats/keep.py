"""Keeping some linear layers dense inside a compressed format: "int4+keep=down,o" stores the bulk weights in
int4 except the named layers', which stay in the compute dtype (the layers most sensitive to rounding,
traded for bytes; `offbatch convert --skip`). Names: a layer (q, k, v, o, gate, up, down) wherever it occurs,
or a group: attn (q, k, v, o), ffn (gate, up, down of the dense FFN, the shared expert and every routed
expert), experts (every routed expert's weights), shared (the shared expert's). The embedding, the head, the
router, norms and biases are dense in every format already.

The wrapper decides only which weights are compressed; storing, computing and expanding are the inner
format's. Routed experts whose three weights are all kept dense run through the dense grouped kernels, all
compressed through the inner format's; a mix runs expert by expert.
"""

from __future__ import annotations

import re

from offbatch.formats.base import WeightFormat, get_format, register_family
from offbatch.formats.dense import DENSE

LAYERS = ("q", "k", "v", "o", "gate", "up", "down")
GROUPS = {"attn": ("q", "k", "v", "o"), "ffn": ("gate", "up", "down"), "experts": (), "shared": ()}
NAMES = (*LAYERS, *GROUPS)
EXPERT_WEIGHTS = ("gate.weight", "up.weight", "down.weight")


class KeepDense(WeightFormat):
    def __init__(self, inner: WeightFormat, keep: frozenset[str]):
        unknown = sorted(set(keep) - set(NAMES))
        if unknown or not keep:
            raise ValueError(f"layers to keep dense are among {', '.join(NAMES)}, not {', '.join(unknown) or 'none'}")
        if inner is DENSE or isinstance(inner, KeepDense):
            raise ValueError("keep= applies to one compressed format")
        self.inner, self.keep = inner, frozenset(keep)
        self.name = f"{inner.name}+keep={','.join(sorted(self.keep))}"
        self.expands, self.fused_rows, self.encodes_anywhere = inner.expands, inner.fused_rows, inner.encodes_anywhere
        self.expand_efficiency, self.expert_expand_efficiency = inner.expand_efficiency, inner.expert_expand_efficiency
        kept = [self.kept(f"experts.0.{w}") for w in EXPERT_WEIGHTS]
        self.experts_as = DENSE if all(kept) else inner if not any(kept) else None
        self.grouped_experts = self.experts_as is not None and self.experts_as.grouped_experts

    def kept(self, local: str) -> bool:
        """Whether the weight `local` ("o.weight", "experts.3.down.weight", "shared.up.weight") stays dense."""
        path = local.split(".")[:-1]
        layer = path[-1] if path else ""
        scope = path[0] if path and path[0] in ("experts", "shared") else ("attn" if layer in GROUPS["attn"] else "ffn")
        return bool({layer, scope} & self.keep)

    def compresses(self, local, shape):
        return self.inner.compresses(local, shape) and not self.kept(local)

    def stored(self, local, shape, dtype):
        if self.compresses(local, shape):
            return self.inner.stored(local, shape, dtype)
        return super().stored(local, shape, dtype)

    def encode(self, local, tensor, dtype):
        if self.compresses(local, tuple(tensor.shape)):
            return self.inner.encode(local, tensor, dtype)
        return super().encode(local, tensor, dtype)

    def dequantize(self, w, local, dtype, in_features=None):
        return self.inner.dequantize(w, local, dtype, in_features)

    def linear(self, x, w, name):  # the inner format computes what it stored; a dense weight is F.linear
        return self.inner.linear(x, w, name)

    def grouped_swiglu(self, kernels, x, stacks, offsets, slots):
        return self.experts_as.grouped_swiglu(kernels, x, stacks, offsets, slots)

    def grouped_gemm(self, kernels, a, stacks, offsets, slots):
        return self.experts_as.grouped_gemm(kernels, a, stacks, offsets, slots)


def parse_keep(name: str) -> KeepDense | None:
    """"FORMAT+keep=a,b": FORMAT with the layers a and b kept dense (names sorted, no repeats)."""
    m = re.fullmatch(r"([^+]+)\+keep=([a-z]+(?:,[a-z]+)*)", name)
    if m is None:
        return None
    names = m.group(2).split(",")
    if names != sorted(set(names)) or any(n not in NAMES for n in names):
        return None
    try:
        inner = get_format(m.group(1))
        return KeepDense(inner, frozenset(names))
    except (KeyError, ValueError):
        return None


def keep_name(fmt_name: str, keep) -> str:
    """The format name for `fmt_name` with these layers kept dense (fmt_name when none)."""
    keep = sorted(set(keep))
    return f"{fmt_name}+keep={','.join(keep)}" if keep else fmt_name


register_family(parse_keep)
