"""FFN backends: how a layer's feed-forward part runs, and which modules it acquires (in order).

A backend declares its modules (`modules`), so a step's schedule - the order the prefetcher copies
modules in - is derived from the backends the engine runs, never kept in step by hand. The planner
reads the same declarations (planner/shape.py).

At run time a backend is built over a module source (`Modules`: the engine's prefetcher, or the
reference's resident weights) and called once per layer of its kind with the layer's input; it returns
the FFN's output (the residual add is the caller's).

A new FFN backend is one file: an `FFNBackend` subclass, registered with `register_ffn`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

import torch

from offbatch.models.catalogue import ModuleKey
from offbatch.models.spec import ModelSpec


class Modules(Protocol):
    """Where a forward gets its modules' weights: acquire before use, release after (a streamed module's
    device slot is then free for the next copy); skip: modules of this step that will not be used."""

    def acquire(self, key: ModuleKey) -> Mapping[str, torch.Tensor]: ...

    def release(self, key: ModuleKey) -> None: ...

    def skip(self, keys: Iterable[ModuleKey]) -> None: ...


class FFNBackend:
    name = "base"
    moe = False  # runs MoE layers (else dense ones)

    def __init__(self, spec: ModelSpec, modules: Modules, micro_tokens: int):
        """micro_tokens: rows per FFN call at most (the plan's ffn_micro_tokens)."""
        self.spec, self.mods, self.micro_tokens = spec, modules, micro_tokens

    @staticmethod
    def modules(spec: ModelSpec, layer: int) -> list[str]:
        """The modules of `layer` this backend acquires, in the order it acquires them."""
        raise NotImplementedError

    @classmethod
    def applies(cls, spec: ModelSpec, dtype) -> bool:
        """Whether this backend can run this model's FFN layers of its kind in this dtype."""
        return True

    @classmethod
    def runs_on(cls, spec: ModelSpec, modules: Modules) -> bool:
        """Whether it can run over this module source (how its weights are stored and served there)."""
        return True

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The FFN output of `layer` for its input x [T, H] (before the residual add)."""
        raise NotImplementedError


FFN_BACKENDS: dict[str, type[FFNBackend]] = {}


def register_ffn(cls: type[FFNBackend]) -> type[FFNBackend]:
    FFN_BACKENDS[cls.name] = cls
    return cls


def get_ffn(name: str) -> type[FFNBackend]:
    if name not in FFN_BACKENDS:
        raise KeyError(f"unknown FFN backend {name!r} (known: {', '.join(sorted(FFN_BACKENDS))})")
    return FFN_BACKENDS[name]
