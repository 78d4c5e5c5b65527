"""Routers are objects (moorize/model/routers.py): a new router defined in one place, here, trains, merges (or
is refused) and exports with nothing else changed; and no module outside the router module tests the router's
name."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from test_train import factored_tiny, toy_causal, write_jsonl
from torch import nn

import moorize
from moorize.errors import MoorizeError
from moorize.model.adapter import read_adapter
from moorize.model.config import MoOREConfig
from moorize.model.routers import ROUTERS, Router, SampleRouter, register_router, router_for

REPO = Path(__file__).resolve().parent.parent


@register_router
class TaskOffsetRouter(Router):
    """A router of this test only: every task owns a free offset of the singular values, table = σ + D[t]
    (D [tasks, r], starting at zero). No sample term, so each task merges into one dense matrix."""

    name = "task-offset"
    task = True
    task_parameters = ("task_offset",)

    def create_task_parameters(self, layer, rank, dtype, generator) -> None:
        layer.task_offset = nn.Parameter(torch.zeros(len(self.config.tasks), rank, dtype=dtype))

    def table(self, layer, dtype=None):
        wide = dtype or torch.promote_types(layer.sigma.dtype, torch.float32)
        return layer.sigma.to(wide) + layer.task_offset.to(wide)


@register_router
class RawSampleRouter(SampleRouter):
    """A sample router of this test only, the input as it comes (no norm, whatever router_norm says)."""

    name = "sample-raw"

    @property
    def norm_eps(self):
        return None


@pytest.fixture(scope="module")
def factored(tmp_path_factory):
    return factored_tiny(tmp_path_factory.mktemp("routers"), "llama")


def test_a_registered_router_is_a_router_mode():
    assert isinstance(router_for(MoOREConfig(router="task-offset", tasks=["a", "b"])), TaskOffsetRouter)
    assert set(ROUTERS) >= {"task", "sample", "task+sample", "task-offset"}
    with pytest.raises(MoorizeError, match="unknown router mode 'nope'"):
        MoOREConfig(router="nope")


def test_a_new_router_trains_merges_and_exports(factored, tmp_path):
    from moorize.exporters.onnx import export_onnx
    from moorize.runtime import MoOREOrtModel

    fresh = moorize.load(factored, router="task-offset", tasks=["first", "last"])
    ids = torch.tensor([[5, 6, 7, 8, 30]])
    dense = transformers.AutoModelForCausalLM.from_pretrained(Path(factored).parent / "src-llama").eval()
    with torch.no_grad():  # at the start the model is exactly the original
        start = fresh(input_ids=ids, task_ids=torch.tensor([0])).logits
        assert (start - dense(input_ids=ids).logits).abs().max() < 1e-4

    data = write_jsonl(tmp_path / "train.jsonl", toy_causal(24))
    report = moorize.train(factored, data, tmp_path / "adapter", router="task-offset", max_steps=12, batch_size=8,
                           lr=3e-2, warmup=2, householder=0)
    losses = [r["loss"] for r in report.history if r["kind"] == "train"]
    assert sum(losses[-3:]) < sum(losses[:3])  # the offsets learn: the layer's backward reached them
    trained = moorize.load(factored, tmp_path / "adapter")
    layers = moorize.moore_layers(trained)
    assert all(isinstance(layer.router, TaskOffsetRouter) for layer in layers.values())
    assert all(layer.task_offset.abs().max() > 0 for layer in layers.values())
    config, saved = read_adapter(tmp_path / "adapter")  # the adapter's keys are the router's parameters
    assert config.router == "task-offset"
    assert {k.rpartition(".")[2] for k in saved} == {"task_offset"}

    with torch.no_grad():
        per_task = [trained(input_ids=ids, task_ids=torch.tensor([t])).logits for t in (0, 1)]
    assert (per_task[0] - per_task[1]).abs().max() > 1e-4
    merged_dir = moorize.merge(factored, tmp_path / "adapter", "last", tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - per_task[1]).abs().max() < 1e-4

    exported = export_onnx(factored, tmp_path / "onnx", tmp_path / "adapter")
    assert exported.validation is not None and exported.validation.ok  # every task against PyTorch
    ort = MoOREOrtModel.from_export(tmp_path / "onnx")
    mask = np.ones(ids.shape, dtype=np.int64)
    for t in (0, 1):
        logits = ort.run(ids.numpy(), mask, np.array([t]))[0]
        np.testing.assert_allclose(logits, per_task[t].numpy(), atol=2e-4, rtol=1e-4)


def test_a_new_sample_router_is_refused_by_merge_and_exports(factored, tmp_path):
    from moorize.exporters.onnx import export_onnx

    model = moorize.load(factored, router="sample-raw", tasks=["a", "b"], router_experts=8)
    with torch.no_grad():
        for layer in moorize.moore_layers(model).values():
            layer.router_out.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    moorize.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(MoorizeError, match="'sample-raw' has a sample router"):
        moorize.merge(factored, tmp_path / "adapter", "a", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    exported = export_onnx(factored, tmp_path / "onnx", tmp_path / "adapter")
    assert exported.validation is not None and exported.validation.ok


# the router's name compared, or its terms tested through the config: only the router module may
_ROUTER_TEST = re.compile(r"\brouter(_norm)?\s*(==|!=|\bnot\s+in\b|\bin\b)|(==|!=|\bin)\s*[\w.]*\.router(_norm)?\b"
                          r"|\buses_(task|sample)\b|[\"'](task|sample|task\+sample|rms)[\"']\s*(==|!=|\bin\b)\s*[\w.]*router")


def test_no_module_outside_the_router_module_tests_the_router_mode():
    allowed = {REPO / "moorize" / "model" / "routers.py", REPO / "moorize" / "model" / "config.py"}
    found = []
    for root in (REPO / "moorize", REPO / "exporters"):
        for path in root.rglob("*.py"):
            if path in allowed:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if _ROUTER_TEST.search(code):
                    found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert found == []


def test_the_pattern_catches_what_it_forbids():
    for line in ('if cfg.router == "task":', 'if config.uses_sample:', 'rms = cfg.router_norm == "rms"',
                 'if "sample" in self.router:', 'elif self.router not in ("task",):'):
        assert _ROUTER_TEST.search(line), line
    assert not _ROUTER_TEST.search("self.router.sample_weights(self)")
    assert not _ROUTER_TEST.search('if "sample" in parts:')  # an ONNX function overload's inputs, not a router
