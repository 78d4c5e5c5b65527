"""torch.compile(fullgraph=True) of a routed model: a training step and a KV-cache decode step of every router
capture with no graph break and compute what eager mode computes; ``moorize train --compile`` trains.

The captures use the ``aot_eager`` backend (dynamo + AOT autograd, no code generation: what a graph break
or an untraceable layer would fail), and one decode step runs through inductor's generated code."""

from __future__ import annotations

import pytest
import torch
from test_train import FAST, factored_tiny, toy_causal, write_jsonl

import moorize
from moorize.compat import cache_keyword
from moorize.model.layer import moore_layers

pytestmark = pytest.mark.versions  # also run at the minimum versions and on the newest torch (.ci/run)


@pytest.fixture(scope="module")
def factored(tmp_path_factory):
    return factored_tiny(tmp_path_factory.mktemp("compile"), "llama")


def routed(factored, router):
    model = moorize.load(factored, router=router, tasks=["a", "b"]).train()
    params = moorize.prepare_for_training(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking routers: every term of the gate is live
        for layer in moore_layers(model).values():
            for p in layer._trainables():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model, params


def fresh():
    torch._dynamo.reset()


@pytest.mark.parametrize("router", ["task", "sample", "task+sample"])
def test_training_step_compiles_with_no_graph_break(factored, router):
    fresh()
    model, params = routed(factored, router)
    ids = torch.randint(4, 60, (2, 16), generator=torch.Generator().manual_seed(1))
    tasks = torch.tensor([0, 1])
    eager = model(input_ids=ids, labels=ids, task_ids=tasks).loss
    eager.backward()
    want = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(input_ids=ids, labels=ids, task_ids=tasks).loss
    loss.backward()
    assert torch.allclose(loss, eager, atol=1e-6)
    for p, w in zip(params, want):
        assert torch.allclose(p.grad, w, atol=1e-6, rtol=1e-4)


def decode_pair(model, compiled, router):
    """The logits of one decode step after a prefill, eager and compiled, from the same cache."""
    model.eval()
    key = cache_keyword(model)
    ids = torch.randint(4, 60, (2, 12), generator=torch.Generator().manual_seed(2))
    tasks = torch.tensor([0, 1])
    with torch.no_grad():
        out = model(input_ids=ids, task_ids=tasks, use_cache=True)  # eager: fills the layers' inference caches
        past, token = out[key], out.logits[:, -1:].argmax(-1)
        want = model(input_ids=token, task_ids=tasks, use_cache=True, **{key: past}).logits
        past.crop(-1)
        got = compiled(input_ids=token, task_ids=tasks, use_cache=True, **{key: past}).logits
    return got, want


@pytest.mark.parametrize("router", ["task", "sample", "task+sample"])
def test_decode_step_compiles_with_no_graph_break(factored, router):
    fresh()
    model, _ = routed(factored, router)
    got, want = decode_pair(model, torch.compile(model, fullgraph=True, backend="aot_eager"), router)
    assert torch.allclose(got, want, atol=1e-5)


def test_decode_step_runs_as_inductor_code(factored):
    fresh()
    model, _ = routed(factored, "task+sample")
    got, want = decode_pair(model, torch.compile(model, fullgraph=True), "task+sample")
    assert torch.allclose(got, want, atol=1e-4)


def test_moorize_train_compile(factored, tmp_path, monkeypatch):
    fresh()
    monkeypatch.setenv("MOORIZE_COMPILE_BACKEND", "aot_eager")
    data = write_jsonl(tmp_path / "train.jsonl", toy_causal(16))
    plain = moorize.train(factored, data, tmp_path / "plain", max_steps=4, **FAST)
    compiled = moorize.train(factored, data, tmp_path / "compiled", max_steps=4, compile=True, **FAST)
    assert [r["loss"] for r in compiled.history if r["kind"] == "train"] == pytest.approx(
        [r["loss"] for r in plain.history if r["kind"] == "train"], abs=1e-5)



@pytest.fixture(scope="module")
def adapters(factored, tmp_path_factory):
    """router -> an adapter trained a few steps on two tasks (the tasks' routes differ)."""
    out = tmp_path_factory.mktemp("adapters")
    data = write_jsonl(out / "train.jsonl", toy_causal(16))
    made = {}

    def get(router):
        if router not in made:
            made[router] = moorize.train(factored, data, out / router.replace("+", "-"), max_steps=6, router=router,
                                         **FAST).adapter
        return made[router]
    return get


@pytest.mark.parametrize("router", ["task", "task+sample"])
def test_compiled_generation_writes_the_eager_tokens(factored, adapters, monkeypatch, router):
    """moorize generate --compile: transformers' static-cache decode step, compiled whole (a graph break raises),
    gives the eager tokens of every task in one batch, greedy and sampled."""
    from torch._dynamo.utils import counters

    from moorize.model.pytorch_generation import PyTorchGenerator

    fresh()
    monkeypatch.setenv("MOORIZE_COMPILE_BACKEND", "aot_eager")
    eager = PyTorchGenerator(factored, adapters(router))
    compiled = PyTorchGenerator(factored, adapters(router), compile=True)
    texts, tasks = ["abcd=", "fed=", "cab="], ["first", "last", "first"]
    counters.clear()
    assert compiled.generate(texts, tasks, max_new_tokens=5) == eager.generate(texts, tasks, max_new_tokens=5)
    assert counters["stats"]["unique_graphs"] >= 1  # the decode step was captured (fullgraph: whole)
    sampled = {"do_sample": True, "temperature": 0.8, "seed": 3}  # the same graph again, with the sampler's draws
    assert compiled.generate(texts, tasks, max_new_tokens=5, **sampled) == eager.generate(texts, tasks,
                                                                                         max_new_tokens=5, **sampled)
    assert eager.generate(["abcd="], ["first"], max_new_tokens=5) != eager.generate(["abcd="], ["last"],
                                                                                    max_new_tokens=5)
