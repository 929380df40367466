import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Skip `@pytest.mark.gpu` tests where no CUDA GPU is visible (they are deselected by default)."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
