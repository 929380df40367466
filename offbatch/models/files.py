"""Reading the files of a model folder: regular files only, with a size limit, never a hang.

A model folder comes from elsewhere (a download, a tarball, a copy): any of its files may be a FIFO,
a device, a socket or a folder where a file belongs, absurdly large, not UTF-8, or JSON of the wrong
shape. Every reader here turns each of those into one ModelFolderError naming the file, before the
file is read (a FIFO opened for reading would block forever, /dev/zero would never end).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from offbatch.errors import ModelFolderError

# Limits on what a folder's small files may hold (the README lists them).
MAX_JSON_BYTES = 64 * 2**20  # config.json, tokenizer_config.json, generation_config.json, the shard index
MAX_TOKENIZER_BYTES = 512 * 2**20  # tokenizer.json (the largest published ones are tens of MB)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def exists(path: Path) -> bool:
    """Whether anything is at `path`, a broken symlink included (which then fails to open, clearly)."""
    return os.path.lexists(path)


def _stat(path: Path) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ModelFolderError(f"{path} is a broken symbolic link") from None
        raise ModelFolderError(f"{path} not found") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        raise ModelFolderError(f"{path} cannot be read: {getattr(e, 'strerror', None) or e}") from None


def open_regular(path: Path):
    """A binary file object for `path`, refusing anything but a regular file before opening it.

    The type is checked with stat first and again on the open descriptor, and the open itself uses
    O_NONBLOCK, so a FIFO swapped in between the two can neither block the open nor be read."""
    st = _stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ModelFolderError(f"{path} is {_kind(st.st_mode)}, not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ModelFolderError(f"{path} cannot be read: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ModelFolderError(f"{path} is {_kind(st.st_mode)}, not a regular file")
    return os.fdopen(fd, "rb")


def read_bytes(path: Path, limit: int) -> bytes:
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise ModelFolderError(f"{path} is {size:,} bytes; offbatch reads at most {limit:,} bytes from it")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise ModelFolderError(f"{path} cannot be read: {e.strerror or e}") from None
    if len(data) > limit:  # grew since fstat
        raise ModelFolderError(f"{path} is over {limit:,} bytes; offbatch reads at most {limit:,} bytes from it")
    return data


def read_text(path: Path, limit: int) -> str:
    try:
        return read_bytes(path, limit).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFolderError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {dup!r} appears twice in one object")
    return out


def parse_json(data: bytes | str, where: str, unique_keys: bool = False) -> Any:
    """JSON from a file's contents; any failure (syntax, nesting, an integer of thousands of digits,
    a repeated key where `unique_keys`) is one ModelFolderError."""
    try:
        # UTF-8 only (json.loads would guess UTF-16 from a stray byte pair); a byte-order mark is let be.
        text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
        return json.loads(text, object_pairs_hook=_unique_keys if unique_keys else None)
    except RecursionError:
        raise ModelFolderError(f"{where} is not usable JSON: it is nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ModelFolderError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:  # JSONDecodeError, int digit limit, a repeated key
        raise ModelFolderError(f"{where} is not valid JSON: {e}") from None


def read_json_object(path: Path, limit: int = MAX_JSON_BYTES, unique_keys: bool = False) -> dict:
    """A JSON file that must hold one object ({...})."""
    value = parse_json(read_bytes(path, limit), str(path), unique_keys)
    if not isinstance(value, dict):
        raise ModelFolderError(f"{path} must hold a JSON object ({{...}}), not {json_type(value)}")
    return value


def json_type(value: Any) -> str:
    """What a JSON value is, in words, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {json.dumps(value)}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"[:60]
    if isinstance(value, str):
        return f"the string {json.dumps(value[:40])}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def hub_cache_root(folder: Path) -> Path | None:
    """For a Hugging Face hub cache snapshot (models--org--name/snapshots/REV), the repository folder,
    whose blobs/ its files link into; else None."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return None


def file_in_folder(folder: Path, name: Any, where: str) -> Path:
    """The path of a file that `where` (an index) names inside `folder`, refusing every name that
    leads out of it: not a string, absolute, with '..', or (after following symbolic links) outside
    the folder. A hub cache snapshot's links into its repository's blobs/ are inside."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ModelFolderError(f"{where} names a file {json.dumps(name)[:80]}, which is not a file name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or os.path.isabs(name) or ".." in pure.parts:
        raise ModelFolderError(f"{where} names the file {name!r} outside the model folder; "
                               "an index may only name files in its own folder")
    path = folder / name
    real = Path(os.path.realpath(path))
    roots = [Path(os.path.realpath(folder))]
    cache = hub_cache_root(Path(os.path.abspath(folder)))
    if cache is not None:
        roots.append(Path(os.path.realpath(cache)))
    if not any(real == root or root in real.parents for root in roots):
        raise ModelFolderError(f"{where} names the file {name!r}, a link to {real} outside the model folder; "
                               "an index may only name files in its own folder")
    return path
