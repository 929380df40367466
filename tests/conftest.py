import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when it creates its jit functions, its own language library included,
# and torch may import triton.language early: set it before anything runs, so Triton tests on a
# machine without CUDA use the interpreter whatever test runs first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Skip `@pytest.mark.gpu` tests where no CUDA GPU is visible (they are deselected by default)."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
