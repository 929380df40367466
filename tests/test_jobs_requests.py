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
    ({"prompt": "x", "temperature": -0.1}, "temperature must be in [0, 100]"),
    ({"prompt": "x", "temperature": True}, "temperature must be a number"),
    ({"prompt": "x", "top_p": 0}, "top_p must be in (0, 1]"),
    ({"prompt": "x", "top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"prompt": "x", "top_k": -2}, "top_k must be >= 0"),
    ({"prompt": "x", "min_p": 2}, "min_p must be in [0, 1]"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty must be in [0.01, 100]"),
    ({"prompt": "x", "seed": 2**70}, "seed must be a 64-bit integer"),
    ({"prompt": "x", "stop": ""}, "must not be empty"),
    ({"prompt": "x", "stop": [1]}, "stop must be a string or a list"),
    ({"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids must be >= 0"),
    ({"prompt": "x", "stop_token_ids": 3}, "stop_token_ids must be a list"),
    ({"prompt": "x", "ignore_eos": "yes"}, "ignore_eos must be true or false"),
    ({"prompt": "x", "n": 0}, "n must be in [1, 128]"),
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


# ---- a line parse that cannot fail: issue 12 -------------------------------------------------------

from offbatch.jobs import requests as requests_mod  # noqa: E402
from offbatch.jobs.params import MIN_TOP_P, UNSUPPORTED, likely_name  # noqa: E402
from offbatch.jobs.requests import content_hash, effective_settings, parse_json_line, review_fields  # noqa: E402

DEEP = "[" * 100_000 + "]" * 100_000

UNREADABLE = [
    ("lone surrogate", '{"prompt": "a\\ud800b"}', "lone surrogate (\\ud800"),
    ("lone low surrogate in a key", '{"prompt": "a", "\\udfff": 1}', "lone surrogate (\\udfff"),
    ("nested 10^5 deep", DEEP, "nested deeper than 64 levels"),
    ("nested in a field", '{"prompt": "x", "metadata": ' + "[" * 65 + "]" * 65 + "}", "nested deeper than 64"),
    ("5000-digit integer", '{"prompt": "x", "seed": ' + "9" * 5000 + "}", "integer of 5000 digits"),
    ("id 1e400", '{"prompt": "x", "id": 1e400}', "1e400, too large for a double"),
    ("negative overflow", '{"prompt": "x", "temperature": -1e999}', "too large for a double"),
    ("NaN", '{"prompt": "x", "temperature": NaN}', "NaN, which is not a JSON number"),
    ("Infinity", '{"prompt": "x", "top_p": Infinity}', "Infinity, which is not a JSON number"),
    ("-Infinity", '{"prompt": "x", "top_p": -Infinity}', "-Infinity, which is not a JSON number"),
    ("duplicate key", '{"prompt": "x", "prompt": "y"}', 'the key "prompt" twice'),
    ("duplicate key nested", '{"prompt": "x", "logit_bias": {"5": 1, "5": 2}}', 'the key "5" twice'),
    ("raw NUL byte", '{"prompt": "a\x00b"}', "not valid JSON (Invalid control character at column"),
]


@pytest.mark.parametrize("line,reason", [(line, reason) for _, line, reason in UNREADABLE],
                         ids=[name for name, _, _ in UNREADABLE])
def test_unreadable_json_is_a_line_error(line, reason):
    err = parse(line, 3)
    assert isinstance(err, LineError) and err.line == 3 and reason in err.message, err.message
    assert len(err.input_hash) == 24


def test_the_original_failures_reproduce_without_the_guard():
    """What the guard stands in front of: json.loads recurses, and a lone surrogate cannot be encoded."""
    with pytest.raises(RecursionError):
        json.loads(DEEP)
    with pytest.raises(UnicodeEncodeError):
        json.dumps(json.loads('"\\ud800"'), ensure_ascii=False).encode()


def test_brackets_inside_strings_do_not_count_as_nesting():
    text = '{"prompt": "' + "[{" * 5000 + '\\"]' + '", "stop": ["]]]"]}'
    obj, why = parse_json_line(text.encode())
    assert why is None and obj["prompt"].startswith("[{[{")


def test_accepted_lines_hash_and_encode(tmp_path):
    """Whatever parse_json_line accepts can be hashed and written as UTF-8 without an error."""
    for text in ['{"prompt": "\\ud83d\\ude00 ok"}', '{"prompt": "nul \\u0000 inside"}', '{"prompt": "x", "n": 1e-400}',
                 '{"prompt": "x", "id": ' + "9" * 4300 + "}", '{"a": ' + "[" * 63 + "]" * 63 + "}"]:
        obj, why = parse_json_line(text.encode())
        assert why is None, (text[:40], why)
        content_hash(obj)
        json.dumps(obj, ensure_ascii=False).encode("utf-8")


def test_line_size_limit(monkeypatch):
    monkeypatch.setattr(requests_mod, "MAX_LINE_BYTES", 100)
    err = parse({"prompt": "x" * 200})
    assert isinstance(err, LineError) and "bytes; the limit is 100" in err.message
    assert isinstance(parse({"prompt": "x" * 50}), Request)


def test_bom_at_the_start_of_any_line_and_bad_utf8_column():
    assert parse_line(4, b'\xef\xbb\xbf{"prompt": "a"}').prompt == "a"  # files concatenated with cat
    err = parse_line(2, b'{"prompt": "\xff"}')
    assert "not UTF-8 text (byte 0xff at column 13)" in err.message


def test_utf16_file_is_one_fatal_error(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes('{"prompt": "a"}\n'.encode("utf-16"))
    with pytest.raises(InputFileError, match="UTF-16"):
        read_input(p)


# ---- numeric limits: float32 must stay finite -----------------------------------------------------

@pytest.mark.parametrize("name,given,expected", [
    ("temperature", 1e-300, 0.0), ("temperature", 9e-6, 0.0), ("temperature", 1e-5, 1e-5), ("temperature", 100, 100.0),
    ("top_p", 1e-300, MIN_TOP_P), ("top_p", 0.5, 0.5), ("min_p", 1e-300, 1e-300),
    ("repetition_penalty", 0.01, 0.01), ("presence_penalty", -2, -2.0), ("frequency_penalty", 2, 2.0),
    ("seed", 2**64 - 1, 2**64 - 1), ("max_tokens", 1e20, 10**20),
])
def test_values_are_normalised(name, given, expected):
    assert validate(name, given) == expected


@pytest.mark.parametrize("name,given,reason", [
    ("temperature", 1e300, "temperature must be in [0, 100]"), ("temperature", 100.5, "in [0, 100]"),
    ("temperature", float("nan"), "must be a finite number"), ("top_p", 0, "in (0, 1]"),
    ("repetition_penalty", 1e-300, "in [0.01, 100]"), ("repetition_penalty", 1e300, "in [0.01, 100]"),
    ("presence_penalty", 2.5, "presence_penalty must be in [-2, 2]"), ("frequency_penalty", -3, "in [-2, 2]"),
    ("presence_penalty", 10**400, "presence_penalty is out of range"), ("presence_penalty", "1", "must be a number"),
    ("seed", 1e300, "seed must be a 64-bit integer"), ("seed", -(2**63) - 1, "64-bit"),
    ("logit_bias", [1, 2], "logit_bias must be an object"), ("logit_bias", {"x": 1}, '"x" is not a token id'),
    ("logit_bias", {"-1": 1}, "is not a token id"), ("logit_bias", {"9" * 30: 1}, "is not a token id"),
    ("logit_bias", {"5": 101}, "logit_bias[5] must be in [-100, 100]"), ("logit_bias", {"5": True}, "must be a number"),
    ("logit_bias", {"5": 1, "05": 2}, "names token 5 twice"),
    ("n", 129, "n must be in [1, 128]"), ("n", 1.5, "n must be an integer"), ("top_logprobs", 21, "in [0, 20]"),
    ("logprobs", 6, "a count in [0, 5]"), ("skip_special_tokens", 1, "true or false"),
    ("chat_template_kwargs", [1], "must be an object"), ("chat_template_kwargs", {"a b": 1}, "not a template variable"),
    ("chat_template_kwargs", {"add_generation_prompt": False}, "may not set 'add_generation_prompt'"),
    ("chat_template_kwargs", {"bos_token": "x"}, "may not set 'bos_token'"),
])
def test_out_of_range_values(name, given, reason):
    with pytest.raises(ParamError) as e:
        validate(name, given)
    assert reason in str(e.value), str(e.value)


def test_flags_use_the_same_validation():
    d = resolve_defaults({}, {"temperature": 1e-300, "presence_penalty": 0.5, "frequency_penalty": -1.0})
    assert (d.values["temperature"], d.values["presence_penalty"], d.values["frequency_penalty"]) == (0.0, 0.5, -1.0)
    assert "presence_penalty=0.5" in d.describe()
    with pytest.raises(ParamError, match="frequency_penalty"):
        resolve_defaults({}, {"frequency_penalty": 7})


def test_logit_bias_keys_and_vocab(tok):
    assert validate("logit_bias", {"7": 5, "3": -100.0, 9: 1}) == ((3, -100.0), (7, 5.0), (9, 1.0))
    r = parse({"prompt": "sky", "logit_bias": {"7": 5}, "presence_penalty": 0.5, "frequency_penalty": 1})
    assert prepare(r, tok, defaults(), 64, len(VOCAB)) is None
    assert (r.params.logit_bias, r.params.presence_penalty, r.params.frequency_penalty) == (((7, 5.0),), 0.5, 1.0)
    err = prepare(parse({"prompt": "sky", "logit_bias": {"500": 5}}), tok, defaults(), 64, len(VOCAB))
    assert "logit_bias: token id 500 is out of range" in err.message


def test_top_k_at_or_above_the_vocabulary_is_off(tok):
    r = parse({"prompt": "sky", "top_k": 10**30})
    assert prepare(r, tok, defaults(), 64, len(VOCAB)) is None and r.params.top_k == 0
    r = parse({"prompt": "sky", "top_k": 3})
    assert prepare(r, tok, defaults(), 64, len(VOCAB)) is None and r.params.top_k == 3


# ---- logprobs, n, template kwargs, special tokens -------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "hello"}]}
OPENAI_CHAT = {"custom_id": "c", "url": "/v1/chat/completions", "body": CHAT}
OPENAI_COMP = {"custom_id": "p", "url": "/v1/completions", "body": {"prompt": "hi"}}


def with_fields(line, **fields):
    line = json.loads(json.dumps(line))
    (line["body"] if "body" in line else line).update(fields)
    return line


@pytest.mark.parametrize("line,fields,logprobs", [
    (CHAT, {"logprobs": True}, 0), (CHAT, {"logprobs": True, "top_logprobs": 5}, 5), (CHAT, {"logprobs": False}, None),
    (OPENAI_CHAT, {"logprobs": True, "top_logprobs": 20}, 20), (OPENAI_COMP, {"logprobs": 3}, 3),
    (OPENAI_COMP, {"logprobs": 0}, 0), ({"prompt": "hi"}, {"logprobs": 2}, 2),
    ({"prompt": "hi"}, {"logprobs": True, "top_logprobs": 4}, 4), ({"prompt": "hi"}, {"logprobs": None}, None),
])
def test_logprobs_shapes(tok, line, fields, logprobs):
    r = parse(with_fields(line, **fields))
    assert isinstance(r, Request), r.message
    assert prepare(r, tok, defaults(), 64, len(VOCAB)) is None
    assert r.params.logprobs == logprobs


@pytest.mark.parametrize("line,fields,reason", [
    (CHAT, {"logprobs": 3}, "logprobs must be true or false for chat requests"),
    (OPENAI_CHAT, {"top_logprobs": 3}, "top_logprobs needs logprobs: true"),
    (OPENAI_CHAT, {"logprobs": False, "top_logprobs": 3}, "top_logprobs needs logprobs: true"),
    (OPENAI_COMP, {"logprobs": True}, "logprobs must be a count in [0, 5] for /v1/completions"),
    (OPENAI_COMP, {"logprobs": 2, "top_logprobs": 2}, "top_logprobs is a chat field"),
    ({"prompt": "hi"}, {"logprobs": 2, "top_logprobs": 2}, "not both"),
    ({"prompt": "hi"}, {"logprobs": "yes"}, "logprobs must be an integer"),
])
def test_logprobs_shape_errors(line, fields, reason):
    err = parse(with_fields(line, **fields))
    assert isinstance(err, LineError) and reason in err.message, err.message


def test_n_and_best_of():
    assert parse({"prompt": "x", "n": 4}).n == 4
    assert parse(with_fields(OPENAI_COMP, n=3, best_of=3)).n == 3
    assert parse({"prompt": "x", "n": None, "best_of": None}).n == 1
    err = parse(with_fields(OPENAI_COMP, n=2, best_of=5))
    assert "best_of is not supported" in err.message and err.code == "unsupported_field"


def test_chat_template_kwargs_reach_the_template(tmp_path):
    folder = tmp_path / "tok"
    write_tokenizer(folder, chat_template="{% if enable_thinking %}yes{% else %}no{% endif %} "
                                          "{{ messages[0]['content'] }}")
    tok = load_tokenizer(folder)
    r = parse({**CHAT, "chat_template_kwargs": {"enable_thinking": True}})
    assert r.chat_template_kwargs == {"enable_thinking": True}
    assert prepare(r, tok, defaults(), 64, len(VOCAB)) is None
    assert tok.decode(list(r.prompt_ids)) == "yes hello"
    r = parse(CHAT)
    assert prepare(r, tok, defaults(), 64, len(VOCAB)) is None and tok.decode(list(r.prompt_ids)) == "no hello"
    err = parse({"prompt": "x", "chat_template_kwargs": {"enable_thinking": True}})
    assert "only to messages" in err.message


def test_skip_special_tokens():
    assert parse({"prompt": "x"}).skip_special_tokens is True
    assert parse({"prompt": "x", "skip_special_tokens": False}).skip_special_tokens is False


def test_effective_settings_cover_the_new_fields(tok):
    def settings(**fields):
        r = parse({**CHAT, **fields})
        assert prepare(r, tok, defaults(), 64, len(VOCAB)) is None
        return json.dumps(effective_settings(r), sort_keys=True)

    base = settings()
    for fields in ({"presence_penalty": 1}, {"frequency_penalty": 1}, {"logit_bias": {"7": 1}}, {"logprobs": True},
                   {"n": 2}, {"chat_template_kwargs": {"x": 1}}, {"skip_special_tokens": False}):
        assert settings(**fields) != base, fields
    assert settings(user="u", metadata={"a": "b"}, model="m", temperature=1e-300) == base


# ---- fields that cannot be honoured, metadata, unknown fields --------------------------------------

@pytest.mark.parametrize("name,value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"), ("functions", [{}]),
    ("function_call", "auto"), ("response_format", {"type": "json_object"}), ("stream", True),
    ("stream_options", {"include_usage": True}), ("echo", True), ("suffix", "end"), ("audio", {}),
    ("modalities", ["text", "audio"]), ("prediction", {"type": "content"}), ("web_search_options", {}),
    ("reasoning_effort", "low"), ("guided_json", {}), ("use_beam_search", True),
])
def test_unsupported_fields_are_error_records(name, value):
    err = parse(with_fields(OPENAI_CHAT, **{name: value}))
    assert isinstance(err, LineError) and err.message.startswith(f"{name} is not supported"), err.message
    assert err.code == "unsupported_field" and err.id == "c"


def test_harmless_values_and_metadata_are_accepted():
    fields = {"stream": False, "echo": False, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
              "modalities": ["text"], "suffix": "", "user": "u", "metadata": {"k": "v"}, "store": False,
              "service_tier": "auto", "model": "gpt-4o-mini", "parallel_tool_calls": False, "seed": 1}
    r = parse(with_fields(OPENAI_CHAT, **fields))
    assert isinstance(r, Request) and r.unknown_fields == [] and r.model == "gpt-4o-mini"
    assert all(name in UNSUPPORTED for name in ("tools", "response_format", "stream", "echo", "suffix"))


def test_unknown_fields_with_likely_names():
    r = parse({"prompt": "x", "temprature": 0.5, "max_token": 3, "Top_P": 0.3, "max-tokens": 4, "zebra": 1})
    assert r.overrides == {}
    assert r.unknown_fields == [("temprature", "temperature"), ("max_token", "max_tokens"), ("Top_P", "top_p"),
                                ("max-tokens", "max_tokens"), ("zebra", None)]
    r = parse({**OPENAI_CHAT, "temperature": 0.2, "bdy": 1, "body": {**CHAT, "presense_penalty": 1}})
    assert r.unknown_fields == [("temperature", "body.temperature"), ("bdy", "body"),
                                ("presense_penalty", "presence_penalty")]
    assert likely_name("logprob", ["logprobs", "top_logprobs"]) == "logprobs"


def test_review_fields_warns_once_per_field_or_fails_lines_with_strict():
    reqs = [parse({"prompt": "x", "temprature": 1, "foo": 1}, 1), parse({"prompt": "x", "temprature": 2}, 2),
            parse({"prompt": "x", "model": "org/tiny"}, 3), parse({"prompt": "x", "model": "gpt-4o"}, 4),
            parse(with_fields(OPENAI_CHAT, model="gpt-4o"), 5)]
    kept, errors, notes = review_fields(reqs, strict=False, model_name="tiny")
    assert kept == reqs and errors == []
    assert notes == ['unknown field "temprature" on 2 line(s) (did you mean "temperature"?) - ignored',
                     'unknown field "foo" on 1 line(s) - ignored',
                     '2 line(s) name another model ("gpt-4o" on 2); this run uses tiny']
    kept, errors, notes = review_fields(reqs, strict=True, model_name="tiny")
    assert [r.line for r in kept] == [3, 4, 5] and [e.line for e in errors] == [1, 2]
    assert errors[0].message == ('unknown field "temprature" (did you mean "temperature"?), "foo"; '
                                 "--strict makes unknown fields errors")
    assert notes == ['2 line(s) name another model ("gpt-4o" on 2); this run uses tiny']


def test_error_codes():
    assert parse({"prompt": 5}).code == "invalid_request"
    assert parse({"prompt": "x", "tools": [{}]}).code == "unsupported_field"
