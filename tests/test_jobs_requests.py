"""offbatch/jobs/requests.py and params.py: the three input shapes, per-line fields, every bad-line case,
and where default sampling values come from."""

import json

import pytest
from jobs_support import EOS, VOCAB, write_tokenizer

from offbatch.jobs.params import ParamError, build_params, line_overrides, request_seed, resolve_defaults, validate
from offbatch.jobs.requests import LineError, Request, find_duplicates, parse_line, prepare, read_input
from offbatch.errors import InputFileError
from offbatch.models.tokenizer import load_tokenizer


def parse(obj, line=1):
    return parse_line(line, (obj if isinstance(obj, str) else json.dumps(obj)).encode())


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder)
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def tok_no_template(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok_plain")
    write_tokenizer(folder, chat_template=None)
    return load_tokenizer(folder)


# ---- shapes and ids -----------------------------------------------------------------------------

def test_plain_prompt_with_sampling_fields():
    r = parse({"prompt": "the sky", "max_tokens": 7, "temperature": 0.5, "stop": "end", "seed": 3, "extra": 1}, 4)
    assert isinstance(r, Request)
    assert (r.id, r.shape, r.endpoint, r.prompt, r.messages) == (4, "plain", "completion", "the sky", None)
    assert r.overrides == {"max_tokens": 7, "temperature": 0.5, "stop": ("end",), "seed": 3}


def test_chat_messages_and_text_parts():
    r = parse({"id": "c", "messages": [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": [{"type": "text", "text": "hi"},
                                                                    {"type": "text", "text": "there"}]}]})
    assert (r.id, r.endpoint) == ("c", "chat")
    assert r.messages[1]["content"] == "hi\nthere"


def test_openai_batch_lines():
    chat = parse({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "m", "messages": [{"role": "user", "content": "x"}],
                           "max_completion_tokens": 9, "max_tokens": 100, "n": 1}})
    assert (chat.id, chat.shape, chat.endpoint, chat.overrides) == ("a", "openai", "chat", {"max_tokens": 9})
    comp = parse({"custom_id": 7, "url": "/v1/completions", "body": {"prompt": ["one two"], "top_k": 5}})
    assert (comp.id, comp.endpoint, comp.prompt, comp.overrides) == (7, "completion", "one two", {"top_k": 5})


def test_id_then_custom_id_then_line_number():
    assert parse({"prompt": "x", "id": "a"}).id == "a"
    assert parse({"prompt": "x", "custom_id": "b"}).id == "b"
    assert parse({"prompt": "x"}, line=12).id == 12


def test_null_fields_count_as_absent():
    assert parse({"prompt": "x", "temperature": None, "stop": None}).overrides == {}


def test_content_hash_ignores_key_order_and_spacing_but_not_content():
    a = parse('{"prompt": "x", "id": 1}')
    b = parse('{ "id":1,"prompt":"x" }')
    c = parse('{"prompt": "y", "id": 1}')
    assert a.input_hash == b.input_hash != c.input_hash


# ---- bad lines ----------------------------------------------------------------------------------

BAD = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ({"id": "x"}, "no prompt"),
    ({"prompt": 5}, "prompt must be a string"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "either prompt or messages"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"content": "x"}]}, "string role"),
    ({"messages": [{"role": "user"}]}, "no content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "only text"),
    ({"prompt": "x", "id": [1]}, "id must be a string or an integer"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens must be >= 1"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens must be an integer"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens must be an integer"),
    ({"prompt": "x", "temperature": -0.1}, "temperature must be >= 0"),
    ({"prompt": "x", "temperature": True}, "temperature must be a number"),
    ({"prompt": "x", "top_p": 0}, "top_p must be in (0, 1]"),
    ({"prompt": "x", "top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"prompt": "x", "top_k": -2}, "top_k must be >= 0"),
    ({"prompt": "x", "min_p": 2}, "min_p must be in [0, 1]"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty must be > 0"),
    ({"prompt": "x", "seed": 2**70}, "seed must be a 64-bit integer"),
    ({"prompt": "x", "stop": ""}, "must not be empty"),
    ({"prompt": "x", "stop": [1]}, "stop must be a string or a list"),
    ({"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids must be >= 0"),
    ({"prompt": "x", "stop_token_ids": 3}, "stop_token_ids must be a list"),
    ({"prompt": "x", "ignore_eos": "yes"}, "ignore_eos must be true or false"),
    ({"prompt": "x", "n": 2}, "n must be 1"),
    ({"custom_id": "a", "url": "/v1/embeddings", "body": {"input": "x"}}, "unknown url"),
    ({"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}}, "method must be POST"),
    ({"custom_id": "a", "url": "/v1/completions", "body": "x"}, "body must be a JSON object"),
    ({"custom_id": "a", "url": "/v1/completions", "body": {"messages": [{"role": "user", "content": "x"}]}},
     "needs a prompt"),
    ({"custom_id": "a", "url": "/v1/chat/completions", "body": {"prompt": "x"}}, "needs messages"),
    ({"custom_id": "a", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}],
                                                               "temperature": "hot"}}, "temperature must be a number"),
]


@pytest.mark.parametrize("line,reason", BAD, ids=[r for _, r in BAD])
def test_bad_line_becomes_error(line, reason):
    err = parse(line, 5)
    assert isinstance(err, LineError)
    assert err.line == 5 and reason in err.message, err.message


def test_error_keeps_id_and_shape_when_readable():
    err = parse({"custom_id": "q", "url": "/v1/nope", "body": {}})
    assert (err.id, err.shape) == ("q", "openai")
    assert parse("garbage", 3).id == 3


def test_not_utf8_line():
    err = parse_line(2, b'{"prompt": "\xff\xfe"}')
    assert isinstance(err, LineError) and "UTF-8" in err.message


def test_read_input_skips_blank_lines_and_bom(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n\n   \n{"prompt": "b"}')
    assert [n for n, _ in read_input(p)] == [1, 4]
    assert parse_line(1, read_input(p)[0][1]).prompt == "a"


def test_unreadable_input_is_fatal(tmp_path):
    with pytest.raises(InputFileError, match="no such file"):
        read_input(tmp_path / "missing.jsonl")
    with pytest.raises(InputFileError, match="folder"):
        read_input(tmp_path)


def test_duplicate_ids_reported_on_later_lines():
    reqs = [parse({"prompt": "x", "id": "a"}, 1), parse({"prompt": "y", "id": "b"}, 2),
            parse({"prompt": "z", "id": "a"}, 3), parse({"prompt": "w"}, 4), parse({"prompt": "v", "id": 4}, 5)]
    dups = find_duplicates(reqs)
    assert [(e.line, e.id) for e in dups] == [(3, "a"), (5, 4)]
    assert "first used on line 1" in dups[0].message


# ---- preparing against a model ------------------------------------------------------------------

def defaults(**flags):
    return resolve_defaults({}, flags)


def test_prepare_tokenizes_and_builds_params(tok):
    r = parse({"prompt": "the sky is blue", "max_tokens": 5, "temperature": 0.7, "stop": ["sea"]})
    assert prepare(r, tok, defaults(top_k=4), context=64, vocab_size=len(VOCAB)) is None
    assert list(r.prompt_ids) == tok.encode("the sky is blue")
    p = r.params
    assert (p.max_tokens, p.temperature, p.top_k, p.seed) == (5, 0.7, 4, request_seed(0, 1))
    assert r.stop == ("sea",)


def test_prepare_chat_uses_template(tok, tok_no_template):
    r = parse({"messages": [{"role": "user", "content": "hello world"}]})
    assert prepare(r, tok, defaults(), 64, len(VOCAB)) is None
    assert list(r.prompt_ids) == tok.encode_chat([{"role": "user", "content": "hello world"}])
    r = parse({"messages": [{"role": "user", "content": "hello"}]})
    err = prepare(r, tok_no_template, defaults(), 64, len(VOCAB))
    assert isinstance(err, LineError) and "chat template" in err.message


def test_prompt_longer_than_context(tok):
    long = parse({"prompt": " ".join(["sky"] * 70)}, 9)
    err = prepare(long, tok, defaults(), context=64, vocab_size=len(VOCAB))
    assert err.line == 9 and "71 tokens" in err.message and "context is 64" in err.message


def test_max_tokens_clipped_to_context(tok):
    r = parse({"prompt": " ".join(["sky"] * 59), "max_tokens": 50, "min_tokens": 20})
    assert prepare(r, tok, defaults(), context=64, vocab_size=len(VOCAB)) is None
    assert (r.params.max_tokens, r.params.min_tokens) == (4, 4)


def test_token_ids_checked_against_vocab(tok):
    assert prepare(parse({"prompt": [1, 5, 9]}), tok, defaults(), 64, len(VOCAB)) is None
    err = prepare(parse({"prompt": [1, 500]}), tok, defaults(), 64, len(VOCAB))
    assert "token id 500 is out of range" in err.message
    err = prepare(parse({"prompt": "x", "stop_token_ids": [EOS, 999]}), tok, defaults(), 64, len(VOCAB))
    assert "token id 999" in err.message


def test_min_tokens_above_max_tokens(tok):
    err = prepare(parse({"prompt": "sky", "max_tokens": 2, "min_tokens": 3}), tok, defaults(), 64, len(VOCAB))
    assert "min_tokens (3) must not exceed max_tokens (2)" in err.message


# ---- defaults -----------------------------------------------------------------------------------

def test_generation_config_then_flags_then_line():
    gen = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 100, "repetition_penalty": 1.1}
    d = resolve_defaults(gen, {"top_p": 0.5, "max_tokens": None})
    assert d.values["temperature"] == 0.6 and d.sources["temperature"] == "generation_config.json"
    assert d.values["top_p"] == 0.5 and d.sources["top_p"] == "flag"
    assert d.values["max_tokens"] == 100 and d.values["repetition_penalty"] == 1.1
    assert d.sources["top_k"] == "default"
    params, _ = build_params(d, line_overrides({"temperature": 0.0}), "x")
    assert (params.temperature, params.top_p, params.max_tokens) == (0.0, 0.5, 100)
    text = d.describe()
    assert "from flags: top_p=0.5" in text and "from generation_config.json: max_tokens=100" in text


def test_do_sample_false_or_absent_means_greedy():
    d = resolve_defaults({"temperature": 0.6, "top_p": 0.9}, {})
    assert d.values["temperature"] == 0.0 and d.values["top_p"] == 1.0
    assert any("do_sample" in why for why in d.ignored)
    d = resolve_defaults({"do_sample": False, "temperature": 0.6}, {})
    assert d.values["temperature"] == 0.0 and "do_sample=false" in d.sources["temperature"]


def test_bad_generation_config_values_are_ignored_not_fatal():
    d = resolve_defaults({"do_sample": True, "top_p": 7}, {})
    assert d.values["top_p"] == 1.0 and "top_p" in d.ignored[0]


def test_bad_flag_raises():
    with pytest.raises(ParamError):
        resolve_defaults({}, {"temperature": -1})
    with pytest.raises(ParamError):
        validate("top_p", 0)


def test_request_seed_depends_on_base_and_id_only():
    assert request_seed(0, "a") == request_seed(0, "a")
    assert len({request_seed(0, "a"), request_seed(1, "a"), request_seed(0, "b"), request_seed(0, 1),
                request_seed(0, "1")}) == 5
    d = resolve_defaults({}, {"seed": 5})
    assert build_params(d, {}, "a")[0].seed == request_seed(5, "a")
    assert build_params(d, {"seed": 9}, "a")[0].seed == 9
