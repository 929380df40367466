"""A corpus of hostile model folders, each run through the real `offbatch run` and `offbatch inspect`.

Every case starts from one tiny Llama written by `offbatch synth` (three shards and an index), breaks
one file the way a bad download, a bad converter or a hostile user would, and checks the outcome
its kind promises:

- "fatal": run and inspect both exit 3 with one line, "offbatch: error: ...", naming the problem;
  no traceback; the output file is never created (the folder is checked before any work);
- "line": the folder loads, but the chat template exceeds a render limit: the chat request gets an
  error record and exit 1, the plain prompt still gets its result (real engine); inspect exits 0;
- "weights": NaN/inf weights: run exits 3 when the reference engine reads them; inspect (which reads
  headers only, never a whole model) exits 0.

Before the one validation pass (models/files.py, spec.py's field table, loader.py's header and index
checks, chat_template.py's budgets) most of these crashed with a traceback (exit 1, as if some lines
had failed), hung (FIFOs), grew memory without bound (1e9 layers), read files outside the folder
(index names), passed inspect and crashed run (overlapping, negative, gapped data offsets), or gave
exit 0 with empty texts (NaN weights).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from pathlib import Path

import pytest
import torch
from jobs_support import read_jsonl, write_jsonl
from typer.testing import CliRunner

from offbatch.cli.main import app

SHARD1, SHARD2, SHARD3 = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile") / "base"
    r = CliRunner().invoke(app, ["synth", "llama", str(folder), "--seed", "5", "--shard-size", "200KB", "--quiet"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [SHARD1, SHARD2, SHARD3]
    return folder


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "p.jsonl", [
        {"id": "chat", "messages": [{"role": "user", "content": "hello"}]},
        {"id": "plain", "prompt": "hello world"},
    ])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---- ways to break a folder ----------------------------------------------------------------------
def edit_json(name: str, change):
    def corrupt(folder: Path):
        path = folder / name
        obj = json.loads(path.read_text())
        obj = change(obj) or obj
        path.write_text(json.dumps(obj))
    return corrupt


def set_config(**fields):
    return edit_json("config.json", lambda c: c.update(fields))


def write_file(name: str, data: bytes | str):
    def corrupt(folder: Path):
        path = folder / name
        path.unlink(missing_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return corrupt


def fifo(name: str):
    def corrupt(folder: Path):
        (folder / name).unlink()
        os.mkfifo(folder / name)
    return corrupt


def read_shard(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_shard(path: Path, header: dict | list | bytes, data: bytes, length: int | None = None) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def edit_header(change, shard: str = SHARD1):
    """Change the header of one shard (its data bytes stay as they are)."""
    def corrupt(folder: Path):
        header, data = read_shard(folder / shard)
        tensors = [k for k in header if k != "__metadata__"]
        header = change(header, tensors) or header
        write_shard(folder / shard, header, data)
    return corrupt


def set_offsets(which: int, begin, end):
    def change(header, tensors):
        header[tensors[which]]["data_offsets"] = [begin, end]
    return change


def first_two_overlap(header, tensors):
    """Tensor 1 starts inside tensor 0; every later tensor moves back by as much: sizes still right."""
    a, b = header[tensors[0]]["data_offsets"], header[tensors[1]]["data_offsets"]
    shift = (b[0] - a[0]) // 2
    for name in tensors[1:]:
        header[name]["data_offsets"] = [o - shift for o in header[name]["data_offsets"]]


def gap_after_first(header, tensors):
    """Tensor 1 and every later one move forward by 4 bytes: 4 bytes of nobody, the end past the file."""
    for name in tensors[1:]:
        header[name]["data_offsets"] = [o + 4 for o in header[name]["data_offsets"]]


def shift_all(n: int):
    def change(header, tensors):
        for name in tensors:
            header[name]["data_offsets"] = [o + n for o in header[name]["data_offsets"]]
    return change


def raw_header(text: bytes, length: int | None = None, shard: str = SHARD1):
    def corrupt(folder: Path):
        _, data = read_shard(folder / shard)
        write_shard(folder / shard, text, data, length)
    return corrupt


def edit_index(change):
    return edit_json(INDEX, lambda idx: change(idx))


def index_names(file_name: str, make=None):
    """The index puts the final norm in `file_name`; `make(folder)` first puts something there."""
    def corrupt(folder: Path):
        if make:
            make(folder)
        edit_index(lambda idx: idx["weight_map"].update({"model.norm.weight": file_name}))(folder)
    return corrupt


def outside_copy(folder: Path) -> None:
    """A copy of shard 3 next to the folder, outside it."""
    shutil.copy(folder / SHARD3, folder.parent / "outside.safetensors")


def link_out(folder: Path) -> None:
    outside_copy(folder)
    (folder / "link.safetensors").symlink_to(folder.parent / "outside.safetensors")


def tensor_twice(folder: Path) -> None:
    """model.norm.weight (in shard 3) also written into shard 1, with valid offsets: stored twice."""
    header3, data3 = read_shard(folder / SHARD3)
    begin, end = header3["model.norm.weight"]["data_offsets"]
    header1, data1 = read_shard(folder / SHARD1)
    at = len(data1)
    header1["model.norm.weight"] = dict(header3["model.norm.weight"], data_offsets=[at, at + end - begin])
    write_shard(folder / SHARD1, header1, data1 + data3[begin:end])


def index_wrong_shard(folder: Path) -> None:
    edit_index(lambda idx: idx["weight_map"].update({"model.norm.weight": SHARD1}))(folder)


def duplicate_index_key(folder: Path) -> None:
    text = (folder / INDEX).read_text()
    one = f'"model.norm.weight": "{SHARD3}"'
    assert one in text
    (folder / INDEX).write_text(text.replace(one, f'{one}, "model.norm.weight": "{SHARD1}"'))


def duplicate_header_key(folder: Path) -> None:
    header, data = read_shard(folder / SHARD1)
    text = json.dumps(header)
    name = next(k for k in header if k != "__metadata__")
    entry = json.dumps({name: header[name]})[1:-1]
    write_shard(folder / SHARD1, ("{" + entry + ", " + text[1:]).encode(), data)


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def weights_with(value: float):
    """One weight of model.norm.weight replaced by `value`, in place (header untouched)."""
    def corrupt(folder: Path):
        header, data = read_shard(folder / SHARD3)
        begin, _ = header["model.norm.weight"]["data_offsets"]
        raw = (folder / SHARD3).read_bytes()
        start = len(raw) - len(data) + begin
        (folder / SHARD3).write_bytes(raw[:start] + struct.pack("<f", value) + raw[start + 4 :])
    return corrupt


def template(text: str):
    return write_file("chat_template.jinja", text)


def no_jinja_then(change):
    """Without chat_template.jinja, tokenizer_config.json's chat_template is the template."""
    def corrupt(folder: Path):
        (folder / "chat_template.jinja").unlink()
        edit_json("tokenizer_config.json", change)(folder)
    return corrupt


def mixtral_of(layers: int, experts: int):
    return set_config(model_type="mixtral", num_hidden_layers=layers, num_local_experts=experts, num_experts_per_tok=2)


# ---- the corpus: (id, break the folder, expected outcome, a fragment of the message) ----------------
CASES = [
    # config.json: JSON of the wrong type, fields of the wrong type, zero and absurd values
    ("config-is-a-list", write_file("config.json", "[1, 2]"), "fatal", "must hold a JSON object"),
    ("config-not-utf8", write_file("config.json", b"\xff\xfe{}"), "fatal", "not UTF-8"),
    ("config-nested-1e5", write_file("config.json", deep_json(100_000)), "fatal", "nested too deeply"),
    ("config-fifo", fifo("config.json"), "fatal", "named pipe"),
    ("vocab-size-abc", set_config(vocab_size="abc"), "fatal", "'vocab_size' must be an integer"),
    ("layers-float", set_config(num_hidden_layers=2.0), "fatal", "'num_hidden_layers' must be an integer"),
    ("layers-1e9-float", write_file("config.json", '{"model_type": "llama", "vocab_size": 512, "hidden_size": 64, '
                                    '"num_hidden_layers": 1e9, "num_attention_heads": 4, "intermediate_size": 128}'),
     "fatal", "'num_hidden_layers' must be an integer from 1 to 1024"),
    ("layers-1e9-int", set_config(num_hidden_layers=10**9), "fatal", "from 1 to 1024, not the number 1000000000"),
    ("hidden-400-digits", set_config(hidden_size=10**400), "fatal", "'hidden_size' must be an integer"),
    ("vocab-2e40", set_config(vocab_size=2**40), "fatal", "'vocab_size' must be an integer from 1 to 16777216"),
    ("heads-bool", set_config(num_attention_heads=True), "fatal", "'num_attention_heads' must be an integer"),
    ("heads-zero", set_config(num_attention_heads=0), "fatal", "'num_attention_heads' must be an integer from 1"),
    ("hidden-negative", set_config(hidden_size=-64), "fatal", "'hidden_size' must be an integer from 1"),
    ("heads-not-dividing-hidden", set_config(num_attention_heads=6, num_key_value_heads=6), "fatal",
     "not a multiple of num_attention_heads"),
    ("kv-heads-not-dividing", set_config(num_key_value_heads=3), "fatal", "not a multiple of num_key_value_heads 3"),
    ("head-dim-odd", set_config(head_dim=15), "fatal", "head_dim 15 is odd"),
    ("rope-scaling-no-factor", set_config(rope_scaling={"rope_type": "linear"}), "fatal", "missing its 'factor'"),
    ("rope-scaling-a-string", set_config(rope_scaling="linear"), "fatal", "'rope_scaling' must be an object"),
    ("rope-factor-string", set_config(rope_scaling={"rope_type": "linear", "factor": "8"}), "fatal",
     "rope_scaling 'factor' must be a number"),
    ("rope-theta-nan", write_file("config.json", json.dumps({
        "model_type": "llama", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128, "rope_theta": float("nan")})), "fatal",
     "'rope_theta' must be a number"),
    ("eos-id-string", set_config(eos_token_id="2"), "fatal", "'eos_token_id' must be a token id or a list"),
    ("experts-1024x4096", mixtral_of(1024, 4096), "fatal", "limit of 65536 experts"),
    ("unknown-family", set_config(model_type="gpt_bigcode"), "fatal", "model_type 'gpt_bigcode' is not supported"),
    # the shard index
    ("index-absolute-path", index_names("/etc/passwd"), "fatal", "outside the model folder"),
    ("index-dotdot", index_names("../outside.safetensors", outside_copy), "fatal", "outside the model folder"),
    ("index-symlink-out", index_names("link.safetensors", link_out), "fatal", "outside the model folder"),
    ("index-file-a-number", index_names(5), "fatal", "which is not a file name"),
    ("index-is-a-list", write_file(INDEX, "[]"), "fatal", "must hold a JSON object"),
    ("index-weight-map-list", edit_index(lambda idx: idx.update(weight_map=[SHARD1])), "fatal",
     "'weight_map' must be an object"),
    ("index-tensor-listed-twice", duplicate_index_key, "fatal", "'model.norm.weight' appears twice"),
    ("index-names-wrong-shard", index_wrong_shard, "fatal", f"index.json says it is in {SHARD1}"),
    ("tensor-in-two-shards", tensor_twice, "fatal", "model.norm.weight is in two weight files"),
    ("index-fifo", fifo(INDEX), "fatal", "named pipe"),
    # safetensors headers
    ("header-length-2e40", raw_header(b"{}", length=2**40), "fatal", "over the 100,000,000-byte limit"),
    ("header-length-past-end", raw_header(b"{}", length=10**7), "fatal", "exceeds the file"),
    ("header-a-list", raw_header(b"[1, 2]"), "fatal", "header is not a JSON object"),
    ("header-not-json", raw_header(b"{not json"), "fatal", "header is not valid JSON"),
    ("header-tensor-twice", duplicate_header_key, "fatal", "appears twice"),
    ("header-metadata-numbers", edit_header(lambda h, t: h.update(__metadata__={"format": 1})), "fatal",
     "__metadata__ is not an object of strings"),
    ("offsets-strings", edit_header(lambda h, t: set_offsets(0, "0", "4")(h, t)), "fatal",
     "not a list of two integers"),
    ("offsets-negative", edit_header(lambda h, t: set_offsets(0, -4, h[t[0]]["data_offsets"][1] - 4)(h, t)),
     "fatal", "has the data_offsets [-4,"),
    ("offsets-overlapping", edit_header(first_two_overlap), "fatal", "overlaps the tensor before it"),
    ("offsets-gap", edit_header(gap_after_first), "fatal", "belong to no tensor"),
    ("offsets-past-the-file", edit_header(shift_all(10**6)), "fatal", "belong to no tensor"),
    ("dtype-unknown", edit_header(lambda h, t: h[t[0]].update(dtype="F17")), "fatal", "not a safetensors dtype"),
    ("shape-not-matching-bytes", edit_header(lambda h, t: h[t[0]].update(shape=[3])), "fatal",
     "its data_offsets give it"),
    ("shape-strings", edit_header(lambda h, t: h[t[0]].update(shape=["64"])), "fatal",
     "not a list of non-negative integers"),
    ("trailing-bytes", lambda f: (f / SHARD2).write_bytes((f / SHARD2).read_bytes() + b"\0" * 16), "fatal",
     "16 bytes after its last tensor"),
    ("shard-fifo", fifo(SHARD2), "fatal", "named pipe"),
    ("shard-a-folder", lambda f: ((f / SHARD2).unlink(), (f / SHARD2).mkdir()), "fatal", "is a folder"),
    ("shard-links-to-dev-zero", lambda f: ((f / SHARD2).unlink(), (f / SHARD2).symlink_to("/dev/zero")), "fatal",
     "outside the model folder"),
    # tokenizer files
    ("tokenizer-json-a-list", write_file("tokenizer.json", "[1, 2, 3]"), "fatal", "tokenizer.json cannot be read"),
    ("tokenizer-json-fifo", fifo("tokenizer.json"), "fatal", "named pipe"),
    ("tokenizer-config-a-list", write_file("tokenizer_config.json", "[]"), "fatal", "must hold a JSON object"),
    ("eos-token-a-number", edit_json("tokenizer_config.json", lambda c: c.update(eos_token=5)), "fatal",
     "'eos_token' must be a string"),
    ("eos-token-content-list", edit_json("tokenizer_config.json", lambda c: c.update(eos_token={"content": [1]})),
     "fatal", "'eos_token' must be a string"),
    ("add-bos-a-string", edit_json("tokenizer_config.json", lambda c: c.update(add_bos_token="false")), "fatal",
     "'add_bos_token' must be true or false"),
    ("generation-config-a-string", write_file("generation_config.json", '"greedy"'), "fatal",
     "must hold a JSON object"),
    ("generation-eos-a-string", edit_json("generation_config.json", lambda c: c.update(eos_token_id="2")), "fatal",
     "generation_config.json: 'eos_token_id' must be"),
    ("generation-eos-strings", edit_json("generation_config.json", lambda c: c.update(eos_token_id=["1", "2"])),
     "fatal", "generation_config.json: 'eos_token_id' must be"),
    ("generation-config-fifo", fifo("generation_config.json"), "fatal", "named pipe"),
    # chat templates: found at load (the job fails), or when a request renders it (that request fails)
    ("template-over-1mib", template("{# " + "x" * 2**20 + " #}"), "fatal", "limit for a chat template"),
    ("template-fifo", fifo("chat_template.jinja"), "fatal", "named pipe"),
    ("template-a-number", no_jinja_then(lambda c: c.update(chat_template=42)), "fatal",
     "'chat_template' must be a string"),
    ("template-list-of-numbers", no_jinja_then(lambda c: c.update(chat_template=[1, 2])), "fatal",
     "list of {'name', 'template'} objects"),
    ("render-range-1e9", template("{% for i in range(10**9) %}x{% endfor %}"), "line", "MAX_RANGE"),
    ("render-nested-loops", template("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                                     "{% endfor %}"), "line", "steps"),
    ("render-string-times-1e9", template("{{ 'a' * 10**9 }}"), "line", "characters"),
    ("render-doubling", template("{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
                                 "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"), "line", "characters"),
    ("render-huge-power", template("{{ 10 ** (10 ** 8) }}"), "line", "bits"),
    ("render-format-width", template("{{ '%999999999d' % 1 }}"), "line", "characters"),
    ("render-center", template("{{ 'x'.center(10**9) }}"), "line", "size over its limit"),
    # weights that are not numbers
    ("weights-nan", weights_with(float("nan")), "weights", "NaN or infinite"),
    ("weights-inf", weights_with(float("inf")), "weights", "NaN or infinite"),
]


def test_corpus_size():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def invoke(*args) -> tuple[int, str]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def assert_one_error_line(code: int, output: str, fragment: str) -> None:
    assert "Traceback" not in output, output
    assert code == 3, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("offbatch: error: "), output
    assert fragment in lines[0], output


class Unblock:
    """A guard against hangs on FIFOs: if a test still waits on one after a long while, open it for
    writing (which releases a blocked reader) and remember that it had to, so the test fails
    instead of hanging the suite."""

    def __init__(self, folder: Path, seconds: float = 60):
        self.fifos = [p for p in folder.iterdir() if p.is_fifo()]
        self.needed = False
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, args=(seconds,), daemon=True)

    def _watch(self, seconds):
        if self.done.wait(seconds):
            return
        for p in self.fifos:
            self.needed = True
            fd = os.open(p, os.O_RDWR)  # a writer: a blocked reader's open returns
            os.close(fd)

    def __enter__(self):
        if self.fifos:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()


@pytest.mark.parametrize("case_id, corrupt, outcome, fragment", CASES, ids=[c[0] for c in CASES])
def test_hostile_folder(base, prompts, tmp_path, case_id, corrupt, outcome, fragment):
    folder = tmp_path / "model"
    shutil.copytree(base, folder, symlinks=True)
    corrupt(folder)
    out = tmp_path / "out.jsonl"
    with Unblock(folder) as guard:
        inspect_code, inspect_output = invoke("inspect", folder)
        run_code, run_output = invoke("run", folder, prompts, "-o", out, "--quiet", "--max-tokens", "2")
    assert not guard.needed, "offbatch blocked on a FIFO"

    if outcome == "fatal":
        assert_one_error_line(inspect_code, inspect_output, fragment)
        assert_one_error_line(run_code, run_output, fragment)
        assert not out.exists()  # the folder is refused before the output is touched
    elif outcome == "weights":
        assert inspect_code == 0 and "Traceback" not in inspect_output, inspect_output
        assert_one_error_line(run_code, run_output, fragment)
        assert not out.exists()
    else:  # "line": only the chat request fails, as an error record
        assert inspect_code == 0 and "Traceback" not in inspect_output, inspect_output
        assert run_code == 1 and "Traceback" not in run_output, run_output
        records = {r["id"]: r for r in read_jsonl(out)}
        assert set(records) == {"chat", "plain"}
        assert records["plain"]["error"] is None and records["plain"]["completion_tokens"] == 2
        assert fragment in records["chat"]["error"]["message"], records["chat"]


def test_base_folder_runs(base, prompts, tmp_path):
    """The untouched base folder passes both commands: every failure above is the corruption's."""
    code, output = invoke("inspect", base, "--json")
    assert code == 0, output
    report = json.loads(output)
    assert report["tokenizer"]["chat_template"] and report["layers"] == 2
    code, output = invoke("run", base, prompts, "-o", tmp_path / "out.jsonl", "--quiet", "--max-tokens", "2")
    assert code == 0, output
    assert [r["error"] for r in read_jsonl(tmp_path / "out.jsonl")] == [None, None]
