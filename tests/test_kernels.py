"""The fused MoORE layer (moorize/model/kernels.py): its hand-written backward against autograd of the published
per-token formulation, in float64, for every router and option; the closed-form Householder chain; the
per-step tensors' lifetime; no host syncs in a layer's forward."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

from moorize.model.config import MoOREConfig
from moorize.model.kernels import householder_wy
from moorize.model.layer import MoORELinear, RoutingState

pytestmark = pytest.mark.versions  # also run at the minimum versions and on the newest torch (.ci/run)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from dispatch import count  # noqa: E402


def make_layer(router="task+sample", norm="rms", k=4, residual=False, bias=False, tasks=2, train_sigma=False,
               dtype=torch.float64, seed=0, m=12, n=10, r=7):
    """A layer with every trainable part moved off its initialisation (so no term vanishes)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=dtype))[0].contiguous()
    Vh = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=dtype))[0].t().contiguous()
    cfg = MoOREConfig(router=router, tasks=[f"t{i}" for i in range(tasks)], task_dim=4, router_experts=5,
                      router_norm=norm, householder=k, train_sigma=train_sigma)
    R = torch.randn(m, n, generator=g, dtype=dtype) * 0.1 if residual else None
    b = torch.randn(m, generator=g, dtype=dtype) if bias else None
    layer = MoORELinear(U, torch.rand(r, generator=g, dtype=dtype) + 0.5, Vh, R, b, cfg, RoutingState(cfg.tasks),
                        generator=g)
    with torch.no_grad():
        for p in layer._trainables():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return layer


CASES = [c for c in itertools.product(["task", "sample", "task+sample"], ["rms", "none"], [0, 4], [False, True],
                                      [False, True], [1, 3], [False, True])
         if not (c[0] == "task" and c[1] == "none")]


@pytest.mark.parametrize("router,norm,k,residual,bias,tasks,train_sigma", CASES)
def test_backward_matches_autograd_of_the_published_formulation(router, norm, k, residual, bias, tasks, train_sigma):
    layer = make_layer(router, norm, k, residual, bias, tasks, train_sigma).train()
    ids = torch.tensor([0, tasks - 1, 0])
    layer.state.task_ids = ids
    x = torch.randn(3, 5, 10, dtype=torch.float64, requires_grad=True, generator=torch.Generator().manual_seed(1))
    y, ref = layer(x), layer.forward_reference(x, ids)
    assert torch.allclose(y, ref, atol=1e-12, rtol=0)
    wrt = [x] + [p for p in layer._trainables() if p.requires_grad]
    w = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for got, want in zip(torch.autograd.grad((y * w).sum(), wrt), torch.autograd.grad((ref * w).sum(), wrt)):
        assert torch.allclose(got, want, atol=1e-11, rtol=0)
    layer.eval()
    with torch.no_grad():  # the inference path: folded weights, the same function
        assert torch.allclose(layer(x), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("router", ["task", "sample", "task+sample"])
def test_gradcheck(router):
    """Finite differences in float64 against the hand-written backward, for x and every trainable parameter."""
    layer = make_layer(router, residual=True, bias=True, tasks=2, train_sigma=True, m=6, n=5, r=4).train()
    layer.state.task_ids = torch.tensor([1, 0])
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)

    def f(x, *values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x,))

    values = tuple(layer.get_parameter(n).detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(f, (x, *values), eps=1e-6, atol=1e-7)


def test_closed_form_chain_is_the_product_of_reflections():
    torch.manual_seed(0)
    v = torch.randn(6, 9, dtype=torch.float64)
    Y, T = householder_wy(v)
    product = torch.eye(9, dtype=torch.float64)
    for u in v:
        product = product @ (torch.eye(9, dtype=torch.float64) - 2 * torch.outer(u, u) / (u @ u))
    assert torch.allclose(torch.eye(9, dtype=torch.float64) - Y @ T @ Y.t(), product, atol=1e-12)
    assert torch.equal(T, T.triu())
    pairs = v[::2].repeat_interleave(2, 0)  # identical pairs: H = I, as a fresh layer starts
    Y, T = householder_wy(pairs)
    assert torch.allclose(Y @ T @ Y.t(), torch.zeros(9, 9, dtype=torch.float64), atol=1e-12)


def test_per_step_tensors_expire_at_backward_even_when_versions_are_not_bumped():
    """foreach in-place updates under a TorchDispatchMode leave ``_version`` as it was (torch 2.13): a cache
    keyed on versions alone would then train with last step's rotation. The layer's backward expires it."""
    layer = make_layer("task+sample", dtype=torch.float32).train()
    layer.state.task_ids = torch.tensor([0, 1])
    params = [p for p in layer._trainables() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.1, foreach=True)
    x = torch.randn(2, 4, 10)

    def step():
        layer(x).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    count(step)  # the update happens under a dispatch mode
    layer.train()
    with torch.no_grad():
        fresh = layer.forward_reference(x, torch.tensor([0, 1]))
    with torch.enable_grad():
        assert torch.allclose(layer(x), fresh, atol=1e-5)


def test_the_checkpoint_recompute_reuses_the_step_tensors(tiny_model_dir):
    import moorize

    _, src = tiny_model_dir("llama")
    factored = src.parent / "factored"
    moorize.convert(src, factored)
    model = moorize.load(factored, tasks=["a", "b"]).train()
    params = moorize.prepare_for_training(model)
    model.gradient_checkpointing_enable()
    from moorize.model.layer import moore_layers

    layers = list(moore_layers(model).values())
    made = []
    for layer in layers:
        real = layer._step_weights

        def spy(dtype, layer=layer, real=real):
            before = layer._prepared
            out = real(dtype)
            made.append(before is None or before[1] is not out)
            return out

        layer._step_weights = spy
    ids = torch.randint(3, 90, (2, 12))
    model(input_ids=ids, labels=ids, task_ids=["a", "b"]).loss.backward()
    assert made == [True] * len(layers) + [False] * len(layers)  # made by the forward, taken by the recompute
    assert all(layer._prepared is None for layer in layers)  # and dropped by the backward
    assert all(p.grad is not None for p in params)


@pytest.mark.parametrize("router", ["task", "sample", "task+sample"])
def test_no_host_sync_in_a_layer_forward(router):
    layer = make_layer(router, dtype=torch.float32, residual=True, bias=True)
    layer.state.task_ids = torch.tensor([0, 1])
    x = torch.randn(2, 4, 10)
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        layer(x)  # caches filled
        with torch.set_grad_enabled(mode == "train"):
            c = count(lambda: layer(x))
        assert c.syncs == 0, c.sync_names


def test_bf16_autocast_follows_the_reference():
    layer = make_layer("task+sample", dtype=torch.float32, residual=True, bias=True, m=64, n=48, r=32).train()
    ids = torch.tensor([0, 1])
    layer.state.task_ids = ids
    x = torch.randn(2, 8, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16  # as an autocast linear layer gives
    ref = layer.forward_reference(x, ids)
    assert (y.float() - ref).norm() / ref.norm() < 2e-2
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in layer._trainables() if p.requires_grad)
