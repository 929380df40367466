"""FFN backends: how a layer's feed-forward part runs, and which modules it acquires (in order).

A backend declares its modules (`modules`), so a step's schedule - the order the prefetcher copies
modules in - is derived from the backends the engine runs, never kept in step by hand. The planner
reads the same declarations (planner/shape.py).

A new FFN backend is one file: an `FFNBackend` subclass, registered with `register_ffn`.
"""

from __future__ import annotations

from offbatch.models.spec import ModelSpec


class FFNBackend:
    name = "base"
    moe = False  # runs MoE layers (else dense ones)

    @staticmethod
    def modules(spec: ModelSpec, layer: int) -> list[str]:
        """The modules of `layer` this backend acquires, in the order it acquires them."""
        raise NotImplementedError

    @classmethod
    def applies(cls, spec: ModelSpec, dtype) -> bool:
        """Whether this backend can run this model's FFN layers of its kind in this dtype."""
        return True


FFN_BACKENDS: dict[str, type[FFNBackend]] = {}


def register_ffn(cls: type[FFNBackend]) -> type[FFNBackend]:
    FFN_BACKENDS[cls.name] = cls
    return cls


def get_ffn(name: str) -> type[FFNBackend]:
    if name not in FFN_BACKENDS:
        raise KeyError(f"unknown FFN backend {name!r} (known: {', '.join(sorted(FFN_BACKENDS))})")
    return FFN_BACKENDS[name]
