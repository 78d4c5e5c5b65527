"""The routed model: MoORE layers loaded from the factored format (tiny models of six architectures)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers
from conftest import ARCHS, build_tiny
from helpers import perturb as _perturb

import moorize
from moorize import MoOREConfig, MoORELinear, MoorizeError, moore_layers
from moorize.model.layer import RoutingState, layer_trainable

pytestmark = pytest.mark.versions  # also run at the minimum versions and on the newest torch (.ci/run)

TASKS = ["alpha", "beta", "gamma"]


def _convert(arch, tmp_path, **kw):
    model = build_tiny(arch)
    model.save_pretrained(tmp_path / "src")
    moorize.convert(tmp_path / "src", tmp_path / "factored", **kw)
    return model, tmp_path / "factored"


def _inputs(model, batch=2, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)


def apply_householder(M: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Independent reference: M · H_k ⋯ H_1, one reflection H_i = I − 2 u_i u_iᵀ / ‖u_i‖² at a time."""
    for u in reversed(vectors):
        M = M - (M @ u).unsqueeze(-1) * (u * (2.0 / (u @ u))).unsqueeze(0)
    return M


def _out(model, ids, **kw):
    with torch.no_grad():
        o = model(input_ids=ids, **kw)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("arch", ARCHS)
def test_initial_routed_model_equals_original(arch, tmp_path):
    original, factored = _convert(arch, tmp_path)
    routed = moorize.load(factored, tasks=TASKS)
    assert type(routed) is type(original)
    layers = moore_layers(routed)
    assert len(layers) == len(moorize.FactoredCheckpoint(factored).layers) > 0
    assert all(isinstance(m, MoORELinear) for m in layers.values())
    ids = _inputs(original)
    ref = _out(original, ids)
    for t in range(len(TASKS)):
        got = _out(routed, ids, task_ids=torch.tensor([t, (t + 1) % 3]))
        assert (got - ref).abs().max().item() < 1e-4


def test_no_dense_target_weights_in_the_routed_model(tmp_path):
    _, factored = _convert("llama", tmp_path)
    routed = moorize.load(factored)
    names = {n for n, _ in routed.named_parameters()} | {n for n, _ in routed.named_buffers()}
    assert not any(n.endswith("q_proj.weight") or n.endswith("down_proj.weight") for n in names)
    assert any(n.endswith("q_proj.U") for n in names)


@pytest.mark.parametrize("norm", ["none", "rms"])  # "none": the published router; "rms": moorize's default
def test_layer_matches_published_per_token_formulation(norm):
    torch.manual_seed(0)
    m, n, r = 40, 32, 24
    U, _ = torch.linalg.qr(torch.randn(m, r))
    Vh = torch.linalg.qr(torch.randn(n, r))[0].t().contiguous()
    S = torch.rand(r) + 0.5
    R, b = torch.randn(m, n) * 0.01, torch.randn(m)
    cfg = MoOREConfig(tasks=["a", "b"], task_dim=8, router_experts=16, householder=6, router_norm=norm)
    state = RoutingState(cfg.tasks)
    layer = MoORELinear(U, S, Vh, R, b, cfg, state)
    x = torch.randn(2, 5, n) * torch.logspace(-1, 1, 5)[:, None]  # tokens of different sizes
    state.task_ids = torch.tensor([0, 1])
    at_init = layer(x)
    dense = x @ ((U * S) @ Vh + R).t() + b
    assert torch.allclose(at_init, dense, atol=1e-5)  # H = I, A = B = 0: exactly W x + b
    with torch.no_grad():
        for p in layer_trainable(layer).values():
            p.add_(torch.randn_like(p) * 0.1)
    fast, ref = layer(x), layer.forward_reference(x, torch.tensor([0, 1]))
    assert ((fast - ref).norm() / ref.norm()).item() < 1e-5
    assert not torch.allclose(fast, dense, atol=1e-3)
    # gradients of the token-side WY path equal the reference's
    grads = []
    for out in (layer(x), layer.forward_reference(x, torch.tensor([0, 1]))):
        layer.zero_grad()
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads.append({n: p.grad.clone() for n, p in layer_trainable(layer).items()})
    for n in grads[0]:
        assert ((grads[0][n] - grads[1][n]).norm() / grads[1][n].norm()).item() < 1e-5, n
    # the cached inference path (eval, no grad) too
    layer.eval()
    with torch.no_grad():
        cached = layer(x)
    assert ((cached - ref).norm() / ref.norm()).item() < 1e-5
    # the WY rotation equals the reflections applied one by one; H stays orthogonal, so the rotated
    # experts stay orthonormal
    vh_rot = apply_householder(Vh, layer.householder.detach())
    assert torch.allclose(layer.rotated_vh().detach(), vh_rot, atol=1e-6)
    assert torch.allclose(vh_rot @ vh_rot.t(), torch.eye(r), atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_layer_in_half_precision(dtype, tol):
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(48, 32))
    Vh = torch.linalg.qr(torch.randn(32, 32))[0].t().contiguous()
    cfg = MoOREConfig(tasks=["a"], householder=4, router_experts=8, task_dim=4)
    layer = MoORELinear(U, torch.rand(32) + 0.5, Vh, None, None, cfg, RoutingState(cfg.tasks))
    with torch.no_grad():
        for p in layer_trainable(layer).values():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(3, 6, 32)
    ref = layer.forward_reference(x)
    half = layer.to(dtype)(x.to(dtype))
    assert half.dtype == dtype
    assert ((half.float() - ref).norm() / ref.norm()).item() < tol


def test_eval_cache_tracks_parameter_updates(tmp_path):
    _, factored = _convert("llama", tmp_path)
    model = moorize.load(factored, tasks=["a"])
    ids = _inputs(model)
    before = _out(model, ids)
    _perturb(model)
    after = _out(model, ids)
    assert not torch.allclose(before, after)
    assert torch.equal(after, _out(model, ids))


def test_gradients_reach_exactly_the_trainable_set(tmp_path):
    _, factored = _convert("qwen2", tmp_path, rank="energy:0.8")  # residuals and biases present
    model = moorize.load(factored, tasks=TASKS)
    trainable = moorize.prepare_for_training(model)
    trainable_ids = {id(p) for p in trainable}
    frozen = {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())
              if id(t) not in trainable_ids}
    assert any(n.endswith(".U") for n in frozen) and any(n.endswith(".residual") for n in frozen)
    assert any(n.endswith(".sigma") for n in frozen) and any(n.endswith(".bias") for n in frozen)
    model.train()
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = _inputs(model)
    start = {id(p): p.detach().clone() for p in trainable}
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids, task_ids=torch.tensor([0, 2])).loss
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (id(p) in trainable_ids), n
        opt.step()
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) not in trainable_ids:
            assert torch.equal(t, frozen[n]), f"{n} changed"
    # every MoORE parameter moved (C and e_t only once B and A left zero, after the first step)
    assert all(not torch.equal(p, start[id(p)]) for p in trainable)


def test_train_sigma_makes_sigma_trainable(tmp_path):
    _, factored = _convert("llama", tmp_path)
    model = moorize.load(factored, train_sigma=True)
    params = moorize.prepare_for_training(model)
    sigmas = [p for p in params if p.dim() == 1 and p.shape[0] in {24, 48}]
    assert sigmas and all(p.requires_grad for p in sigmas)
    assert any(n.endswith(".sigma") for n, p in model.named_parameters() if p.requires_grad)


def test_tasks_route_differently_and_task_mode_merges_exactly(tmp_path):
    original, factored = _convert("gpt2", tmp_path, rank="energy:0.9")  # Conv1D + residuals + biases
    model = moorize.load(factored, router="task", tasks=TASKS)
    _perturb(model, scale=0.2)
    ids = _inputs(model)
    outs = [_out(model, ids, task_ids=torch.tensor([t, t])) for t in range(3)]
    assert (outs[0] - outs[1]).abs().max() > 1e-3 and (outs[1] - outs[2]).abs().max() > 1e-3
    # inference with one task per batch runs the cached merged matrix; mixed batches the routed path
    with torch.no_grad():
        mixed = model(input_ids=ids, task_ids=torch.tensor([0, 1])).logits
    assert (mixed[0] - outs[0][0]).abs().max() < 1e-5 and (mixed[1] - outs[1][1]).abs().max() < 1e-5
    assert all(len(layer._merged) == 3 for layer in moore_layers(model).values())
    with torch.enable_grad():  # gradients on: the routed (unmerged) path, same numbers
        routed_path = model(input_ids=ids, task_ids=torch.tensor([1, 1])).logits.detach()
    assert (routed_path - outs[1]).abs().max() < 1e-5
    moorize.save_adapter(model, tmp_path / "adapter")
    dest = moorize.merge(factored, tmp_path / "adapter", "beta", tmp_path / "merged")
    dense = transformers.GPT2LMHeadModel.from_pretrained(dest).eval()
    assert (_out(dense, ids) - outs[1]).abs().max().item() < 1e-5
    assert not (dest / "moorize.json").exists()


def test_merge_refuses_a_sample_router(tmp_path):
    _, factored = _convert("llama", tmp_path)
    model = moorize.load(factored, router="task+sample", tasks=TASKS)
    moorize.save_adapter(model, tmp_path / "adapter")
    run = subprocess.run([sys.executable, "-m", "moorize", "merge", str(factored), str(tmp_path / "dense"),
                          "--adapter", str(tmp_path / "adapter"), "--task", "alpha"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert "sample router" in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "dense").exists()


def test_sample_router_changes_outputs_per_input(tmp_path):
    original, factored = _convert("llama", tmp_path)
    model = moorize.load(factored, router="sample")
    _perturb(model)
    ids = _inputs(model)
    assert (_out(model, ids) - _out(original, ids)).abs().max() > 1e-3  # no task ids needed


def test_adapter_roundtrip_and_base_check(tmp_path):
    _, factored = _convert("llama", tmp_path / "a")
    model = moorize.load(factored, tasks=TASKS, householder=4, router_experts=16)
    _perturb(model)
    moorize.save_adapter(model, tmp_path / "adapter")
    again = moorize.load(factored, tmp_path / "adapter")
    assert again.moore_tasks == {"alpha": 0, "beta": 1, "gamma": 2}
    assert again.moore_config.householder == 4 and again.moore_config.router_experts == 16
    ids = _inputs(model)
    assert torch.equal(_out(model, ids, task_ids=torch.tensor([1, 2])), _out(again, ids, task_ids=torch.tensor([1, 2])))
    # settings beside an adapter must be its own (they used to be checked, then ignored)
    same = moorize.load(factored, tmp_path / "adapter", tasks=TASKS, householder=4, router=again.moore_config.router)
    assert same.moore_tasks == again.moore_tasks
    with pytest.raises(MoorizeError, match=r"router='task' differs from the adapter's router='task\+sample'"):
        moorize.load(factored, tmp_path / "adapter", router="task")
    with pytest.raises(MoorizeError, match="tasks=\\['x'\\] differs"):
        moorize.load(factored, tmp_path / "adapter", tasks=["x"])
    with pytest.raises(MoorizeError, match="a config was given with the adapter"):
        moorize.load(factored, tmp_path / "adapter", moorize.MoOREConfig(tasks=TASKS))
    other = build_tiny("llama", seed=3)
    other.save_pretrained(tmp_path / "b" / "src")
    moorize.convert(tmp_path / "b" / "src", tmp_path / "b" / "factored")
    with pytest.raises(MoorizeError, match="different base"):
        moorize.load(tmp_path / "b" / "factored", tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(MoorizeError, match="missing adapter_model.safetensors"):
        moorize.load(factored, tmp_path / "adapter")


def test_task_errors_are_clear(tmp_path):
    _, factored = _convert("llama", tmp_path)
    model = moorize.load(factored, tasks=TASKS)
    ids = _inputs(model)
    with pytest.raises(MoorizeError, match="pass task_ids"):
        _out(model, ids)
    with pytest.raises(MoorizeError, match="out of range"):
        _out(model, ids, task_ids=torch.tensor([0, 3]))
    with pytest.raises(MoorizeError, match="unknown task 'delta'"):
        _out(model, ids, task_ids=["alpha", "delta"])
    with pytest.raises(MoorizeError, match="2 entries"):
        _out(model, _inputs(model, batch=3), task_ids=torch.tensor([0, 1]))
    model.set_default_task("gamma")
    named = _out(model, ids, task_ids=["gamma", "gamma"])
    assert torch.equal(_out(model, ids), named)
    with pytest.raises(MoorizeError, match="unknown router mode"):
        moorize.load(factored, router="tasks")


def test_generate_with_task_ids_equals_original_at_init(tmp_path):
    original, factored = _convert("llama", tmp_path)
    model = moorize.load(factored, tasks=TASKS)
    ids = _inputs(model, batch=2, seq=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = original.generate(ids, **kw)
    out = model.generate(ids, task_ids=torch.tensor([0, 2]), **kw)
    assert torch.equal(ref, out)
    beams = model.generate(ids, task_ids=["beta", "alpha"], num_beams=2, num_return_sequences=2, **kw)
    assert beams.shape[0] == 4
    assert model.moore_state.task_ids is None  # routing state is cleared after the call
