"""Disk-tier reads that bypass the page cache (offload/direct_io.py): the bytes are the file's, at any
offset and length, across the bounce buffer's chunks and at the end of the file; a file system without
O_DIRECT falls back to buffered reads."""

import errno
import os

import numpy as np
import pytest

from offbatch.offload import direct_io
from offbatch.offload.direct_io import ALIGN, BounceBuffer, open_direct


@pytest.fixture
def data_file(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=5 * ALIGN + 123, dtype=np.uint8)
    path = tmp_path / "w.bin"
    path.write_bytes(data.tobytes())
    return path, data


def test_direct_reads_give_the_files_bytes_at_any_offset(data_file):
    path, data = data_file
    fd = open_direct(str(path))
    if fd is None:
        pytest.skip("this file system refuses O_DIRECT")
    try:
        bounce = BounceBuffer(2 * ALIGN)  # small: reads cross several bounce chunks
        for offset, n in [(0, 1), (1, ALIGN), (ALIGN - 1, 2), (17, 3 * ALIGN + 5), (ALIGN, 2 * ALIGN),
                          (5 * ALIGN, 123), (len(data) - 7, 7), (0, len(data))]:
            dest = np.full(n, 0xAB, dtype=np.uint8)
            assert bounce.read(fd, offset, dest) == n
            assert np.array_equal(dest, data[offset : offset + n]), (offset, n)
        dest = np.zeros(10, dtype=np.uint8)
        assert bounce.read(fd, len(data) - 4, dest) == 4  # the end of the file: what there is
        assert np.array_equal(dest[:4], data[-4:])
    finally:
        os.close(fd)


def test_module_files_read_direct_where_they_can_and_buffered_else(data_file, monkeypatch):
    from offbatch.offload.disk import ModuleFiles

    path, _ = data_file
    files = ModuleFiles()
    fd, direct = files.fd(str(path))
    assert direct == (open_direct(str(path)) is not None)
    files.close()
    monkeypatch.setenv("OFFBATCH_DIRECT_IO", "0")
    files = ModuleFiles()
    assert files.fd(str(path))[1] is False
    files.close()
    monkeypatch.delenv("OFFBATCH_DIRECT_IO")
    real_open = os.open

    def no_direct(p, flags, *a):  # a file system without O_DIRECT (tmpfs)
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *a)

    monkeypatch.setattr(direct_io.os, "open", no_direct)
    files = ModuleFiles()
    assert files.fd(str(path))[1] is False
    files.close()


@pytest.mark.parametrize("direct_io", ["1", "0"])
def test_read_into_places_each_tensors_bytes_and_counts_how_they_were_read(data_file, monkeypatch, direct_io):
    import torch

    from offbatch.offload import disk
    from offbatch.offload.disk import ModuleFiles, TensorRead, read_into

    monkeypatch.setenv("OFFBATCH_DIRECT_IO", direct_io)
    monkeypatch.setattr(disk, "CHUNK", 3 * ALIGN)  # several read calls per tensor
    path, data = data_file
    reads = [TensorRead("a", str(path), 13, 2 * ALIGN + 7, 0, True),
             TensorRead("b", str(path), 4 * ALIGN + 1, 900, 9000, True),
             TensorRead("c", str(path), 0, len(data), 20000, True)]  # the whole file, to its unaligned end
    out = torch.zeros(20000 + len(data), dtype=torch.uint8)
    files = ModuleFiles()
    read_into(reads, out, files, lambda parts, buf: None)
    arr = out.numpy()
    for r in reads:
        assert np.array_equal(arr[r.buf_offset : r.buf_offset + r.nbytes], data[r.file_offset : r.file_offset + r.nbytes])
    total = sum(r.nbytes for r in reads)
    direct = files.fd(str(path))[1]
    assert (files.direct_bytes, files.buffered_bytes) == ((total, 0) if direct else (0, total))
    assert direct == (direct_io == "1" and open_direct(str(path)) is not None)
    files.close()
