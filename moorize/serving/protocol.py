"""OpenAI API shapes: request bodies checked into dataclasses, errors as OpenAI error JSON.

Every check happens here, before a request reaches the engine, so bad input is a 4xx
with a message that names the field (``param``) and never reaches ONNX Runtime.
Unknown fields are ignored, as OpenAI-compatible servers do; features this server
does not offer (``n`` > 1, ``logprobs``, tools, penalties, several prompts) are refused,
never faked. Any valid JSON that is not a valid request is a 400: no string can hold a
lone surrogate, no body can nest deeper than ``MAX_DEPTH``.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

MAX_STOP = 4  # OpenAI allows up to 4 stop sequences
MAX_DEPTH = 32  # OpenAI requests nest a few levels (messages, content parts, tool schemas)
# OpenAI parameters this server does not implement, with the values that ask for nothing (clients send those)
NOT_IMPLEMENTED = {
    "response_format": (None, {"type": "text"}), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
}


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.close = close  # answer with Connection: close

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise bad(f"the request body nests deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    _check_text(body)
    return body


def _check_text(body: dict) -> None:
    """Every key and string is text (``"\\ud800"`` is valid JSON but no character: a tokenizer, or the reply
    quoting it, fails on it) and the body nests at most MAX_DEPTH levels; walked without recursion."""
    todo: list[tuple[object, str | None, int]] = [(body, None, 0)]
    while todo:
        value, field_, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise bad(f"the request body nests deeper than {MAX_DEPTH} levels", field_)
        if isinstance(value, dict):
            for key, item in value.items():
                _require_text(key, field_)  # a bad key is named by its parent field: an error never quotes it
                todo.append((item, field_ or key, depth + 1))
        elif isinstance(value, list):
            todo.extend((item, field_, depth + 1) for item in value)
        elif isinstance(value, str):
            _require_text(value, field_)


def _require_text(s: str, field_: str | None) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        where = field_ if field_ is not None else "the request body"
        raise bad(f"{where} holds {s[e.start:e.end].encode('utf-8', 'backslashreplace').decode()}, a lone "
                  "surrogate escape: not a character (send text as UTF-8)", field_) from None


@dataclass
class Sampling:
    """What a generation request asks for besides its prompt."""

    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


@dataclass
class CompletionRequest:
    model: str
    sampling: Sampling
    prompt: str | None = None  # text, or
    prompt_ids: list[int] | None = None  # token ids


@dataclass
class ChatRequest:
    model: str
    sampling: Sampling
    messages: list[dict] = field(default_factory=list)


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v):
        raise bad(f"{key} must be a finite number", key)
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(f"{key} must be {'>' if lo_open else '>='} {lo:g} and <= {hi:g}, got {v!r}", key)
    return float(v)


def _finite(v: int | float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer of hundreds of digits (JSON allows them): no float holds it
        return False


def _int(body: dict, key: str, lo: int, hi: int = 2**63 - 1) -> int | None:
    """An integer field in [lo, hi] (int64 by default, as OpenAI's API types them), or None when absent."""
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{key} must be an integer", key)
    if v < lo:
        raise bad(f"{key} must be at least {lo}, got {v}", key)
    if v > hi:
        raise bad(f"{key} must be at most {hi}", key)
    return v


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model must be a non-empty string: the task name (see /v1/models)", "model")
    return model


def _sampling(body: dict, max_tokens_keys: tuple[str, ...]) -> Sampling:
    max_tokens = None
    for key in max_tokens_keys:
        value = _int(body, key, 1)
        if value is not None:
            max_tokens = value
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad("stop must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP:
        raise bad(f"stop takes at most {MAX_STOP} sequences", "stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise bad("stream_options must be an object {\"include_usage\": bool}", "stream_options")
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise bad("n must be 1: this server returns one choice per request", "n")
    unsupported = [k for k in ("logprobs", "top_logprobs", "echo", "suffix") if body.get(k) not in (None, False)]
    unsupported += ["best_of"] if body.get("best_of") not in (None, 1) else []
    unsupported += [k for k, no_op in NOT_IMPLEMENTED.items()
                    if k in body and (isinstance(body[k], bool) or body[k] not in no_op)]
    if unsupported:
        raise bad(f"{unsupported[0]} is not supported by this server", unsupported[0])
    return Sampling(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                    top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), seed=_int(body, "seed", 0),
                    stop=stop, stream=stream, include_usage=bool(opts.get("include_usage", False)))


def parse_completion(body: dict) -> CompletionRequest:
    """/v1/completions: one prompt, as text or token ids."""
    model, sampling = _model(body), _sampling(body, ("max_tokens",))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt is empty", "prompt")
        return CompletionRequest(model, sampling, prompt=prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return CompletionRequest(model, sampling, prompt_ids=list(prompt))
    if isinstance(prompt, list) and len(prompt) > 1:
        raise bad("one prompt per request: send several requests (they are batched together)", "prompt")
    raise bad("prompt must be a non-empty string or a list of token ids", "prompt")


ROLES = ("system", "user", "assistant", "developer", "tool")


def parse_chat(body: dict) -> ChatRequest:
    """/v1/chat/completions: messages with string (or text-part) content."""
    model, sampling = _model(body), _sampling(body, ("max_tokens", "max_completion_tokens"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"messages[{i}] must be an object with a role among {', '.join(ROLES)}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string", "messages")
        clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return ChatRequest(model, sampling, clean)


def parse_classify(body: dict) -> tuple[str, list[str]]:
    """/v1/classify: {"model": task, "input": text or [texts]}."""
    model = _model(body)
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise bad("input must be a non-empty string or a non-empty list of non-empty strings", "input")
    return model, texts


# ---- response shapes ------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "moorize"}
