"""``moorize serve`` under hostile traffic: long prompts, a bounded cache, slow and vanishing clients, shutdown
with streams running, and a bounded load test, all against a real server process on 127.0.0.1.

The export is the tiny two-task Llama of ``serving_exports`` (character tokenizer: one token per character,
512 positions); every answer is compared with the same request run alone by ``MoOREOrtModel``.
"""

from __future__ import annotations

import json
import math
import random
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection

import numpy as np
import openai
import pytest
from helpers import ServerProcess, http, metric

from moorize.runtime import MoOREOrtModel

TASKS = ["math", "poem"]


@pytest.fixture(scope="module")
def ortm(serving_exports):
    return MoOREOrtModel.from_export(serving_exports["llama"])


def solo(ortm, prompt: str, task: str, n: int) -> str:
    return ortm.generate(prompt, task=task, max_new_tokens=n)


def long_prompt(chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghij klmnop") for _ in range(chars))


def stream(url: str, body: dict, events: list, stop_after: int | None = None) -> None:
    """POST a streaming request and append (time, parsed event or "[DONE]") to ``events`` as they arrive;
    with ``stop_after``, close the connection after that many events (a client that leaves)."""
    host, port = url.removeprefix("http://").split(":")
    conn = HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    events.append((time.perf_counter(), {"status": resp.status}))
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        events.append((time.perf_counter(), data if data == "[DONE]" else json.loads(data)))
        if stop_after is not None and len(events) > stop_after:
            break
    conn.close()


def wait_until(ready, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while not ready():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.01)


def text_of(events: list) -> str:
    return "".join(e["choices"][0]["text"] for _, e in events if isinstance(e, dict) and e.get("choices"))


def running_prompt(ortm, n: int) -> tuple[str, str]:
    """A (prompt, task) whose greedy run does not meet the end-of-sequence token within n tokens."""
    eos = set(ortm.meta["eos_token_id"])
    for prompt in ["xyz!", "abc", "Tell me a long story", "Hello world", "zz", "a", "ok"]:
        for task in TASKS:
            ids = ortm.generate_ids(np.array([ortm.tokenizer(prompt)["input_ids"]]), None, task, max_new_tokens=n)
            if not eos & set(ids[0].tolist()):
                return prompt, task
    raise AssertionError(f"no prompt runs {n} tokens without the end-of-sequence token")


# ---- long prompts: chunked prefill ----------------------------------------------------------------
def running_server(serving_exports, *args: str):
    srv = ServerProcess(serving_exports["llama"], *args)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def chunked(serving_exports):
    yield from running_server(serving_exports, "--max-step-tokens", "64", "--max-batch-size", "4",
                              "--max-prompt-tokens", "480")


def test_a_long_prompt_is_read_in_chunks_while_another_stream_keeps_flowing(chunked, ortm):
    """With a budget of 64 tokens a step, a 450-token prompt takes ceil(450 / 63) chunks (one row decodes beside
    it), and the running stream gets a token between every two of them: it never waits for the whole prompt."""
    prompt, task = running_prompt(ortm, 200)
    events: list = []
    reader = threading.Thread(target=stream, args=(chunked.url, {"model": task, "prompt": prompt,
                                                                  "max_tokens": 200, "temperature": 0}, events))
    reader.start()
    wait_until(lambda: len(events) >= 3)
    chunks = metric(chunked.url, "moorize_prefill_chunks_total")
    big = long_prompt(450)
    sent = time.perf_counter()
    r = http("POST", chunked.url + "/v1/completions", {"model": "poem", "prompt": big, "max_tokens": 1,
                                                       "temperature": 0})
    answered = time.perf_counter()
    reader.join(timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == solo(ortm, big, "poem", 1)  # chunks compute what one run does
    assert metric(chunked.url, "moorize_prefill_chunks_total") - chunks == math.ceil(450 / 63)
    during = [t for t, e in events if isinstance(e, dict) and e.get("choices") and sent <= t <= answered]
    assert len(during) >= math.ceil(450 / 63) - 1, f"the stream got {len(during)} tokens while the prompt was read"
    assert text_of(events) == solo(ortm, prompt, task, 200)
    # no step ever processed more than its budget
    assert metric(chunked.url, "moorize_step_tokens_bucket", le="64") == metric(chunked.url, "moorize_step_tokens_count")


@pytest.fixture(scope="module")
def strict(serving_exports):
    yield from running_server(serving_exports, "--header-timeout", "1", "--body-timeout", "1",
                              "--max-batch-tokens", "500")


def test_the_batch_cache_stays_within_max_batch_tokens(strict, ortm):
    """Rows join while rows x the longest (prompt + max_tokens) fits 500 positions: two of these at a time; the
    others wait their turn, and every answer still equals the request run alone."""
    prompt, task = running_prompt(ortm, 100)
    jobs = [(prompt + str(i), task if i % 2 else "poem", 230) for i in range(4)]
    seen: list[float] = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.append(metric(strict.url, "moorize_batch_cache_tokens"))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda j: http("POST", strict.url + "/v1/completions",
                                               {"model": j[1], "prompt": j[0], "max_tokens": j[2],
                                                "temperature": 0}), jobs))
    done.set()
    watcher.join()
    for (p, t, n), r in zip(jobs, replies):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == solo(ortm, p, t, n)
    assert 0 < max(seen) <= 500
    assert metric(strict.url, "moorize_running_rows") == 0


@pytest.mark.parametrize("server, body, param, words", [
    ("chunked", {"prompt": "a" * 481, "max_tokens": 1}, "prompt", "at most 480 tokens"),
    ("strict", {"prompt": "a" * 100, "max_tokens": 401}, "max_tokens", "at most 500 cache positions"),
    ("strict", {"prompt": "a" * 500}, "prompt", "at most 500 cache positions"),
])
def test_prompt_and_cache_limits_are_400_naming_the_field(request, server, body, param, words):
    r = http("POST", request.getfixturevalue(server).url + "/v1/completions", {"model": "math", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "context_length_exceeded" and words in err["message"], err


def test_an_unknown_model_names_the_tasks_and_the_closest_one(chunked):
    err = http("POST", chunked.url + "/v1/completions", {"model": "peom", "prompt": "hi"}).json()["error"]
    assert err["code"] == "model_not_found" and err["message"].endswith("are: math, poem; did you mean 'poem'?"), err


def test_serve_refuses_a_step_budget_smaller_than_its_batch(serving_exports):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "moorize", "serve", str(serving_exports["llama"]), "--max-batch-size",
                        "16", "--max-step-tokens", "20"], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: max-step-tokens must be at least twice"), p.stderr


# ---- slow and vanishing clients --------------------------------------------------------------------
def raw_exchange(url: str, payload: bytes, wait: float = 10.0) -> tuple[bytes, float]:
    """Send ``payload`` on a fresh connection and read until the server closes it: (answer, seconds)."""
    host, port = url.removeprefix("http://").split(":")
    t0 = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        if payload:
            s.sendall(payload)
        answer = b""
        while True:
            try:
                part = s.recv(65536)
            except TimeoutError:
                return answer + b"<still open>", time.perf_counter() - t0
            if not part:
                return answer, time.perf_counter() - t0
            answer += part


@pytest.mark.parametrize("payload", [b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl"],
                         ids=["silent", "half-headers"])
def test_slow_headers_get_408_and_the_connection_closed(strict, payload):
    answer, seconds = raw_exchange(strict.url, payload)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert 0.9 <= seconds < 5


def test_a_slow_body_gets_408_and_the_connection_closed(strict):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200\r\n\r\n{\"model\": \"math\",")
    answer, seconds = raw_exchange(strict.url, head)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"connection: close" in answer.lower() and b"request_timeout" in answer
    assert 0.9 <= seconds < 5


def test_a_client_that_leaves_during_its_upload_is_a_normal_event(strict):
    before = metric(strict.url, "moorize_requests_total", endpoint="completions", status="499")
    host, port = strict.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 5000\r\n\r\n{\"model\": \"math\", \"prompt\": \"")
        time.sleep(0.2)
    deadline = time.time() + 10
    while metric(strict.url, "moorize_requests_total", endpoint="completions", status="499") == before:
        assert time.time() < deadline, strict.output()
        time.sleep(0.05)
    assert metric(strict.url, "moorize_requests_total", endpoint="completions", status="500") == 0
    assert "Traceback" not in strict.output() and "Exception in ASGI" not in strict.output()
    assert http("GET", strict.url + "/health").status_code == 200  # and the server carries on


# ---- shutdown with streams running -----------------------------------------------------------------
def start_streams(srv, bodies: list[dict]) -> tuple[list[list], list[threading.Thread]]:
    runs = [[] for _ in bodies]
    threads = [threading.Thread(target=stream, args=(srv.url, body, ev)) for body, ev in zip(bodies, runs)]
    for t in threads:
        t.start()
    wait_until(lambda: all(len(ev) >= 3 for ev in runs))
    return runs, threads


def refused(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def stopped_cleanly(srv) -> None:
    assert srv.proc.wait(timeout=60) == 0, srv.output()
    out = srv.output()
    assert out.rstrip().endswith("stopped") and "Traceback" not in out and "Exception in ASGI" not in out, out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_streams_still_running_when_the_grace_ends_get_an_error_event_and_done(serving_exports, ortm, sig):
    """Grace 0: the signal ends every running generation at once, each stream with an error event then [DONE]
    (never cut mid-chunk), a plain request with 503; the server exits 0."""
    srv = ServerProcess(serving_exports["llama"], "--shutdown-grace", "0")
    try:
        prompt, task = running_prompt(ortm, 250)
        body = {"model": task, "prompt": prompt, "max_tokens": 250, "temperature": 0}
        runs, threads = start_streams(srv, [body, body])
        plain: list = []
        threads.append(threading.Thread(target=lambda: plain.append(http("POST", srv.url + "/v1/completions", body))))
        threads[-1].start()
        wait_until(lambda: metric(srv.url, "moorize_running_rows") == 3)
        srv.proc.send_signal(sig)
        for t in threads:
            t.join(timeout=60)
        stopped_cleanly(srv)
        for ev in runs:
            assert ev[-1][1] == "[DONE]", ev[-3:]
            err = ev[-2][1]["error"]
            assert err["code"] == "server_shutting_down" and "shutting down" in err["message"], err
            assert solo(ortm, prompt, task, 250).startswith(text_of(ev))
        assert plain[0].status_code == 503 and plain[0].json()["error"]["code"] == "server_shutting_down"
    finally:
        srv.stop()


def test_streams_that_finish_within_the_grace_end_normally_and_the_server_does_not_wait_longer(serving_exports, ortm):
    srv = ServerProcess(serving_exports["llama"], "--shutdown-grace", "60")
    try:
        prompt, task = running_prompt(ortm, 250)
        runs, threads = start_streams(srv, [{"model": task, "prompt": prompt, "max_tokens": 250, "temperature": 0}])
        t0 = time.perf_counter()
        srv.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: refused(srv.url), 10)  # it stops accepting at once, and lets the stream finish
        threads[0].join(timeout=60)
        stopped_cleanly(srv)
        assert time.perf_counter() - t0 < 30  # it stopped when the stream ended, not at the end of the grace
        assert text_of(runs[0]) == solo(ortm, prompt, task, 250) and runs[0][-1][1] == "[DONE]"
    finally:
        srv.stop()


# ---- a bounded load test ---------------------------------------------------------------------------
MALFORMED = [  # (body, status): broken JSON, wrong shapes and types, lone surrogates, deep nesting, unknown tasks
    (b"{not json", 400), (b"[1, 2, 3]", 400), (b'{"model": "math", "prompt": "\\ud800"}', 400),
    (b'{"model": "math", "prompt": ' + b"[" * 64 + b"]" * 64 + b"}", 400),
    (json.dumps({"model": "math", "prompt": "hi", "temperature": 9}).encode(), 400),
    (json.dumps({"model": "math", "prompt": "hi", "max_tokens": -3}).encode(), 400),
    (json.dumps({"model": "math", "prompt": "hi", "logit_bias": {"1": 5}}).encode(), 400),
    (json.dumps({"model": "maths", "prompt": "hi"}).encode(), 404),
]


def test_a_bounded_load_of_16_clients_gets_no_5xx_and_every_answer_equals_its_sequential_one(serving_exports, ortm):
    """16 clients x 8 requests: mixed tasks, streamed (raw SSE) and whole (the openai client), 10 % malformed,
    15 % long prompts (read in chunks), 10 % openai streams closed after three chunks. No 5xx; every answer (and every cut stream, as a prefix) is the request's
    sequential answer; the server ends with no row left."""
    srv = ServerProcess(serving_exports["llama"], "--max-step-tokens", "64", "--max-batch-size", "8",
                        "--max-queue", "128")
    try:
        short = ["Hello world", "The cat sat on", "1+2=", "abc", "Once upon a time", "Q: why? A:"]
        jobs = [(p, t) for p in short for t in TASKS] + [(long_prompt(300 + 40 * k, k), TASKS[k % 2]) for k in range(4)]
        expected = {job: solo(ortm, job[0], job[1], 24) for job in jobs}
        outcomes: list[tuple[str, object]] = []
        lock = threading.Lock()
        oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def client(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(8):
                roll = rng.random()
                if roll < 0.10:
                    body, want = rng.choice(MALFORMED)
                    r = http("POST", srv.url + "/v1/completions", content=body)
                    result = ("malformed", r.status_code == want and "error" in r.json())
                else:
                    job = rng.choice(jobs[-4:]) if roll < 0.25 else rng.choice(jobs[:-4])
                    body = {"model": job[1], "prompt": job[0], "max_tokens": 24, "temperature": 0}
                    if roll < 0.35:  # the openai client, leaving after its first chunks
                        chunks = oai.completions.create(**body, stream=True)
                        got = "".join(c.choices[0].text for c, _ in zip(chunks, range(3)))
                        chunks.close()
                        result = ("left", expected[job].startswith(got))
                    elif rng.random() < 0.5:
                        events = []
                        stream(srv.url, body, events)
                        result = ("stream", events[0][1]["status"] == 200 and events[-1][1] == "[DONE]"
                                  and text_of(events) == expected[job])
                    else:
                        result = ("whole", oai.completions.create(**body).choices[0].text == expected[job])
                with lock:
                    outcomes.append(result)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(client, range(16)))
        wrong = [kind for kind, ok in outcomes if not ok]
        assert len(outcomes) == 128 and not wrong, wrong
        assert {kind for kind, _ in outcomes} == {"malformed", "left", "stream", "whole"}
        statuses = re.findall(r'^moorize_requests_total\{endpoint="completions",status="(\d+)"\} (\S+)$',
                              http("GET", srv.url + "/metrics").text, re.M)
        assert statuses and not [s for s, _ in statuses if s.startswith("5")], statuses
        assert metric(srv.url, "moorize_prefill_chunks_total") > 0  # the long prompts were read in chunks
        wait_until(lambda: metric(srv.url, "moorize_running_rows") == 0, 30)
        assert srv.proc.poll() is None and "Traceback" not in srv.output()
    finally:
        srv.stop()


def test_build_app_takes_the_serve_options_as_keywords_for_another_asgi_server(serving_exports, ortm):
    from starlette.testclient import TestClient

    from moorize.errors import MoorizeError
    from moorize.serving.server import build_app

    with pytest.raises(MoorizeError, match="unknown serve option"):
        build_app(serving_exports["llama"], max_batch=2)
    app = build_app(serving_exports["llama"], max_batch_size=2, max_step_tokens=8)
    with TestClient(app) as client:  # the lifespan starts and stops the engine
        r = client.post("/v1/completions", json={"model": "math", "prompt": "Hello world", "max_tokens": 5,
                                                 "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == solo(ortm, "Hello world", "math", 5)
