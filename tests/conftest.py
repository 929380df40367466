import gc
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


# ---- GPU tests do not depend on which tests ran before them ---------------------------------------
# `make test-gpu` runs the whole GPU suite in one process. A memory cap is process-wide (the allocator's
# per-process fraction) and so are the caching allocator's reserved blocks and its peak statistics: a
# test that left blocks reserved (cached, or held by a cuBLAS workspace of a stream it used) made every
# later cap assertion fail (270 MB left against a 64 MiB cap). Every GPU test starts and ends with all
# of that given back and reset, and measures only what its own engine reserved.
def release_gpu_memory() -> int:
    """Give back every CUDA block no live tensor holds (garbage first, then cuBLAS's per-stream workspaces,
    which empty_cache keeps), reset the peak statistics and lift any per-process cap. Returns the bytes
    still reserved afterwards: 0 unless something alive holds CUDA tensors."""
    if not torch.cuda.is_available():
        return 0
    gc.collect()
    for device in range(torch.cuda.device_count()):
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear_workspaces is not None:
                clear_workspaces()
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            torch.cuda.reset_peak_memory_stats(device)
    return sum(torch.cuda.memory_reserved(d) for d in range(torch.cuda.device_count()))


def close_engines() -> None:
    """End the threads of streaming engines a test left open (a disk reader or host KV writer thread
    keeps its engine's buffers alive after the test)."""
    from offbatch.engine.streaming import StreamingEngine

    for obj in gc.get_objects():
        if issubclass(type(obj), StreamingEngine):  # (type(): no proxy's __class__ is asked)
            obj.close()


@pytest.fixture(scope="session")
def probed_once():
    """This machine's probe, made (and cached) before the first GPU test: a build that probes inside a
    test would measure the probe's allocations along with its engine."""
    from offbatch.planner.probe import probe_hardware

    probe_hardware("cuda")


@pytest.fixture(autouse=True)
def isolated_gpu_memory(request):
    """Around every GPU test: nothing reserved, no cap, fresh peak statistics; the test then asserts what
    it reserved itself (see `reserved_before_engine`)."""
    if "gpu" not in request.keywords or not torch.cuda.is_available():
        yield
        return
    request.getfixturevalue("probed_once")
    release_gpu_memory()
    yield
    close_engines()
    release_gpu_memory()


@pytest.fixture
def reserved_before_engine():
    """A function for GPU tests to call right before building the engine whose peak they assert:
    releases what the test's own reference model left and returns the bytes still reserved, after
    asserting that they are none (a cap assertion measures the engine, not what came before it)."""

    def measure() -> int:
        start = release_gpu_memory()
        assert start == 0, (f"{start} bytes of CUDA memory stay reserved before the engine is built: live "
                            "tensors from this or an earlier test; the cap assertion would measure them")
        return start

    return measure


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: threads only add overhead, and on a loaded 2-core CI box a lot of it. Modules that
    run many tiny-model jobs use it: pytestmark = pytest.mark.usefixtures("one_thread")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
