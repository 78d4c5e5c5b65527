"""``moorize serve`` and onnxruntime-genai on the real SmolLM2-135M-Instruct export (three tasks, with past):
mixed tasks at once equal their solo greedy runs, chat through the checkpoint's own template, streamed text
(non-ASCII included) equal to the whole answer; genai's tokenizer and generator equal MoOREOrtModel."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime_genai as og
import openai
import pytest
from conftest import SMOL_TASKS
from helpers import ServerProcess, metric

from moorize.runtime import MoOREOrtModel

pytestmark = pytest.mark.slow

JOBS = [("The capital of France is", "math"), ("Write a haiku about autumn leaves:", "poem"),
        ("def fibonacci(n):", "code"), ("Translate into French: I love coffee and cake.", "poem"),
        ("List three prime numbers:", "math"), ("Écris une phrase sur l'été :", "code")]


@pytest.fixture(scope="module")
def smol(smollm2_export):
    return smollm2_export[2]


@pytest.fixture(scope="module")
def ortm(smol):
    return MoOREOrtModel.from_export(smol)


@pytest.fixture(scope="module")
def server(smol):
    srv = ServerProcess(smol, "--max-batch-size", "8")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_smollm2_mixed_tasks_at_once_equal_solo(client, ortm):
    barrier = threading.Barrier(len(JOBS))

    def call(job):
        barrier.wait()
        return client.completions.create(model=job[1], prompt=job[0], max_tokens=24, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(JOBS)) as pool:
        got = list(pool.map(call, JOBS))
    for (prompt, task), text in zip(JOBS, got):
        assert text == ortm.generate(prompt, task=task, max_new_tokens=24), (prompt, task)
    assert "Paris" in got[0]


def test_smollm2_chat_template_and_streaming(client, ortm):
    messages = [{"role": "user", "content": "Say hello in French, in one short sentence."}]
    tok = ortm.tokenizer
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    for task in SMOL_TASKS[:2]:
        whole = client.chat.completions.create(model=task, messages=messages, max_tokens=40, temperature=0)
        new = ortm.generate_ids(np.array([ids]), None, task, max_new_tokens=40)[0].tolist()
        eos = set(ortm.meta["eos_token_id"])
        new = new[: next((i for i, t in enumerate(new) if t in eos), len(new))]
        assert whole.choices[0].message.content == tok.decode(new, skip_special_tokens=True)
        stream = client.chat.completions.create(model=task, messages=messages, max_tokens=40, temperature=0,
                                                stream=True)
        pieces = [c.choices[0].delta.content or "" for c in stream]
        assert "".join(pieces) == whole.choices[0].message.content
        assert "\ufffd" not in "".join(pieces)


def test_smollm2_genai_equals_moore_ort_model(smol, ortm):
    model = og.Model(str(smol))
    tokenizer = og.Tokenizer(model)
    for prompt, task in JOBS[:3]:
        ids = np.array(tokenizer.encode(prompt), dtype=np.int64)
        assert ids.tolist() == ortm.tokenizer(prompt)["input_ids"]
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 20, do_sample=False)
        gen = og.Generator(model, params)
        gen.set_model_input("task_ids", np.array([ortm.tasks[task]], dtype=np.int64))
        gen.append_tokens(ids[None].astype(np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        out = [int(t) for t in gen.get_sequence(0)[len(ids):]]
        eos = set(ortm.meta["eos_token_id"])
        out = out[: next((i for i, t in enumerate(out) if t in eos), len(out))]
        assert tokenizer.decode(out) == ortm.generate(prompt, task=task, max_new_tokens=20)


def test_smollm2_a_client_that_gives_up_frees_its_row(server):
    """Not streamed: the client times out after 1 s of a 300-token request; the row is cancelled early."""
    cancelled = metric(server.url, "moorize_finished_total", reason="cancelled")
    impatient = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model="code", prompt="def fibonacci(n):", max_tokens=300, temperature=0)
    for _ in range(100):
        if metric(server.url, "moorize_finished_total", reason="cancelled") > cancelled:
            break
        time.sleep(0.1)
    assert metric(server.url, "moorize_finished_total", reason="cancelled") == cancelled + 1
    assert metric(server.url, "moorize_running_rows") == 0
