"""Resume: what an existing output file already answers, whether it may be touched at all, and making
it safe to append to.

Files of one output OUT (a regular file; streams such as stdout, /dev/null or a FIFO are only ever
written, see writer.py):
- OUT itself is the ledger: one record per line; nothing else says which requests are done.
- OUT.lock: the exclusive lock a run holds from before it reads OUT until it closes it (jobs/lock.py);
  a second run on OUT fails at once naming the first one's pid.
- OUT.offbatch.json, the job header: the job-level values the results were made with (the model's
  fingerprint, the compute dtype, the command-wide sampling defaults), written atomically after OUT is
  cut back and before any new record. It only serves to NAME what changed; the records decide.

The resume key. Every success record carries a key of what decided it: a hash of the model's
fingerprint (jobs/fingerprint.py), the dtype and the request's effective settings after prepare()
(requests.effective_settings: sampling parameters, stop strings, n, template kwargs, ...). It sits in
`settings_hash` in the plain shape and as `response.body.system_fingerprint` ("fp_<key>") in the OpenAI
batch shape. A request counts as done when OUT holds a success record under its id whose input hash
(the line's content) and key both match the request now. Not in the key: the device, the engine, the
batch size and the memory caps (every path gives the reference's tokens), nor the model folder's path
(a moved or copied folder is the same model). The dtype is the one asked for (--dtype), "checkpoint"
when none was: the checkpoint's own dtype is in the fingerprint's config.json and weight headers.

What a run does with each line of an existing OUT:
- a torn last line (the process died mid-write: the start of a record, no whole JSON) is cut off and
  redone; any other last line without its newline is judged like every other line;
- error records are dropped: errors are re-derived on every run, so a fixed line simply runs;
- a success record whose request content changed under the same id is dropped, redone and reported;
- a second success record for one id (only a hand-edited file can hold one) is dropped;
- a record of an id that is no longer in the job is moved aside, into OUT.stale-<UTC time>.jsonl, with
  a warning naming the count and that file;
- a record whose key differs (another model, dtype, max_tokens, temperature, ...), or that has no key
  (written by an offbatch before keys), or whose request now fails on its line, stops the run before
  anything is touched: one error naming what changed. --redo-changed redoes those requests;
  --keep-changed keeps those results as they are and stamps them with the current key, so later runs
  take them as this job's;
- a line that is not a result record (notes, prompts, the input file itself), or a file whose results
  share no id with this job (another job's), is refused: OUT is not a results file of this job.
--overwrite replaces whatever in OUT is not this job's exact results (everything above is dropped
instead of refused or moved aside) and keeps the results whose id, input and key all match. So an
--overwrite run that is interrupted resumes when the same command is run again, and a finished one
is not redone: its results would be the same (every request's seed is fixed by its id).
Whenever anything besides a torn tail goes, OUT is rewritten to a temporary file that is renamed over
it, so a crash during the rewrite leaves the old file whole.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from offbatch.errors import OutputFileError
from offbatch.jobs.fingerprint import describe_difference
from offbatch.jobs.results import OPENAI_ID_PREFIX

HEADER_VERSION = 1
FP_PREFIX = "fp_"
# How every record offbatch writes begins (results.py puts "id" first in both shapes): only a last line
# that begins so and is no whole JSON is a torn record to cut; anything else is someone's text.
TORN_STARTS = (b'{"id": ', b'{"custom_id": ')


# ---- records ------------------------------------------------------------------------------------

def record_key(rec) -> tuple[str, str | None] | None:
    """(id key, input hash) of a result record, in either output shape; None if it is not one."""
    if not isinstance(rec, dict) or "error" not in rec:
        return None
    if "custom_id" in rec:
        rid = rec.get("id")
        digest = rid[len(OPENAI_ID_PREFIX):] if isinstance(rid, str) and rid.startswith(OPENAI_ID_PREFIX) else None
        return _id_key(rec["custom_id"]), digest
    if "id" in rec:
        return _id_key(rec["id"]), rec.get("input_hash")
    return None


def _id_key(rid) -> str | None:
    try:
        return json.dumps(rid)
    except (TypeError, ValueError, RecursionError):
        return None


def _body(rec: dict):
    response = rec.get("response")
    body = response.get("body") if isinstance(response, dict) else None
    return body if isinstance(body, dict) else None


def settings_key_of(rec: dict) -> str | None:
    """The resume key a success record carries; None when it has none (an older offbatch wrote it)."""
    if "custom_id" in rec:
        body = _body(rec)
        fp = body.get("system_fingerprint") if body else None
        return fp[len(FP_PREFIX):] if isinstance(fp, str) and fp.startswith(FP_PREFIX) else None
    key = rec.get("settings_hash")
    return key if isinstance(key, str) else None


def stamp_key(rec: dict, key: str) -> None:
    """Put the resume key into a success record of either shape."""
    if "custom_id" in rec:
        body = _body(rec)
        if body is not None:
            body["system_fingerprint"] = FP_PREFIX + key
    else:
        rec["settings_hash"] = key


def stamper(keys: dict[str, str]):
    """A ResultWriter stamp: adds its key to each success record of a request in `keys` (id key -> key)."""

    def stamp(rec: dict) -> None:
        kh = record_key(rec)
        if kh is not None and rec.get("error") is None and kh[0] in keys:
            stamp_key(rec, keys[kh[0]])

    return stamp


# ---- the job key --------------------------------------------------------------------------------

def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def _plain(obj):
    """obj as it reads back from JSON (tuples become lists), so a header compares equal to itself."""
    return json.loads(_canonical(obj))


@dataclass
class JobKey:
    """The job-level values a result depends on (the header holds them) and each request's key."""

    model: dict  # jobs.fingerprint.model_fingerprint()
    dtype: str  # the compute dtype asked for; "checkpoint" = the checkpoint's own
    defaults: dict  # command-wide sampling values (flags over generation_config over built-ins)

    def request_key(self, settings: dict) -> str:
        payload = _canonical({"model": self.model["digest"], "dtype": self.dtype, "settings": settings})
        return hashlib.sha256(payload.encode()).hexdigest()[:24]

    def header(self) -> dict:
        return _plain({"offbatch_results_header": HEADER_VERSION, "model": self.model, "dtype": self.dtype,
                       "defaults": self.defaults})

    def differences(self, header: dict | None) -> list[str]:
        """What changed since the header was written, in words ('max_tokens 64 -> 128', ...)."""
        if header is None:
            return []
        out = []
        model = describe_difference(header.get("model"), self.model)
        if model:
            out.append(model)
        if header.get("dtype") != self.dtype:
            out.append(f"dtype {header.get('dtype')} -> {self.dtype}")
        was, now = header.get("defaults"), _plain(self.defaults)
        if isinstance(was, dict):
            for k in sorted(set(was) | set(now), key=lambda k: (k not in now, k)):
                if was.get(k) != now.get(k):
                    out.append(f"{k} {_short(was.get(k))} -> {_short(now.get(k))}")
        return out


def _short(v) -> str:
    text = json.dumps(v, ensure_ascii=False) if not isinstance(v, (int, float)) or isinstance(v, bool) else str(v)
    return text if len(text) <= 40 else text[:37] + "..."


# ---- the header ---------------------------------------------------------------------------------

def header_path_for(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".offbatch.json")


def read_header(output: str | Path) -> dict | None:
    try:
        header = json.loads(header_path_for(output).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return header if isinstance(header, dict) and header.get("offbatch_results_header") else None


def write_header(output: str | Path, header: dict) -> None:
    """Atomically (temporary file + rename)."""
    data = (json.dumps(header, indent=1, ensure_ascii=False) + "\n").encode()
    path = header_path_for(output)
    _write_atomically(path, [data], what=f"the job header {path.name} beside {output}")


# ---- planning -----------------------------------------------------------------------------------

@dataclass
class Wanted:
    """What the job asks of one id: its line, the line's content hash, and its resume key now (None
    when the line fails now, with `fails` saying why)."""

    line: int
    input_hash: str
    key: str | None
    fails: str | None = None


@dataclass
class ResumePlan:
    done: set[str] = field(default_factory=set)  # id keys whose results stay and are skipped
    changed: list = field(default_factory=list)  # ids of requests whose content changed since their result
    settings_changed: list = field(default_factory=list)  # ids whose result has another resume key
    unknown: list = field(default_factory=list)  # ids whose result has no key (an older offbatch)
    fails_now: list = field(default_factory=list)  # (id, reason) of results whose line now fails
    stale: list[bytes] = field(default_factory=list)  # records of ids not in this job
    foreign: list[tuple[int, bytes]] = field(default_factory=list)  # (line number, line): not records
    records: int = 0  # result records (success or error) in the file
    in_common: int = 0  # of those, records of an id in this job
    torn: bool = False  # the last line was cut short
    dropped_errors: int = 0
    dropped_duplicates: int = 0
    kept_lines: list[bytes] = field(default_factory=list)
    valid_end: int = 0  # byte offset of the end of the last whole line
    rewrite: bool = False
    overwrite: bool = False

    @property
    def changed_any(self) -> bool:
        return self.torn or self.rewrite

    @property
    def mismatched(self) -> int:
        return len(self.settings_changed) + len(self.unknown) + len(self.fails_now)


def _parse(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep to be a record
        return None


def _split(data: bytes) -> tuple[list[bytes], bytes | None, bool]:
    """(whole lines, the last line when it lacks its newline but is whole, torn?)."""
    lines = data.split(b"\n")
    tail = lines.pop()
    if not tail.strip():
        return lines, None, False
    if _parse(tail) is None and tail.startswith(TORN_STARTS):
        return lines, None, True  # the start of a record cut short: what a death mid-write leaves
    return lines, tail, False  # a whole line missing its newline, or anything else: judged like any line


def plan_resume(path: str | Path, wanted: dict[str, Wanted], *, keep_changed: bool = False,
                overwrite: bool = False) -> ResumePlan:
    """Compare the output file at `path` (a regular file, which may not exist) with the job about to
    run. Records whose key differs are kept with keep_changed (and restamped), else dropped; whether
    the run may go ahead at all is check_resume's call."""
    plan = ResumePlan(overwrite=overwrite)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return plan
    except OSError as e:
        raise OutputFileError(f"{path} cannot be read to resume from it: {e.strerror or e}") from None

    lines, whole_tail, plan.torn = _split(data)
    plan.valid_end = sum(len(x) + 1 for x in lines)
    if whole_tail is not None:
        lines.append(whole_tail)
        plan.rewrite = True  # to give it its newline back
    seen: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        rec = _parse(raw)
        kh = record_key(rec)
        if kh is None or kh[0] is None:
            plan.foreign.append((number, raw))
            continue
        key, digest = kh
        plan.records += 1
        want = wanted.get(key)
        plan.in_common += want is not None
        if rec.get("error") is not None:
            plan.dropped_errors += 1
        elif key in seen:
            plan.dropped_duplicates += 1
        elif want is None:
            seen.add(key)
            plan.stale.append(raw)
        elif digest != want.input_hash:
            seen.add(key)
            plan.changed.append(json.loads(key))
        else:
            seen.add(key)
            _judge_key(plan, key, raw, rec, want, keep_changed)
    plan.rewrite |= bool(plan.changed or plan.mismatched or plan.dropped_errors or plan.dropped_duplicates
                         or plan.stale or plan.foreign)
    return plan


def _judge_key(plan: ResumePlan, key: str, raw: bytes, rec: dict, want: Wanted, keep_changed: bool) -> None:
    """A success record of this request's current content: kept when its key matches; else noted, and
    kept (stamped with the current key) only with keep_changed."""
    had = settings_key_of(rec)
    if want.key is not None and had == want.key:
        plan.kept_lines.append(raw)
        plan.done.add(key)
        return
    rid = json.loads(key)
    if want.key is None:
        plan.fails_now.append((rid, want.fails))
    elif had is None:
        plan.unknown.append(rid)
    else:
        plan.settings_changed.append(rid)
    if keep_changed:
        if want.key is not None:
            stamp_key(rec, want.key)
            raw = json.dumps(rec, ensure_ascii=False).encode()
        plan.kept_lines.append(raw)
        plan.done.add(key)


# ---- the verdict --------------------------------------------------------------------------------

def _quote(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    return json.dumps(text[:60] + ("..." if len(text) > 60 else ""), ensure_ascii=False)


def _describe_foreign(foreign: list[tuple[int, bytes]]) -> str:
    objs = [_parse(raw) for _, raw in foreign]
    if all(isinstance(o, dict) and ({"prompt", "messages", "body"} & set(o)) for o in objs):
        return f"{len(foreign)} request line(s) (it looks like a prompts file), not results"
    if all(o is None for o in objs):
        kind = "line(s) of text that is not JSON"
    else:
        kind = "line(s) that are not result records"
    number, raw = foreign[0]
    return f"{len(foreign)} {kind} (line {number}: {_quote(raw)})"


def _ids(ids: list, limit: int = 5) -> str:
    return ", ".join(json.dumps(i) for i in ids[:limit]) + (" ..." if len(ids) > limit else "")


def describe_mismatch(plan: ResumePlan, job: JobKey, header: dict | None) -> str:
    """'3 result(s) were made with other settings or another model: max_tokens 64 -> 128; ...'"""
    parts = []
    if plan.settings_changed:
        what = job.differences(header)
        if not what:
            what = ["the per-request settings differ" if header else
                    "which settings is unknown: the job header beside the file is missing"]
        parts.append(f"{len(plan.settings_changed)} result(s) were made with other settings or another model "
                     f"({'; '.join(what)})")
    if plan.unknown:
        parts.append(f"{len(plan.unknown)} result(s) carry no settings key (written by an older offbatch: "
                     f"{_ids(plan.unknown)})")
    if plan.fails_now:
        rid, why = plan.fails_now[0]
        parts.append(f"{len(plan.fails_now)} request(s) with a result now fail on their line "
                     f"({json.dumps(rid)}: {why})")
    return "; ".join(parts)


def check_resume(path: str | Path, plan: ResumePlan, job: JobKey, header: dict | None, *,
                 redo_changed: bool = False, keep_changed: bool = False) -> None:
    """Raise the one OutputFileError that stops the run before anything is touched, if any: OUT is not
    a results file (of this job), or results were made with other settings and no choice was given."""
    if plan.overwrite:
        return
    replace = "give another -o, or add --overwrite to replace the file"
    if plan.foreign:
        raise OutputFileError(f"{path} holds {_describe_foreign(plan.foreign)}; offbatch will not delete them: "
                              f"{replace}")
    if plan.records and not plan.in_common:
        raise OutputFileError(f"{path} holds {plan.records} result(s) of another job (none of their ids is in "
                              f"this job): {replace}")
    if plan.mismatched and not (redo_changed or keep_changed):
        raise OutputFileError(f"{path}: {describe_mismatch(plan, job, header)}. Rerun with --redo-changed to "
                              "redo those requests, or --keep-changed to keep their results as they are")


def check_errors_file(path: str | Path, overwrite: bool = False) -> None:
    """--errors FILE is rewritten on every run (errors are re-derived), so, as for OUT, a regular file
    holding anything but error records (notes, another job's results) is refused unless --overwrite.
    A torn last record (a run killed mid-write) is an error record's remains and may go."""
    if overwrite:
        return
    try:
        data = Path(path).read_bytes() if Path(path).is_file() else b""
    except OSError as e:
        raise OutputFileError(f"--errors {path} cannot be read: {e.strerror or e}") from None
    lines, tail, _ = _split(data)
    foreign = [(n, raw) for n, raw in enumerate(lines + ([tail] if tail is not None else []), start=1)
               if raw.strip() and not _is_error_record(_parse(raw))]
    if foreign:
        records = [_parse(raw) for _, raw in foreign]
        if all(isinstance(r, dict) and ("id" in r or "custom_id" in r) and "error" in r for r in records):
            number, raw = foreign[0]
            what = f"{len(foreign)} success record(s) (line {number}: {_quote(raw)}), not error records"
        else:
            what = _describe_foreign(foreign)
        raise OutputFileError(f"--errors {path} holds {what}; each run rewrites that file "
                              "and offbatch will not delete them: give another --errors file, or add --overwrite")


def _is_error_record(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("error"), dict) and ("id" in obj or "custom_id" in obj)


# ---- applying -----------------------------------------------------------------------------------

def stale_path_for(output: Path) -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    candidate = output.with_name(f"{output.name}.stale-{stamp}.jsonl")
    n = 2
    while candidate.exists():
        candidate = output.with_name(f"{output.name}.stale-{stamp}-{n}.jsonl")
        n += 1
    return candidate


def apply_resume(path: str | Path, plan: ResumePlan) -> Path | None:
    """Cut the output file back to the plan's kept records, crash-safely. Records of ids no longer in
    the job are first written (and synced) to a stale file beside it, whose path is returned; with
    --overwrite they are dropped instead."""
    path = Path(path)
    stale = None
    if plan.stale and not plan.overwrite:
        stale = stale_path_for(path)
        _write_atomically(stale, [raw + b"\n" for raw in plan.stale], what=f"the stale records of {path}")
    if plan.rewrite:
        _write_atomically(path, [raw + b"\n" for raw in plan.kept_lines], what=str(path))
    elif plan.torn:
        try:
            with open(path, "r+b") as f:
                f.truncate(plan.valid_end)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise OutputFileError(f"{path}: its torn last line cannot be cut off: {e.strerror or e}") from None
    return stale


def _write_atomically(path: Path, chunks: list[bytes], what: str) -> None:
    tmp = path.with_name(path.name + ".offbatch-tmp")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise OutputFileError(f"{what} cannot be written: {e.strerror or e}; the file is left as it was") from None
    _sync_dir(path.parent)


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


# ---- one run's output ---------------------------------------------------------------------------

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def job_key(model_dir: str | Path, dtype: str | None, defaults, weights: str | None = None, kv: str | None = None,
            hgca: str | None = None, ffn: str | None = None, predictors: str | None = None,
            kv_balance: bool = False) -> JobKey:
    """The JobKey of a run: the model folder's fingerprint, the compute dtype asked for (None: the
    checkpoint's own, which the fingerprint covers) with the weight format asked for (None: the
    folder's own, which config.json records), and the command-wide sampling defaults."""
    from offbatch.jobs.fingerprint import model_fingerprint

    values = {**defaults.values, "seed": defaults.base_seed}
    name = DTYPE_NAMES.get(dtype, dtype) if dtype else "checkpoint"
    if weights is not None:  # results in another format are other results (dense keys stay as they were)
        name += f" in {weights} weights"
    if (kv or "dense") != "dense" or hgca:  # lossy KV or attention: other results too
        from offbatch.cli.options import kv_words

        name += kv_words(kv, hgca)
        if kv_balance:
            from offbatch.cli.options import kv_balance_words

            name += kv_balance_words(model_dir)
    if ffn == "hybrid":  # predicted neurons: other results
        from offbatch.cli.options import ffn_words

        name += ffn_words(ffn, predictors, model_dir)
    return JobKey(model=model_fingerprint(model_dir), dtype=name, defaults=values)


def wanted_of(requests, errors, keys: dict[str, str]) -> dict[str, Wanted]:
    """id key -> Wanted for every id of the job: a ready request with its key, or a failing line (a
    later line that reuses an id never replaces the first one's entry)."""
    wanted: dict[str, Wanted] = {}
    for r in requests:
        key = json.dumps(r.id)
        wanted[key] = Wanted(r.line, r.input_hash, keys[key])
    for e in errors:
        wanted.setdefault(json.dumps(e.id), Wanted(e.line, e.input_hash, None, e.message))
    return wanted


class RunOutput:
    """The output of one run: a stream (written only) or a regular file (locked, resumed, cut back,
    headed). `path` is the file's real path (a symlinked output is locked and rewritten at its target)."""

    def __init__(self, output: str, *, overwrite: bool = False, redo_changed: bool = False,
                 keep_changed: bool = False):
        from offbatch.jobs.writer import ignore_file_size_signal, is_stream

        ignore_file_size_signal()  # before the first write of any file: header, stale records, results
        self.name = output
        self.stream = is_stream(output)
        self.path = None if self.stream else Path(os.path.realpath(output))
        self.overwrite, self.redo_changed, self.keep_changed = overwrite, redo_changed, keep_changed
        self.header: dict | None = None  # the job header found beside the file (read by plan())

    def lock(self, cleanup) -> None:
        """Take the output's lock until `cleanup` (a contextlib.ExitStack) closes; streams need none."""
        if self.path is not None:
            from offbatch.jobs.lock import OutputLock

            cleanup.enter_context(OutputLock(self.path))
            self._refuse_hard_links()

    def _refuse_hard_links(self) -> None:
        """The lock is taken by name, and a rewrite renames a new file over the name: a file with other
        names (hard links) could be written by a second run through another name at once, and would be
        split from them by the first rewrite. So such a file is refused."""
        try:
            links = os.stat(self.path).st_nlink
        except OSError:
            return  # not there yet
        if links > 1:
            raise OutputFileError(f"{self.name} has {links} hard links: offbatch locks an output by its name and "
                                  "rewrites it by rename, so two names of one file would not share the lock. "
                                  "Give a file with one name (copy it), or another -o")

    def plan(self, wanted: dict[str, Wanted], job: JobKey) -> ResumePlan:
        """What the file already answers; raises the OutputFileError that refuses it, if any."""
        if self.path is None:
            return ResumePlan()
        plan = plan_resume(self.path, wanted, keep_changed=self.keep_changed, overwrite=self.overwrite)
        self.header = read_header(self.path)
        check_resume(self.name, plan, job, self.header, redo_changed=self.redo_changed,
                     keep_changed=self.keep_changed)
        return plan

    def notes(self, plan: ResumePlan, job: JobKey) -> list[str]:
        """The warnings a run prints about what resume does to the file."""
        out, name = [], self.name
        if plan.torn:
            out.append(f"{name}: the last line was cut short (an earlier run died mid-write); it is redone")
        if plan.overwrite:
            gone = len(plan.foreign) + len(plan.stale) + len(plan.changed) + plan.mismatched + plan.dropped_duplicates
            if gone:
                out.append(f"{name}: --overwrite: {gone} line(s) that are not this job's results were removed")
            return out
        if plan.changed:
            out.append(f"{len(plan.changed)} request(s) changed since their results were written and are redone: "
                       f"{_ids(plan.changed, 10)}")
        if plan.mismatched:
            verb = "kept as they are (--keep-changed)" if self.keep_changed else "redone (--redo-changed)"
            out.append(f"{name}: {describe_mismatch(plan, job, self.header)}; they are {verb}")
        if plan.dropped_duplicates:
            out.append(f"{name}: {plan.dropped_duplicates} second result(s) for one id were removed")
        return out

    def apply(self, plan: ResumePlan, job: JobKey) -> list[str]:
        """Cut the file back (moving stale records aside) and write the job header; the notes to print."""
        if self.path is None:
            return []
        notes = []
        if plan.changed_any or plan.stale:
            stale = apply_resume(self.path, plan)
            if stale is not None:
                notes.append(f"{self.name}: {len(plan.stale)} result(s) of ids that are no longer in this job were "
                             f"moved to {stale}")
        header = job.header()
        if self.header != header:
            write_header(self.path, header)
        return notes
