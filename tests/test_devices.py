"""Every stage on each device: the CPU always, a CUDA GPU where one is present (``pytest -m gpu`` runs those alone).

The same assertions hold on both: conversion reproduces the weights, the layer matches the published
per-token formula in float32 and bfloat16 (outputs and gradients), a loaded model is the original, a
few training steps under autocast learn, and what was trained on the device merges and exports exactly.
On a machine without a GPU the ``cuda`` cases are reported as skipped, with the reason.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny
from test_train import FAST, factored_tiny, toy_causal, write_jsonl

import moorize
from moorize import MoOREConfig, MoORELinear, moore_layers
from moorize.exporters.onnx import export_onnx
from moorize.io.factored import FactoredCheckpoint
from moorize.model.layer import RoutingState, layer_trainable

pytestmark = pytest.mark.versions  # also run at the minimum versions and on the newest torch (.ci/run)

NO_GPU = "needs a CUDA GPU (run `pytest -m gpu` on a machine that has one)"
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu,
                                                   pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)])]


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits.float().cpu()


@pytest.mark.parametrize("device", DEVICES)
def test_convert_on_device_reproduces_every_weight(device, tmp_path):
    original = build_tiny("llama")
    original.save_pretrained(tmp_path / "src")
    report = moorize.convert(tmp_path / "src", tmp_path / "factored", device=device)
    assert report.device.startswith(device) and report.worst_rel_error < 1e-5
    weights = dict(original.named_parameters())
    with FactoredCheckpoint(tmp_path / "factored") as ckpt:
        assert len(ckpt.layers) == 14  # 7 projections × 2 blocks
        for name in ckpt.layers:
            U, S, Vh, _ = ckpt.factors(name)
            assert U.device.type == "cpu"  # written from the device to disk, read back on the host
            w = weights[name + ".weight"].detach()
            assert torch.allclose((U * S) @ Vh, w, atol=1e-5 * w.abs().max().item())


def _random_layer(seed: int = 0) -> MoORELinear:
    torch.manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(48, 32))
    Vh = torch.linalg.qr(torch.randn(32, 32))[0].t().contiguous()
    cfg = MoOREConfig(tasks=["a", "b"], householder=4, router_experts=8, task_dim=4)
    layer = MoORELinear(U, torch.rand(32) + 0.5, Vh, None, None, cfg, RoutingState(cfg.tasks))
    with torch.no_grad():
        for p in layer_trainable(layer).values():
            p.add_(torch.randn_like(p) * 0.1)
    return layer


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("device", DEVICES)
def test_layer_forward_and_backward_on_device(device, dtype, tol):
    """The fast path on the device against the published per-token formula on the CPU in float32."""
    layer = _random_layer()
    x = torch.randn(3, 6, 32) * torch.logspace(-1, 1, 6)[:, None]  # tokens of different sizes
    tasks = torch.tensor([0, 1, 1])
    ref_out = layer.forward_reference(x, tasks)
    (ref_out * torch.linspace(-1, 1, 48)).sum().backward()
    ref_grads = {k: p.grad.clone() for k, p in layer_trainable(layer).items()}
    layer.zero_grad()

    layer.to(device=device, dtype=dtype)
    layer.state.task_ids = tasks.to(device)
    out = layer(x.to(device=device, dtype=dtype))
    assert out.device.type == device and out.dtype == dtype
    (out.float() * torch.linspace(-1, 1, 48, device=device)).sum().backward()
    rel = lambda got, ref: ((got.float().cpu() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert rel(out, ref_out) < tol
    for name, p in layer_trainable(layer).items():
        assert p.grad is not None and p.grad.device.type == device, name
        assert rel(p.grad, ref_grads[name]) < 4 * tol, name


@pytest.mark.parametrize("device", DEVICES)
def test_loaded_model_on_device_is_the_original(device, tmp_path):
    original = build_tiny("llama")
    original.save_pretrained(tmp_path / "src")
    moorize.convert(tmp_path / "src", tmp_path / "factored")
    routed = moorize.load(tmp_path / "factored", tasks=["a", "b"]).eval()
    ids = torch.randint(3, original.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    on_host = _logits(routed, ids, task_ids=torch.tensor([0, 1]))  # fills the layers' inference caches
    routed.to(device)  # ... which must follow the weights to the device
    original.to(device)
    ids = ids.to(device)
    task_ids = torch.tensor([0, 1], device=device)
    assert torch.allclose(_logits(routed, ids, task_ids=task_ids), _logits(original, ids), atol=1e-4)
    assert torch.allclose(on_host, _logits(original, ids), atol=1e-4)
    greedy = routed.generate(ids, task_ids=task_ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(greedy, original.generate(ids, max_new_tokens=5, do_sample=False))


@pytest.fixture(scope="module")
def factored(tmp_path_factory):
    return factored_tiny(tmp_path_factory.mktemp("devices"), "llama")


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_training_on_device_then_merge_and_export(device, factored, tmp_path):
    """A few autocast steps on the device learn; the adapter then merges and exports exactly (on the host)."""
    data = write_jsonl(tmp_path / "train.jsonl", toy_causal(32))
    report = moorize.train(factored, data, tmp_path / "adapter", max_steps=16, precision="bf16",
                           cpu=device == "cpu", **{**FAST, "router": "task"})
    losses = [r["loss"] for r in report.history if r["kind"] == "train"]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-4:]) < 0.8 * sum(losses[:4])

    routed = moorize.load(factored, tmp_path / "adapter").eval()
    assert any(layer.task_router.abs().max() > 0 for layer in moore_layers(routed).values())
    ids = torch.randint(4, routed.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    trained = _logits(routed, ids, task_ids=torch.tensor([1]))

    dense = moorize.merge(factored, tmp_path / "adapter", "last", tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(dense).eval()
    assert torch.allclose(_logits(merged, ids), trained, atol=1e-4)

    exported = export_onnx(factored, tmp_path / "onnx", tmp_path / "adapter")
    assert exported.validation is not None and exported.validation.ok


PROVIDER_PROBE = """
import sys
sys.modules["torch"] = None  # a deployment with onnxruntime-gpu and no torch: importing torch fails
import onnxruntime
from moorize.runtime import providers as ort
onnxruntime.get_available_providers = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
ort.nvidia_gpu_visible = lambda: sys.argv[1] == "gpu"
print(ort.default_providers())
"""


@pytest.mark.parametrize("machine, first", [("gpu", "CUDAExecutionProvider"), ("none", "CPUExecutionProvider")])
def test_onnx_runtime_chooses_the_gpu_without_torch(machine, first):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", PROVIDER_PROBE, machine], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1].startswith(f"['{first}'")


def test_hidden_gpus_are_not_chosen(monkeypatch):
    from moorize.runtime.providers import nvidia_gpu_visible

    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert nvidia_gpu_visible() is False
