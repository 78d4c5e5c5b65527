"""Export of the real checkpoints: SmolLM2-135M-Instruct (decoder, KV cache) and all-MiniLM-L6-v2
(encoder with classification heads), routed, with routers set away from their initialisation."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from conftest import SMOL_TASKS
from helpers import randomize_routers

import moorize
from moorize.exporters import ops
from moorize.exporters.onnx import export_onnx, inline_functions
from moorize.exporters.torchscript import export_pt2, export_torchscript
from moorize.model.heads import TaskHeads
from moorize.runtime import MoOREOrtModel

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Write a haiku about autumn leaves:", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def smol(smollm2_export):
    """(factored dir, adapter, ONNX export with past and the custom op, its report)."""
    return smollm2_export


def test_smollm2_custom_op_logits_every_task(smol):
    factored, adapter, dest, report = smol
    model = onnx.load(str(dest / "model.onnx"), load_external_data=False)
    assert report.moore_nodes == 210 == sum(n.domain == ops.OP_DOMAIN for n in model.graph.node)
    v = report.validation
    print("\n".join(v.lines()))
    assert set(v.diffs) == set(SMOL_TASKS) and v.ok
    assert max(v.diffs[t]["logits"] for t in SMOL_TASKS) < 5e-4  # logits reach ~30 in magnitude


def test_smollm2_greedy_with_past_equals_pytorch(smol):
    """16 new tokens, three prompts batched with left padding: one task per row, and one task for all."""
    factored, adapter, dest, _ = smol
    ortm = MoOREOrtModel.from_export(dest)
    pt = moorize.load(factored, adapter)
    ids, mask = ortm._encode(PROMPTS, left_pad=True)
    assert (mask == 0).any()  # the batch really is padded
    outputs = {}
    for tasks in (["math", "poem", "code"], ["code"] * 3):
        got = ortm.generate_ids(ids, mask, tasks, max_new_tokens=16)
        with torch.no_grad():
            want = pt.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), task_ids=tasks,
                               max_new_tokens=16, do_sample=False, pad_token_id=ortm.tokenizer.pad_token_id)
        want = want[:, ids.shape[1]:].numpy()
        assert got.shape == want.shape == (3, 16)  # nobody stopped early: 16 tokens compared per row
        assert np.array_equal(got, want), tasks
        outputs[tuple(tasks)] = got
    assert len({o.tobytes() for o in outputs.values()}) > 1  # the routers make the tasks differ
    text = ortm.generate(PROMPTS[0], task="math", max_new_tokens=8)
    assert "Paris" in text


def test_smollm2_decomposed_graph_equals_the_custom_op_graph(smol, tmp_path):
    """--decompose inlines the MoORELinear function bodies and nothing else (the tiny-model tests run that
    export end to end, validation included). On the real graph, the inlined model uses standard ops only
    and gives the custom-op export's logits and cache for every task, batched and left-padded."""
    _, _, dest, _ = smol
    flat = inline_functions(onnx.load(str(dest / "model.onnx"), load_external_data=False))
    assert not flat.functions and all(n.domain in ("", "ai.onnx") for n in flat.graph.node)
    dec = tmp_path / "dec"
    dec.mkdir()
    for f in dest.iterdir():  # the same weights, metadata and tokenizer: hard links, no copies
        if f.name != "model.onnx":
            os.link(f, dec / f.name)
    onnx.save_model(flat, dec / "model.onnx")
    custom, inlined = MoOREOrtModel.from_export(dest), MoOREOrtModel.from_export(dec)
    ids, mask = custom._encode(PROMPTS, left_pad=True)
    for task in SMOL_TASKS:
        tasks = custom.task_ids(task, len(PROMPTS))
        want = custom.run(ids, mask, tasks, custom.empty_past(len(PROMPTS)))
        got = inlined.run(ids, mask, tasks, inlined.empty_past(len(PROMPTS)))
        assert len(got) == len(want) == 1 + 2 * 30
        assert max(float(np.abs(g - w).max()) for g, w in zip(got, want)) < 1e-4, task


# ---- MiniLM: encoder with task heads -------------------------------------------------------------

MINI_TASKS = ["sentiment", "topic"]
LABELS = {"sentiment": ["negative", "positive"], "topic": ["sport", "politics", "science"]}
TEXTS = ["The match ended two to one after extra time.", "Parliament voted on the budget.",
         "What a wonderful, moving film."]


@pytest.fixture(scope="module")
def mini(minilm_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("mini-export")
    moorize.convert(minilm_path, root / "factored")
    model = moorize.load(root / "factored", tasks=MINI_TASKS)
    randomize_routers(model, seed=1)
    heads = TaskHeads(model.config.hidden_size, MINI_TASKS, LABELS)
    with torch.no_grad():
        heads.weight.mul_(20)  # confident heads, so argmax labels are stable
    moorize.save_adapter(model, root / "adapter", heads=heads)
    return root


@pytest.mark.parametrize("decompose", [False, True])
def test_minilm_classifier_every_task(mini, decompose):
    dest = mini / f"onnx-{decompose}"
    report = export_onnx(mini / "factored", dest, mini / "adapter", decompose=decompose)
    assert report.kind == "encoder" and report.validation.ok and set(report.validation.diffs) == set(MINI_TASKS)
    assert report.moore_nodes == 36
    clf = moorize.load_classifier(mini / "factored", mini / "adapter")
    ortm = MoOREOrtModel.from_export(dest)
    for task in MINI_TASKS:
        ids, mask = ortm._encode(TEXTS, left_pad=False)
        with torch.no_grad():
            want = clf(torch.from_numpy(ids), torch.from_numpy(mask), [task] * 3)[:, : len(LABELS[task])]
        got = ortm.scores(TEXTS, task)
        assert np.abs(got - want.numpy()).max() < 1e-4
        assert ortm.classify(TEXTS, task) == [LABELS[task][int(k)] for k in want.argmax(-1)]


def test_minilm_weights_reference(mini):
    ref, copy = mini / "onnx-ref", mini / "onnx-False"
    report = export_onnx(mini / "factored", ref, mini / "adapter", weights="reference")
    shard = mini / "factored" / "model.safetensors"
    assert os.stat(ref / "model.safetensors").st_ino == os.stat(shard).st_ino  # a link: no bytes copied
    assert report.graph_bytes < 2e6  # the graph file holds no weights
    assert report.referenced_bytes > 0.9 * (shard.stat().st_size - report.data_bytes)
    # the only bytes written are the adapter's (routers; their folding into the graph is not a copy of W)
    assert report.data_bytes < (mini / "adapter" / "adapter_model.safetensors").stat().st_size
    if not copy.exists():
        export_onnx(mini / "factored", copy, mini / "adapter")
    a, b = MoOREOrtModel.from_export(ref), MoOREOrtModel.from_export(copy)
    for task in MINI_TASKS:
        assert np.abs(a.scores(TEXTS, task) - b.scores(TEXTS, task)).max() < 1e-5


@pytest.mark.parametrize("backend", ["torchscript", "pt2"])
def test_minilm_torchscript_and_pt2(mini, backend):
    dest = mini / ("clf.pt" if backend == "torchscript" else "clf.pt2")
    fn = export_torchscript if backend == "torchscript" else export_pt2
    report = fn(mini / "factored", dest, mini / "adapter")
    print("\n".join(report.validation.lines()))
    assert dest.is_file() and report.validation.ok and set(report.validation.diffs) == set(MINI_TASKS)
