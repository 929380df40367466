"""The Triton kernel modules as the tests use them: on the GPU as they are; without one, under Triton's
interpreter.

Triton reads TRITON_INTERPRET when @triton.jit decorates (at import) and again at launch (it decorates its
own helpers lazily), so the variable stays set (for the session, or for a test through monkeypatch); it also
makes offbatch.kernels dispatch CPU tensors to Triton, which the dispatch tests rely on. A module imported
earlier without the interpreter is reloaded under it.
"""

import importlib
import os

import torch

CUDA = torch.cuda.is_available()


def triton_kernel_module(name: str, setenv=None):
    """offbatch.kernels.NAME, interpreted when there is no GPU. setenv: how to set the variable (a test's
    monkeypatch.setenv; default: for the whole session)."""
    if not CUDA:
        (setenv or os.environ.__setitem__)("TRITON_INTERPRET", "1")
    module = importlib.import_module(f"offbatch.kernels.{name}")
    if not CUDA and not module.INTERPRETED:  # imported earlier without the interpreter
        module = importlib.reload(module)
    return module
