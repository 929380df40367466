"""Resume: what an existing output file already answers, and making it safe to append to.

The output file is the ledger; there is no side file that could disagree with it. A request counts
as done when the file holds a success record under its id whose input hash matches the request's
content now. Everything else is redone, and the file is first cut back to what stays true:
- a torn last line (the process died mid-write) is cut off;
- error records are dropped: errors are re-derived on every run, so a fixed line simply runs;
- a success record whose request changed under the same id is dropped (and reported), so the new
  content runs and the file never holds two answers for one id;
- a second success record for one id (which only a hand-edited file can hold) is dropped.
When anything besides a torn tail is dropped, the file is rewritten to a temporary file and renamed
over the old one, so a crash during the rewrite leaves the old file whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from offbatch.errors import InputFileError
from offbatch.jobs.results import OPENAI_ID_PREFIX


def record_key(rec: dict) -> tuple[str, str | None] | None:
    """(id key, input hash) of a result record, in either output shape; None if it is not one."""
    if not isinstance(rec, dict) or "error" not in rec:
        return None
    if "custom_id" in rec:
        rid = rec.get("id")
        digest = rid[len(OPENAI_ID_PREFIX):] if isinstance(rid, str) and rid.startswith(OPENAI_ID_PREFIX) else None
        return json.dumps(rec["custom_id"]), digest
    if "id" in rec:
        return json.dumps(rec["id"]), rec.get("input_hash")
    return None


@dataclass
class ResumePlan:
    done: set[str] = field(default_factory=set)  # id keys whose results stay and are skipped
    changed: list = field(default_factory=list)  # ids of requests that changed since their result
    torn: bool = False  # the last line was cut short
    dropped_errors: int = 0
    dropped_other: int = 0  # duplicate or unreadable lines
    kept_lines: list[bytes] = field(default_factory=list)
    valid_end: int = 0  # byte offset of the end of the last whole line
    rewrite: bool = False

    @property
    def changed_any(self) -> bool:
        return self.torn or self.rewrite


def plan_resume(path: str | Path, requests) -> ResumePlan:
    """Compare the output file at `path` (which may not exist) with the requests about to run."""
    plan = ResumePlan()
    if str(path) == "-":
        return plan
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return plan
    except OSError as e:
        raise InputFileError(f"{path} cannot be read to resume from it: {e.strerror or e}") from None

    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline, else a line cut short
    plan.torn = tail != b""
    plan.valid_end = len(data) - len(tail)

    wanted = {json.dumps(r.id): r.input_hash for r in requests}
    seen: set[str] = set()
    for raw in lines:
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            rec = None
        key_hash = record_key(rec)
        if key_hash is None:
            plan.dropped_other += 1
            continue
        key, digest = key_hash
        if rec.get("error") is not None:
            plan.dropped_errors += 1
            continue
        if key in seen:
            plan.dropped_other += 1
            continue
        seen.add(key)
        if key in wanted and digest != wanted[key]:
            plan.changed.append(json.loads(key))
            continue
        plan.kept_lines.append(raw)
        if key in wanted:
            plan.done.add(key)
    plan.rewrite = bool(plan.changed or plan.dropped_errors or plan.dropped_other)
    return plan


def apply_resume(path: str | Path, plan: ResumePlan) -> None:
    """Cut the output file back to the plan's kept records, crash-safely."""
    path = Path(path)
    if plan.rewrite:
        tmp = path.with_name(path.name + ".offbatch-tmp")
        with open(tmp, "wb") as f:
            for raw in plan.kept_lines:
                f.write(raw + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_dir(path.parent)
    elif plan.torn:
        with open(path, "r+b") as f:
            f.truncate(plan.valid_end)
            f.flush()
            os.fsync(f.fileno())


def _sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
