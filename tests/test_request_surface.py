"""Every request field through the real `offbatch run` (typer CliRunner, in process) on BOTH engines
(the reference generator and the streaming engine, on the CPU), asserted on values that this file
computes independently: the reference model's full-recompute logits for every prefix, and the sampling
rules re-derived here in float64 (inverse-CDF draw from the request's seeded torch.Generator, the
filters, the penalties by hand).

One eos-happy tiny Llama (its eos is the first token it would say) and one job file cover most fields
at once; min_tokens (which crashed both engines on the CPU), n > 1, logprobs in all three shapes,
skip_special_tokens, chat_template_kwargs, and a model with a NaN weight get their own runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from jobs_support import read_jsonl, write_jsonl
from typer.testing import CliRunner

from offbatch.cli.main import app
from offbatch.engine.reference import ReferenceModel
from offbatch.models.tokenizer import load_tokenizer

ENGINES = ["reference", "streaming"]
P1 = "the sky is blue and the sea is"  # greedy continuation without repeats
P2 = "a a a a a"  # greedy continuation that repeats: penalties change it
NONFINITE = "the model produced non-finite logits (NaN/Inf) at token 1: its weights or the compute dtype are broken"
THINKING_TEMPLATE = (
    "{%- if enable_thinking is defined and not enable_thinking %}<|im_start|>system\nanswer at once<|im_end|>\n"
    "{%- endif %}{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def synth(folder: Path) -> Path:
    r = CliRunner().invoke(app, ["synth", "llama", str(folder), "--seed", "3", "--quiet"])
    assert r.exit_code == 0, r.output
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("surface") / "m")


class Oracle:
    """Independent expectations from the reference model's logits of whole prefixes (no KV cache)."""

    def __init__(self, folder: Path):
        self.ref = ReferenceModel.load(folder, dtype="float32")
        self.tok = load_tokenizer(folder)
        self.eos = tuple(self.tok.eos_token_ids)

    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.ref.forward([self.ref.new_cache(len(ids) + 1)], [list(ids)])[0].double()

    def continuation(self, prompt: list[int], n: int, *, ignore_eos=True, bias=None, frequency=0.0, presence=0.0,
                     repetition=1.0, min_tokens=0, temperature=0.0, seed=None, top_k=0, top_p=1.0,
                     min_p=0.0) -> list[int]:
        """The completion's token ids (a closing eos dropped), by the rules the README gives."""
        rng = torch.Generator().manual_seed(seed) if temperature > 0 else None
        out: list[int] = []
        for _ in range(n):
            x = self.logits(prompt + out).clone()
            for t, b in (bias or {}).items():
                x[t] += b
            if len(out) < min_tokens and not ignore_eos:
                x[list(self.eos)] = -math.inf
            if repetition != 1.0:
                seen = sorted(set(prompt + out))
                x[seen] = torch.where(x[seen] > 0, x[seen] / repetition, x[seen] * repetition)
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=len(x)).double()
            x -= frequency * counts + presence * (counts > 0).double()
            if temperature == 0:
                token = int(x.argmax())
            else:
                token = self.draw(x / temperature, rng, top_k, top_p, min_p)
            if not ignore_eos and token in self.eos:
                break
            out.append(token)
        return out

    @staticmethod
    def draw(x, rng, top_k, top_p, min_p) -> int:
        p, order = torch.softmax(x, 0).sort(descending=True, stable=True)
        keep = torch.ones_like(p, dtype=torch.bool)
        if top_k > 0:
            keep[top_k:] = False
        p = torch.where(keep, p, 0.0)
        p = p / p.sum()
        if top_p < 1.0:
            keep &= (p.cumsum(0) - p) < top_p
        if min_p > 0:
            keep &= p >= min_p * p[0]
        p = torch.where(keep, p, 0.0)
        u = torch.rand(1, generator=rng, dtype=torch.float64).item()  # one uniform number per step
        cdf = p.cumsum(0)
        return int(order[int((cdf <= u * cdf[-1]).sum())])

    def logprobs(self, prompt: list[int], ids: list[int], k: int) -> list[tuple[float, list[int], list[float]]]:
        """(log-prob of each token, ids of the k likeliest, their log-probs) under the raw logits."""
        out = []
        for i, t in enumerate(ids):
            lp = self.logits(prompt + ids[:i]).log_softmax(0)
            top = lp.topk(k) if k else None
            out.append((lp[t].item(), top.indices.tolist() if k else [], top.values.tolist() if k else []))
        return out


@pytest.fixture(scope="module")
def eos_happy(base, tmp_path_factory):
    """The base weights, with eos = the first token greedy decoding says after P1 (so P1 without
    ignore_eos gives an empty text), and a chat template that reads enable_thinking."""
    folder = tmp_path_factory.mktemp("eos_happy") / "m"
    folder.mkdir()
    for f in base.iterdir():
        if f.name not in ("generation_config.json", "chat_template.jinja"):
            (folder / f.name).symlink_to(f)
    tok = load_tokenizer(base)
    first = Oracle(base).continuation(tok.encode(P1), 1)[0]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [first]}))
    (folder / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    oracle = Oracle(folder)
    assert first in oracle.eos
    return folder, oracle


def run(*args) -> CliRunner:
    return CliRunner().invoke(app, ["run", *map(str, args)])


def by_id(path: Path) -> dict:
    return {r.get("custom_id", r.get("id")): r for r in read_jsonl(path)}


CHAT = [{"role": "user", "content": "why is the sky blue"}]


def job_lines(tok, greedy: list[int]) -> list[dict]:
    """greedy: the plain greedy continuation of P1 (its fourth token becomes a stop token id)."""
    special = 1  # <|im_start|>: a special token that is no eos
    word = tok.encode(" sky", add_special_tokens=False)[0]
    return [
        {"id": "greedy", "prompt": P1, "max_tokens": 8, "ignore_eos": True, "logprobs": 3},
        {"id": "eos", "prompt": P1, "max_tokens": 8},
        {"id": "min3", "prompt": P1, "max_tokens": 8, "min_tokens": 3, "logprobs": 0},
        {"id": "max5", "prompt": P1, "max_tokens": 5, "ignore_eos": True},
        {"id": "stopid", "prompt": P1, "max_tokens": 8, "ignore_eos": True, "stop_token_ids": [greedy[3]]},
        {"id": "bias", "prompt": P1, "max_tokens": 3, "ignore_eos": True, "logit_bias": {str(word): 100}},
        {"id": "freq", "prompt": P2, "max_tokens": 8, "ignore_eos": True, "frequency_penalty": 1.5, "logprobs": 0},
        {"id": "pres", "prompt": P2, "max_tokens": 8, "ignore_eos": True, "presence_penalty": 1.5, "logprobs": 0},
        {"id": "rep", "prompt": P2, "max_tokens": 8, "ignore_eos": True, "repetition_penalty": 1.8, "logprobs": 0},
        {"id": "p2", "prompt": P2, "max_tokens": 8, "ignore_eos": True, "logprobs": 0},
        {"id": "t1", "prompt": P1, "max_tokens": 8, "ignore_eos": True, "temperature": 1.0, "seed": 7, "logprobs": 0},
        {"id": "t1again", "prompt": P1, "max_tokens": 8, "ignore_eos": True, "temperature": 1.0, "seed": 7},
        {"id": "topk", "prompt": P1, "max_tokens": 8, "ignore_eos": True, "temperature": 0.7, "top_k": 3, "seed": 9,
         "logprobs": 0},
        {"id": "topp", "prompt": P1, "max_tokens": 8, "ignore_eos": True, "temperature": 1.0, "top_p": 0.5, "seed": 5,
         "logprobs": 0},
        {"id": "minp", "prompt": P1, "max_tokens": 8, "ignore_eos": True, "temperature": 1.0, "min_p": 0.3, "seed": 5,
         "logprobs": 0},
        {"id": "n1", "prompt": P2, "max_tokens": 6, "ignore_eos": True, "temperature": 1.0, "seed": 11},
        {"id": "n3", "prompt": P2, "max_tokens": 6, "ignore_eos": True, "temperature": 1.0, "seed": 11, "n": 3,
         "logprobs": 1},
        {"id": "n2greedy", "prompt": P1, "max_tokens": 4, "ignore_eos": True, "n": 2},
        {"id": "special", "prompt": P1, "max_tokens": 2, "ignore_eos": True, "logit_bias": {str(special): 100},
         "skip_special_tokens": False},
        {"id": "skipped", "prompt": P1, "max_tokens": 2, "ignore_eos": True, "logit_bias": {str(special): 100}},
        {"id": "think", "messages": CHAT, "chat_template_kwargs": {"enable_thinking": False}, "max_tokens": 4,
         "ignore_eos": True},
        {"id": "nothink", "messages": CHAT, "max_tokens": 4, "ignore_eos": True},
        {"custom_id": "oc", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", "messages": CHAT, "max_tokens": 6, "ignore_eos": True, "logprobs": True,
                  "top_logprobs": 2, "n": 2}},
        {"custom_id": "ok", "method": "POST", "url": "/v1/completions",
         "body": {"model": "m", "prompt": P2, "max_tokens": 6, "ignore_eos": True, "logprobs": 2}},
    ]


@pytest.fixture(scope="module", params=ENGINES)
def job(request, eos_happy, tmp_path_factory):
    """The job file run once per engine: (engine, records by id, oracle, the lines)."""
    folder, oracle = eos_happy
    greedy = oracle.continuation(oracle.tok.encode(P1), 8)
    assert greedy[3] not in greedy[:3]
    lines = job_lines(oracle.tok, greedy)
    tmp = tmp_path_factory.mktemp("job_" + request.param)
    out = tmp / "out.jsonl"
    r = run(folder, write_jsonl(tmp / "p.jsonl", lines), "-o", out, "--engine", request.param, "--max-batch", 5,
            "--quiet")
    assert r.exit_code == 0, r.output
    recs = by_id(out)
    assert len(recs) == len(lines) and all(rec["error"] is None for rec in recs.values())
    return request.param, recs, oracle, {x.get("id", x.get("custom_id")): x for x in lines}


def ids_of(rec) -> list[int]:
    return [t["id"] for t in rec["logprobs"]]


def test_greedy_logprobs_are_log_softmax_of_the_reference_logits(job):
    _, recs, oracle, _ = job
    prompt = oracle.tok.encode(P1)
    rec = recs["greedy"]
    ids = ids_of(rec)
    assert ids == oracle.continuation(prompt, 8)
    assert rec["text"] == oracle.tok.decode(ids) and rec["finish_reason"] == "length"
    for got, (lp, top_ids, top_lps) in zip(rec["logprobs"], oracle.logprobs(prompt, ids, 3)):
        assert got["logprob"] == pytest.approx(lp, abs=1e-4)
        assert [t["id"] for t in got["top_logprobs"]] == top_ids
        assert [t["logprob"] for t in got["top_logprobs"]] == pytest.approx(top_lps, abs=1e-4)
        assert got["token"] == oracle.tok.decode([got["id"]], skip_special_tokens=False)


def test_max_tokens_stop_token_ids_and_eos(job):
    _, recs, oracle, _ = job
    greedy = oracle.continuation(oracle.tok.encode(P1), 8)
    assert (recs["max5"]["text"], recs["max5"]["completion_tokens"]) == (oracle.tok.decode(greedy[:5]), 5)
    assert recs["max5"]["finish_reason"] == "length"
    assert (recs["stopid"]["text"], recs["stopid"]["finish_reason"]) == (oracle.tok.decode(greedy[:3]), "stop")
    # The model's first word is its eos: without ignore_eos the completion is empty.
    assert (recs["eos"]["text"], recs["eos"]["finish_reason"], recs["eos"]["completion_tokens"]) == ("", "stop", 0)


def test_min_tokens_holds_eos_back(job):
    """The original crash (in-place write into an inference tensor): now >= 3 tokens, exactly the
    greedy choice with eos banned for the first three."""
    _, recs, oracle, _ = job
    prompt = oracle.tok.encode(P1)
    want = oracle.continuation(prompt, 8, ignore_eos=False, min_tokens=3)
    assert len(want) >= 3 and ids_of(recs["min3"]) == want
    assert recs["min3"]["completion_tokens"] == len(want)
    # Its logprobs stay the raw ones: eos was the likeliest, and the first token's logprob says so.
    assert recs["min3"]["logprobs"][0]["logprob"] < oracle.logits(prompt).log_softmax(0).max().item()


def test_logit_bias_forces_a_token(job):
    _, recs, oracle, lines = job
    word = int(next(iter(lines["bias"]["logit_bias"])))
    assert recs["bias"]["text"] == oracle.tok.decode([word] * 3)


@pytest.mark.parametrize("rid, rule", [("freq", dict(frequency=1.5)), ("pres", dict(presence=1.5)),
                                       ("rep", dict(repetition=1.8))])
def test_penalties_change_the_greedy_continuation_as_computed_by_hand(job, rid, rule):
    _, recs, oracle, _ = job
    prompt = oracle.tok.encode(P2)
    plain = oracle.continuation(prompt, 8)
    assert ids_of(recs["p2"]) == plain
    want = oracle.continuation(prompt, 8, **rule)
    assert want != plain  # the penalty matters here
    assert ids_of(recs[rid]) == want


@pytest.mark.parametrize("rid, rule", [("t1", dict(temperature=1.0, seed=7)),
                                       ("topk", dict(temperature=0.7, top_k=3, seed=9)),
                                       ("topp", dict(temperature=1.0, top_p=0.5, seed=5)),
                                       ("minp", dict(temperature=1.0, min_p=0.3, seed=5))])
def test_seeded_sampling_is_the_inverse_cdf_draw_of_the_seed(job, rid, rule):
    _, recs, oracle, _ = job
    prompt = oracle.tok.encode(P1)
    assert ids_of(recs[rid]) == oracle.continuation(prompt, 8, **rule)


def test_same_seed_same_text_and_sampling_really_samples(job):
    _, recs, oracle, _ = job
    assert recs["t1"]["text"] == recs["t1again"]["text"]
    assert ids_of(recs["t1"]) != oracle.continuation(oracle.tok.encode(P1), 8)


def test_n_choices_have_their_own_seeds_and_choice_0_is_n_1(job):
    _, recs, oracle, _ = job
    n1, n3 = recs["n1"], recs["n3"]
    assert n1["text"] == oracle.tok.decode(oracle.continuation(oracle.tok.encode(P2), 6, temperature=1.0, seed=11))
    choices = n3["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert choices[0]["text"] == n1["text"] == n3["text"]
    assert len({c["text"] for c in choices}) == 3  # three seed streams
    assert n3["completion_tokens"] == sum(c["completion_tokens"] for c in choices) == 18
    assert all(len(c["logprobs"]) == 6 for c in choices) and n3["logprobs"] == choices[0]["logprobs"]
    # Each choice's logprobs belong to its own tokens.
    for c in choices:
        ids = [t["id"] for t in c["logprobs"]]
        assert c["text"] == oracle.tok.decode(ids)
    greedy = recs["n2greedy"]["choices"]
    assert len(greedy) == 2 and greedy[0]["text"] == greedy[1]["text"]  # as OpenAI does


def test_skip_special_tokens(job):
    _, recs, oracle, _ = job
    assert recs["special"]["text"] == "<|im_start|><|im_start|>"
    assert recs["skipped"]["text"] == "" and recs["skipped"]["completion_tokens"] == 2


def test_chat_template_kwargs_reach_the_template(job):
    _, recs, oracle, _ = job
    think = oracle.tok.encode_chat(CHAT, enable_thinking=False)
    plain = oracle.tok.encode_chat(CHAT)
    assert len(think) > len(plain)
    assert recs["think"]["prompt_tokens"] == len(think) and recs["nothink"]["prompt_tokens"] == len(plain)
    assert recs["think"]["text"] == oracle.tok.decode(oracle.continuation(think, 4))


def test_openai_chat_logprobs_shape_and_values(job):
    _, recs, oracle, _ = job
    rec = recs["oc"]
    assert rec["error"] is None and rec["response"]["status_code"] == 200
    body = rec["response"]["body"]
    prompt = oracle.tok.encode_chat(CHAT)
    ids = oracle.continuation(prompt, 6)
    expected = oracle.logprobs(prompt, ids, 2)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] == 12
    for choice in body["choices"]:
        assert set(choice) == {"index", "message", "logprobs", "finish_reason"}
        assert choice["message"]["content"] == oracle.tok.decode(ids)
        content = choice["logprobs"]["content"]
        assert set(choice["logprobs"]) == {"content", "refusal"}
        for entry, tid, (lp, top_ids, top_lps) in zip(content, ids, expected, strict=True):
            assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
            assert entry["logprob"] == pytest.approx(lp, abs=1e-4)
            assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(top_lps, abs=1e-4)
            assert all(set(t) == {"token", "logprob", "bytes"} for t in entry["top_logprobs"])
        # The bytes are the text's bytes, token by token (a token may hold part of a character).
        shown = b"".join(bytes(e["bytes"]) for e, t in zip(content, ids) if oracle.tok.decode([t]) != "")  # specials
        assert shown.decode("utf-8", errors="replace") == choice["message"]["content"]


def test_openai_completions_logprobs_shape_and_values(job):
    _, recs, oracle, _ = job
    choice = recs["ok"]["response"]["body"]["choices"][0]
    prompt = oracle.tok.encode(P2)
    ids = oracle.continuation(prompt, 6)
    text = choice["text"]
    assert text == oracle.tok.decode(ids)
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 6
    for i, (value, top, (want, _, top_lps)) in enumerate(zip(lp["token_logprobs"], lp["top_logprobs"],
                                                            oracle.logprobs(prompt, ids, 2))):
        assert value == pytest.approx(want, abs=1e-4)
        assert sorted(top.values(), reverse=True) == pytest.approx(top_lps, abs=1e-4)
    # Each whole-character token sits in the text where text_offset says.
    for token, offset in zip(lp["tokens"], lp["text_offset"]):
        if "\ufffd" not in token:
            assert text[offset:offset + len(token)] == token
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_min_tokens_flag_runs_on_both_engines(eos_happy, tmp_path, engine):
    """The issue's reproduction: `--min-tokens 1` crashed both engines on the CPU."""
    folder, oracle = eos_happy
    out = tmp_path / "o.jsonl"
    r = run(folder, write_jsonl(tmp_path / "p.jsonl", [{"id": "x", "prompt": P1}]), "-o", out, "--min-tokens", 2,
            "--max-tokens", 6, "--engine", engine, "--quiet")
    assert r.exit_code == 0, r.output
    [rec] = read_jsonl(out)
    want = oracle.continuation(oracle.tok.encode(P1), 6, ignore_eos=False, min_tokens=2)
    assert len(want) >= 2 and rec["text"] == oracle.tok.decode(want)


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """A tiny Llama whose weights are all finite (so the folder passes validation, which rejects NaN
    and Inf weights) but one FFN row of 3e38 overflows float32: the hidden state becomes Inf, the
    norm turns it into NaN, and every logit is NaN - a broken compute dtype in miniature."""
    from safetensors.torch import load_file, save_file

    folder = synth(tmp_path_factory.mktemp("overflow") / "m")
    path = folder / "model.safetensors"
    weights = load_file(path)
    name = next(k for k in weights if k.endswith("layers.0.mlp.down_proj.weight"))
    weights[name][0, :] = 3e38
    save_file(weights, str(path), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("engine", ENGINES)
def test_non_finite_logits_give_error_records_and_exit_1(poisoned, tmp_path, engine):
    """Before: exit 0 and empty "ok" texts (argmax of NaN is token 0, an eos)."""
    rows = [{"id": "a", "prompt": P1}, {"id": "b", "prompt": P2, "temperature": 1.0, "logprobs": 2, "n": 2},
            {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
             "body": {"messages": CHAT, "max_tokens": 4}}]
    out = tmp_path / "o.jsonl"
    r = run(poisoned, write_jsonl(tmp_path / "p.jsonl", rows), "-o", out, "--max-tokens", 4, "--engine", engine,
            "--quiet")
    assert r.exit_code == 1, r.output
    recs = by_id(out)
    assert set(recs) == {"a", "b", "c"}
    for line, rid in enumerate(["a", "b", "c"], start=1):
        assert recs[rid]["error"] == {"code": "generation_failed", "message": NONFINITE, "line": line}
    assert recs["a"]["text"] is None
    assert recs["c"]["response"]["status_code"] == 500
    assert recs["c"]["response"]["body"]["error"]["code"] == "generation_failed"
