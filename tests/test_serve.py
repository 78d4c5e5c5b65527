"""``moorize serve`` as a real process on 127.0.0.1, driven by the official ``openai`` client.

A tiny Llama (character tokenizer, chat template, two tasks whose routers differ) is
exported with past; every greedy answer is compared token for token with the same
request run alone by ``MoOREOrtModel``. A second server (batch 1, queue 1, API key
from the environment) shows the 429 and 401 answers; a third serves a tiny BERT with
task heads (/v1/classify).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
from helpers import Reply, ServerProcess, http, metric

from moorize.runtime import MoOREOrtModel

TASKS = ["math", "poem"]
PROMPTS = ["Hello world", "The cat sat on", "1+2=", "abc", "Once upon a time", "xyz!", "Q: why? A:", "ok"]


@pytest.fixture(scope="module")
def ortm(serving_exports):
    return MoOREOrtModel.from_export(serving_exports["llama"])


@pytest.fixture(scope="module")
def server(serving_exports):
    srv = ServerProcess(serving_exports["llama"], "--max-batch-size", "8")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def solo_ids(ortm, ids: list[int], task: str, n: int) -> list[int]:
    """The request run alone: greedy ids up to (not including) the end-of-sequence token."""
    out = ortm.generate_ids(np.array([ids]), None, task, max_new_tokens=n)[0].tolist()
    eos = set(ortm.meta["eos_token_id"])
    return out[: next((i for i, t in enumerate(out) if t in eos), len(out))]


def long_running(ortm, n: int) -> tuple[str, str]:
    """A (prompt, task) whose greedy run does not meet the end-of-sequence token within n tokens."""
    for prompt in PROMPTS + ["xyz!", "abc", "Tell me a long story", "zz", "a"]:
        for task in TASKS:
            if len(solo_ids(ortm, ortm.tokenizer(prompt)["input_ids"], task, n)) == n:
                return prompt, task
    raise AssertionError(f"no prompt runs {n} tokens without the end-of-sequence token")


def solo_chat(ortm, messages, task: str, n: int) -> str:
    tok = ortm.tokenizer
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok.decode(solo_ids(ortm, tok(text, add_special_tokens=False)["input_ids"], task, n),
                      skip_special_tokens=True)


# ---- the OpenAI endpoints -----------------------------------------------------------------------
def test_models_are_the_tasks(client):
    assert [m.id for m in client.models.list().data] == TASKS
    assert client.models.retrieve("poem").id == "poem"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_completions_two_tasks_equal_solo_greedy(client, ortm):
    texts = {}
    for task in TASKS:
        r = client.completions.create(model=task, prompt=PROMPTS[0], max_tokens=24, temperature=0)
        want = ortm.generate(PROMPTS[0], task=task, max_new_tokens=24)
        assert r.choices[0].text == want and r.model == task
        assert r.usage.prompt_tokens == len(ortm.tokenizer(PROMPTS[0])["input_ids"])
        assert r.choices[0].finish_reason in ("length", "stop")
        texts[task] = r.choices[0].text
    assert texts["math"] != texts["poem"]  # the task really picks the routers


def test_chat_two_tasks_equal_solo_greedy(client, ortm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    answers = set()
    for task in TASKS:
        r = client.chat.completions.create(model=task, messages=messages, max_tokens=20, temperature=0)
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == solo_chat(ortm, messages, task, 20)
        answers.add(r.choices[0].message.content)
    assert len(answers) == 2


def test_streaming_equals_the_whole_answer(client):
    whole = client.completions.create(model="poem", prompt="The cat sat on", max_tokens=30, temperature=0)
    chunks = list(client.completions.create(model="poem", prompt="The cat sat on", max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and len([c for c in chunks if c.choices and c.choices[0].text]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    messages = [{"role": "user", "content": "tell me"}]
    whole = client.chat.completions.create(model="math", messages=messages, max_tokens=25, temperature=0)
    stream = client.chat.completions.create(model="math", messages=messages, max_tokens=25, temperature=0,
                                            stream=True)
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content


def test_mixed_tasks_concurrently_each_equal_solo(client, ortm, server):
    """16 requests of both tasks at once (half streamed, different lengths): each equals its solo greedy run,
    and the server really ran them in shared batches."""
    jobs = [(PROMPTS[i % len(PROMPTS)], TASKS[i % 2], 20 + 3 * i, i % 2 == 1) for i in range(16)]
    before = metric(server.url, "moorize_batch_size_count")
    big_before = metric(server.url, "moorize_batch_size_bucket", le="4")
    barrier = threading.Barrier(len(jobs))

    def call(job):
        prompt, task, n, stream = job
        barrier.wait()
        if stream:
            chunks = client.completions.create(model=task, prompt=prompt, max_tokens=n, temperature=0, stream=True)
            return "".join(c.choices[0].text for c in chunks)
        return client.completions.create(model=task, prompt=prompt, max_tokens=n, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(call, jobs))
    for (prompt, task, n, _), text in zip(jobs, got):
        assert text == ortm.generate(prompt, task=task, max_new_tokens=n), (prompt, task, n)
    steps = metric(server.url, "moorize_batch_size_count") - before
    small = metric(server.url, "moorize_batch_size_bucket", le="4") - big_before
    assert steps > 0 and small < steps  # some decoding runs had more than 4 rows


def test_seeded_sampling_is_reproducible_and_equals_solo(client, ortm):
    kw = dict(model="poem", prompt="Once upon a time", max_tokens=24, temperature=0.8, top_p=0.9, seed=7)
    a, b = (client.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b == ortm.generate("Once upon a time", task="poem", max_new_tokens=24, do_sample=True,
                                   temperature=0.8, top_p=0.9, seed=7)
    assert client.completions.create(**{**kw, "seed": 8}).choices[0].text != a


def test_stop_strings_cut_the_answer(client, ortm):
    prompt, task = long_running(ortm, 30)
    full = client.completions.create(model=task, prompt=prompt, max_tokens=30, temperature=0).choices[0].text
    stop = full[10:12]
    cut = full[: full.index(stop)]
    assert len(stop) == 2 and len(cut) >= 2
    r = client.completions.create(model=task, prompt=prompt, max_tokens=30, temperature=0, stop=[stop, "~~"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=task, prompt=prompt, max_tokens=30, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut


# ---- bad input ------------------------------------------------------------------------------------
def _error(resp: Reply, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert isinstance(body["message"], str) and body["message"] and "Traceback" not in body["message"]
    return body


@pytest.mark.parametrize("body,param", [
    ({"model": "math", "prompt": "hi", "temperature": 5}, "temperature"),
    ({"model": "math", "prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"model": "math", "prompt": "hi", "top_p": 0}, "top_p"),
    ({"model": "math", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": "math", "prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
    ({"model": "math", "prompt": "hi", "seed": -1}, "seed"),
    ({"model": "math", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "math", "prompt": "hi", "stop": 3}, "stop"),
    ({"model": "math", "prompt": "hi", "n": 2}, "n"),
    ({"model": "math", "prompt": "hi", "stream": "yes"}, "stream"),
    ({"model": "math", "prompt": ""}, "prompt"),
    ({"model": "math", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "math", "prompt": [1, 2, 999]}, "prompt"),
    ({"model": "math"}, "prompt"),
    ({"prompt": "hi"}, "model"),
    ({"model": 3, "prompt": "hi"}, "model"),
])
def test_invalid_parameters_are_400(server, body, param):
    assert _error(http("POST", server.url + "/v1/completions", body), 400)["param"] == param


def test_errors_through_the_openai_client(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hi", max_tokens=4)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="math", prompt="x" * 600, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="math", prompt="hello", max_tokens=510)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="math", messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="math", messages=[])


@pytest.mark.parametrize("raw", [b"{bad json", b"[1, 2]", b"\xff\xfe", b"", b'"text"'])
def test_malformed_json_is_400(server, raw):
    _error(http("POST", server.url + "/v1/chat/completions", content=raw), 400)


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/completions", b'{"model": "math", "prompt": "a\\ud800b"}', "prompt"),
    ("/v1/chat/completions", b'{"model": "math", "messages": [{"role": "user", "content": "\\udc00"}]}', "messages"),
    ("/v1/completions", b'{"model": "\\ud83d", "prompt": "hi"}', "model"),
    ("/v1/completions", b'{"model": "math", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", None),
])
def test_valid_json_that_is_no_request_is_400_not_500(server, path, raw, param):
    """Lone surrogate escapes (valid JSON, no text: the tokenizer and the reply would fail on them) and deep
    nesting are the caller's: a 400 naming the field, counted as such, and the server goes on."""
    endpoint = "chat" if "chat" in path else "completions"
    counts = {code: metric(server.url, "moorize_requests_total", endpoint=endpoint, status=code)
              for code in ("400", "500")}
    body = _error(http("POST", server.url + path, content=raw), 400)
    assert body["param"] == param
    assert metric(server.url, "moorize_requests_total", endpoint=endpoint, status="400") == counts["400"] + 1
    assert metric(server.url, "moorize_requests_total", endpoint=endpoint, status="500") == counts["500"]


def test_openai_parameters_not_implemented_are_400_through_the_client(client):
    """Refused by name rather than ignored; the values that ask for nothing (what clients send by default) pass."""
    chat = dict(model="math", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    for extra, param in ((dict(response_format={"type": "json_object"}), "response_format"),
                         (dict(presence_penalty=0.5), "presence_penalty"), (dict(frequency_penalty=1.0),
                                                                           "frequency_penalty"),
                         (dict(logit_bias={"5": 10}), "logit_bias"),
                         (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**chat, **extra)
        assert e.value.body["param"] == param and "not supported" in e.value.body["message"]
    r = client.chat.completions.create(**chat, presence_penalty=0, frequency_penalty=0,
                                       response_format={"type": "text"})
    assert r.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as e:  # a completion's prompt is its "prompt", not "messages"
        client.completions.create(model="math", prompt="x" * 600, max_tokens=4)
    assert e.value.body["param"] == "prompt"


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(client):
    """A megabyte prompt cannot fit 512 positions whatever its tokens: refused by its length in characters (the
    message says so), not after seconds of tokenizing on the event loop."""
    for call in (lambda: client.completions.create(model="math", prompt="x" * 1_000_000, max_tokens=2),
                 lambda: client.chat.completions.create(model="math", max_tokens=2,
                                                        messages=[{"role": "user", "content": "y" * 1_000_000}])):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.body["code"] == "context_length_exceeded" and "characters" in e.value.body["message"]


def test_unknown_routes_and_methods_are_json(server):
    assert _error(http("GET", server.url + "/v1/nothing"), 404)["code"] == "not_found"
    assert _error(http("GET", server.url + "/v1/completions"), 405)["code"] == "method_not_allowed"
    assert _error(http("POST", server.url + "/v1/classify", {"model": "math", "input": ["x"]}), 404)


def test_the_server_survived_everything_and_still_answers_right(client, ortm, server):
    r = client.completions.create(model="poem", prompt="abc", max_tokens=12, temperature=0)
    assert r.choices[0].text == ortm.generate("abc", task="poem", max_new_tokens=12)
    assert server.proc.poll() is None
    assert http("GET", server.url + "/health").json()["status"] == "ok"


def test_a_client_that_disconnects_frees_its_row(client, ortm, server):
    n = 250  # a prompt whose greedy run lasts all n tokens: only a cancel ends it early
    prompt, task = long_running(ortm, n)
    cancelled = metric(server.url, "moorize_finished_total", reason="cancelled")
    generated = metric(server.url, "moorize_generated_tokens_total", model=task)
    stream = client.completions.create(model=task, prompt=prompt, max_tokens=n, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.time() + 20
    while metric(server.url, "moorize_finished_total", reason="cancelled") == cancelled and time.time() < deadline:
        time.sleep(0.05)
    assert metric(server.url, "moorize_finished_total", reason="cancelled") == cancelled + 1
    assert metric(server.url, "moorize_running_rows") == 0
    assert metric(server.url, "moorize_generated_tokens_total", model=task) - generated < n


def test_metrics_are_prometheus_text(server):
    text = http("GET", server.url + "/metrics").text
    for name, kind in [("moorize_requests_total", "counter"), ("moorize_generated_tokens_total", "counter"),
                       ("moorize_batch_size", "histogram"), ("moorize_queue_length", "gauge"),
                       ("moorize_request_latency_seconds", "histogram")]:
        assert f"# TYPE {name} {kind}" in text
    assert re.search(r'^moorize_requests_total\{endpoint="completions",status="400"\} [1-9]', text, re.M)
    assert re.search(r'^moorize_request_latency_seconds_bucket\{endpoint="completions",le="\+Inf"\} [1-9]',
                     text, re.M)


# ---- limits and the API key -----------------------------------------------------------------------
def test_full_queue_is_429_and_the_api_key_is_required(serving_exports, ortm):
    srv = ServerProcess(serving_exports["llama"], "--max-batch-size", "1", "--max-queue", "1",
                        env={"MOORIZE_API_KEY": "s3cret"}, api_key="s3cret")
    try:
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            assert _error(http("GET", srv.url + "/v1/models", headers=headers), 401)["code"] == "invalid_api_key"
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="math", prompt="hi", max_tokens=2)
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        barrier = threading.Barrier(6)

        def call(i):
            barrier.wait()
            try:
                r = good.completions.create(model=TASKS[i % 2], prompt="Hello world", max_tokens=200, temperature=0)
                return i, r.choices[0].text
            except openai.RateLimitError as e:
                assert e.status_code == 429 and e.body["code"] == "queue_full"
                return i, None

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(call, range(6)))
        served = [(i, t) for i, t in results if t is not None]
        assert 1 <= len(served) < 6
        for i, text in served:
            assert text == ortm.generate("Hello world", task=TASKS[i % 2], max_new_tokens=200)
    finally:
        srv.stop()


# ---- encoders --------------------------------------------------------------------------------------
def test_classify_an_encoder_export(serving_exports):
    srv = ServerProcess(serving_exports["bert"])
    try:
        clf = MoOREOrtModel.from_export(serving_exports["bert"])
        texts = ["good film", "terrible plot", "okay"]
        for task in TASKS:
            r = http("POST", srv.url + "/v1/classify", {"model": task, "input": texts})
            assert r.status_code == 200, r.text
            data = r.json()["data"]
            assert [d["label"] for d in data] == clf.classify(texts, task=task)
            for d in data:
                assert set(d["scores"]) == set(clf.labels[task]) and abs(sum(d["scores"].values()) - 1) < 1e-6
                assert d["score"] == max(d["scores"].values())
        assert _error(http("POST", srv.url + "/v1/classify", {"model": "nope", "input": ["x"]}), 404)
        assert _error(http("POST", srv.url + "/v1/classify", {"model": "math", "input": []}), 400)
        assert _error(http("POST", srv.url + "/v1/classify", {"model": "math", "input": ["x" * 100]}), 400)
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="math", prompt="hi")
    finally:
        srv.stop()


# ---- the command line -----------------------------------------------------------------------------
def test_cli_errors_are_one_line(tmp_path, server, serving_exports):
    (tmp_path / "file.onnx").write_bytes(b"")
    cases = {"does not exist": [str(tmp_path / "missing")],
             "in use": [serving_exports["llama"], "--port", str(server.port)],
             "is a file": [str(tmp_path / "file.onnx")],
             "unknown execution provider 'NoSuchExecutionProvider' (--provider)":
                 [serving_exports["llama"], "--provider", "NoSuchExecutionProvider"]}
    for phrase, args in cases.items():
        res = subprocess.run([sys.executable, "-m", "moorize", "serve", *map(str, args)], capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 2, res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        assert phrase in lines[0], (phrase, lines[0])


def test_serve_without_its_extra_names_the_extra(tmp_path, serving_exports):
    """As if `pip install moorize` without [serve]: uvicorn cannot be imported."""
    import os

    shim = tmp_path / "shim" / "uvicorn"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'uvicorn'\", name='uvicorn')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shim"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "moorize", "serve", str(serving_exports["llama"])],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1] == ("error: moorize serve needs uvicorn, which is not installed: "
                                                   "pip install 'moorize[serve]'")


def test_sse_wire_format(server):
    r = http("POST", server.url + "/v1/completions", {"model": "math", "prompt": "hi", "max_tokens": 3,
                                                        "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [ln for ln in r.text.splitlines() if ln]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_server_cleanly(serving_exports, sig):
    """Ctrl-C or SIGTERM is how a server is stopped: exit 0, 'stopped', no traceback, no talk of partial outputs."""
    srv = ServerProcess(serving_exports["llama"])
    try:
        assert http("GET", srv.url + "/health").status_code == 200
        srv.proc.send_signal(sig)
        assert srv.proc.wait(timeout=60) == 0, srv.output()
        out = srv.output()
        assert out.rstrip().endswith("stopped") and "Traceback" not in out and "partial output" not in out, out
    finally:
        srv.stop()
