"""Request validation as one layer (moorize.serving.protocol): any valid JSON that is not a valid request is a 4xx
ApiError naming the field, never another exception; the server's own tests (test_serve.py) send the same over
HTTP with real clients."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moorize.serving.protocol import (
    MAX_DEPTH,
    NOT_IMPLEMENTED,
    ApiError,
    parse_chat,
    parse_classify,
    parse_completion,
    parse_json,
)

PARSERS = (parse_completion, parse_chat, parse_classify)

# any text, lone surrogates included: what json.loads gives for "\ud800"
TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=12)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.integers(10**300, 10**1000) | st.floats() | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=20)
FIELDS = ["model", "prompt", "messages", "input", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "seed", "stop", "stream", "stream_options", "n", "logprobs", "best_of", *NOT_IMPLEMENTED]
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "bot"]) | JSON,
                                 "content": TEXT | JSON})
BODY = st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6) | st.fixed_dictionaries(
    {"model": TEXT | JSON, "prompt": TEXT | JSON, "messages": st.lists(MESSAGE, max_size=3) | JSON, "input": JSON},
    optional={k: JSON for k in ("max_tokens", "temperature", "stop", "stream", *NOT_IMPLEMENTED)})


def wire(body) -> bytes:
    """The body as a client sends it (lone surrogates as \\u escapes, as json.dumps writes them)."""
    return json.dumps(body, allow_nan=True).encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(BODY)
def test_any_json_body_is_a_request_or_a_4xx(body):
    for parse in PARSERS:
        try:
            parse(parse_json(wire(body)))
        except ApiError as e:
            assert 400 <= e.status < 500 and e.message
            json.dumps(e.body(), ensure_ascii=False).encode("utf-8")  # the error itself always encodes


@pytest.mark.parametrize("raw, param", [
    (b'{"model": "math", "prompt": "hi \\ud800 there"}', "prompt"),
    (b'{"model": "m\\udfff", "prompt": "hi"}', "model"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
     "messages"),
    (b'{"model": "math", "prompt": "hi", "\\ud800": 1}', None),
])
def test_a_lone_surrogate_anywhere_is_a_400_naming_its_field(raw, param):
    with pytest.raises(ApiError) as e:
        parse_json(raw)
    assert e.value.status == 400 and "lone surrogate" in e.value.message and e.value.param == param
    json.dumps(e.value.body(), ensure_ascii=False).encode("utf-8")  # the reply itself encodes


@pytest.mark.parametrize("key", ["temperature", "top_p", "max_tokens", "seed"])
def test_numbers_no_float_holds_are_a_400(key):
    with pytest.raises(ApiError) as e:
        parse_completion(parse_json(b'{"model": "math", "prompt": "hi", "%s": 1%s}' % (key.encode(), b"0" * 400)))
    assert e.value.status == 400 and e.value.param == key


@pytest.mark.parametrize("depth", [MAX_DEPTH + 5, 100_000])
def test_deep_nesting_is_a_400(depth):
    raw = b'{"model": "math", "prompt": ' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(ApiError, match="nests deeper") as e:
        parse_json(raw)
    assert e.value.status == 400


@pytest.mark.parametrize("key, value", [("response_format", {"type": "json_object"}), ("tools", [{"type": "function"}]),
                                        ("tool_choice", "auto"), ("logit_bias", {"5": 10}),
                                        ("presence_penalty", 0.5), ("frequency_penalty", -1), ("functions", [{}]),
                                        ("function_call", "auto"), ("presence_penalty", True)])
def test_openai_parameters_not_implemented_are_refused_by_name(key, value):
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], key: value}
    with pytest.raises(ApiError, match=f"{key} is not supported") as e:
        parse_chat(body)
    assert e.value.status == 400 and e.value.param == key


@pytest.mark.parametrize("key", list(NOT_IMPLEMENTED))
def test_the_values_that_ask_for_nothing_are_accepted(key):
    """Clients send defaults (presence_penalty 0, tools [], response_format text): those change nothing."""
    for value in NOT_IMPLEMENTED[key]:
        req = parse_completion({"model": "math", "prompt": "hi", key: value})
        assert req.prompt == "hi"
