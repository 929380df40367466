"""What a model is made of, module by module: the unit in which weights are placed and streamed."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from offbatch.models.loader import Checkpoint
from offbatch.models.spec import ModelSpec


def module_of(canonical: str, spec: ModelSpec) -> tuple[int, str]:
    """Canonical tensor name -> (layer or -1 for globals, module): attn, ffn, router, shared, expert.E, or the
    global name (embed, lm_head, ...). Norm weights travel with the module they normalise the input of
    (in MoE layers the FFN norm goes with the router, which every token needs)."""
    parts = canonical.split(".")
    if parts[0] != "layers":
        return -1, parts[0]
    layer, local = int(parts[1]), parts[2]
    if local in ("attn_norm", "q", "k", "v", "o", "q_norm", "k_norm"):
        return layer, "attn"
    if local == "experts":
        return layer, f"expert.{parts[3]}"
    if local in ("shared", "shared_gate"):
        return layer, "shared"
    if local == "router" or (local == "ffn_norm" and spec.is_moe_layer(layer)):
        return layer, "router"
    return layer, "ffn"  # ffn_norm, gate, up, down


@dataclass
class LayerBytes:
    layer: int
    modules: dict[str, int] = field(default_factory=dict)

    @property
    def attn(self) -> int:
        return self.modules.get("attn", 0)

    @property
    def experts(self) -> list[int]:
        keys = sorted((k for k in self.modules if k.startswith("expert.")), key=lambda k: int(k.split(".")[1]))
        return [self.modules[k] for k in keys]

    @property
    def total(self) -> int:
        return sum(self.modules.values())


def module_bytes(ckpt: Checkpoint) -> tuple[dict[str, int], list[LayerBytes]]:
    """Bytes of each global tensor and of each layer's modules, as stored in the checkpoint."""
    globals_: dict[str, int] = defaultdict(int)
    layers = [LayerBytes(i) for i in range(ckpt.spec.num_layers)]
    for canonical, entry in ckpt.entries.items():
        layer, module = module_of(canonical, ckpt.spec)
        if layer < 0:
            globals_[module] += entry.nbytes
        else:
            layers[layer].modules[module] = layers[layer].modules.get(module, 0) + entry.nbytes
    return dict(globals_), layers
