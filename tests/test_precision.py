"""Reduced precision and training memory: bf16/fp16 factored checkpoints end to end (convert, load,
train with float32 trainable tensors over frozen bf16 factors, merge, export), ``load(dtype=)``
keeping the trainable tensors in float32, and gradient checkpointing computing the same losses and
gradients, mixed tasks included."""

from __future__ import annotations

import pytest
import torch
from helpers import perturb
from safetensors.torch import load_file
from test_train import FAST, factored_tiny, toy_causal, write_jsonl

import moorize
from moorize.model.layer import moore_layers, trainable_parameters
from moorize.model.routed import prepare_for_training


def factor_tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update({k: v for k, v in load_file(f).items() if ".moore." in k})
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_factors_load_close_to_float32(tiny_model_dir, tmp_path, dtype):
    model, src = tiny_model_dir("llama")
    moorize.convert(src, tmp_path / "f", dtype=dtype)
    factors = factor_tensors(tmp_path / "f")
    assert factors and {v.dtype for v in factors.values()} == {getattr(torch, dtype)}
    routed = moorize.load(tmp_path / "f", tasks=["a", "b"], router="task+sample")
    assert all(p.dtype == torch.float32 for p in trainable_parameters(routed).values())
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        got = routed(ids, task_ids=["a", "b"]).logits
    assert got.dtype == torch.float32
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()  # bf16 keeps ~3 significant digits


def test_load_dtype_casts_the_frozen_model_and_keeps_trainable_tensors_in_float32(tiny_model_dir, tmp_path):
    _, src = tiny_model_dir("llama")
    moorize.convert(src, tmp_path / "f")
    routed = moorize.load(tmp_path / "f", tasks=["a", "b"], dtype=torch.bfloat16)
    trainable = trainable_parameters(routed)
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    frozen = [p for n, p in routed.named_parameters() if all(p is not t for t in trainable.values())]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(layer.U.dtype == torch.bfloat16 for layer in moore_layers(routed).values())
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(routed(ids, task_ids=["a", "b"]).logits).all()


def test_bf16_factors_train_merge_and_export(tmp_path):
    """Frozen bf16 factors, float32 routers: the loss falls, the factors stay bitwise as converted, and the
    adapter merges and exports (float16)."""
    from moorize.exporters.onnx import export_onnx

    factored_tiny(tmp_path, "llama")  # writes the tiny source (with its tokenizer) to tmp_path / "src-llama"
    moorize.convert(tmp_path / "src-llama", tmp_path / "bf16", dtype="bfloat16")
    before = factor_tensors(tmp_path / "bf16")
    data = write_jsonl(tmp_path / "d.jsonl", toy_causal(24))
    report = moorize.train(tmp_path / "bf16", data, tmp_path / "ad", max_steps=30, router="task", **FAST)
    losses = [r["loss"] for r in report.history if "loss" in r]
    assert losses[-1] < losses[0]
    after = factor_tensors(tmp_path / "bf16")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    adapter = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert {v.dtype for v in adapter.values()} == {torch.float32}
    moorize.merge(tmp_path / "bf16", tmp_path / "ad", "first", tmp_path / "merged")
    report = export_onnx(tmp_path / "bf16", tmp_path / "onnx", tmp_path / "ad", with_past=True, dtype="float16")
    assert report.validation.ok and report.validation.dtype == "float16"


@pytest.mark.parametrize("router,entry", [("task", "gradient_checkpointing_enable"),
                                          ("task+sample", "activation_checkpointing_enable")])
def test_gradient_checkpointing_gives_the_same_losses_and_gradients(tiny_model_dir, tmp_path, router, entry):
    """Recomputed blocks must route with the task ids of their first forward, also for a mixed batch, whichever
    of transformers' entry points turns checkpointing on."""
    _, src = tiny_model_dir("llama")
    moorize.convert(src, tmp_path / "f")
    ids = torch.randint(3, 96, (3, 11), generator=torch.Generator().manual_seed(0))
    results = []
    for checkpointing in (False, True):
        model = moorize.load(tmp_path / "f", tasks=["a", "b", "c"], router=router)
        perturb(model, seed=4)
        params = prepare_for_training(model)
        model.train()
        if checkpointing:
            if not hasattr(model, entry):  # transformers before activation_checkpointing_enable
                entry = "gradient_checkpointing_enable"
            getattr(model, entry)()
            assert model.is_gradient_checkpointing
        loss = model(ids, labels=ids, task_ids=["a", "c", "b"]).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in params]))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-6, atol=1e-7)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(g0, g1))
    assert any(a.abs().max() > 0 for a in g0)


def test_train_with_gradient_checkpointing_matches_without(tmp_path):
    base = factored_tiny(tmp_path, "llama")
    data = write_jsonl(tmp_path / "d.jsonl", toy_causal(16))
    runs = [moorize.train(base, data, tmp_path / f"ad{gc}", max_steps=5, gradient_checkpointing=gc, **FAST)
            for gc in (False, True)]
    loss = [[r["loss"] for r in run.history if "loss" in r] for run in runs]
    assert loss[0] == pytest.approx(loss[1], rel=1e-5)
    a, b = (load_file(tmp_path / f"ad{gc}" / "adapter_model.safetensors") for gc in (False, True))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_smollm2_with_bf16_factors_learns_and_leaves_the_factors_bitwise_unchanged(smollm2_dir, tmp_path):
    moorize.convert(smollm2_dir, tmp_path / "bf16", dtype="bfloat16")
    before = factor_tensors(tmp_path / "bf16")
    assert {v.dtype for v in before.values()} == {torch.bfloat16}
    rows = [{"task": t, "prompt": f"Q{i}: say {t}.", "response": f" {t} {t} {t}."}
            for i in range(8) for t in ("alpha", "omega")]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    report = moorize.train(tmp_path / "bf16", data, tmp_path / "ad", max_steps=6, batch_size=4, lr=5e-3,
                           warmup=1, router="task", max_length=32, seed=0)
    losses = [r["loss"] for r in report.history if "loss" in r]
    assert losses[-1] < losses[0]
    after = factor_tensors(tmp_path / "bf16")
    assert all(torch.equal(before[k], after[k]) for k in before)
