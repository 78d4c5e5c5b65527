"""``moorize.convert`` and ``FactoredCheckpoint`` on tiny random models of every supported architecture.

Everything here runs on models of a few hundred KB, so the whole module takes
seconds. The checks are against independent references: the original model's
weights and outputs, ``torch.linalg.svdvals`` of the original weights, and the raw
bytes of the source files.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import ARCHS, build_tiny, tree_digest

import moorize
from moorize import FactoredCheckpoint, MoorizeError
from moorize.conversion.svd import RankPolicy, RankRules
from moorize.conversion.targets import pattern_matches
from moorize.io.factored import FORMAT_NAME, FORMAT_VERSION, MANIFEST, factor_key
from moorize.io.safetensors import SafetensorsFile

pytestmark = pytest.mark.versions  # also run at the minimum versions and on the newest torch (.ci/run)

EXACT = 1e-5  # relative Frobenius error of a full-rank (or residual-kept) reconstruction
ORTHO = 1e-4
LOGIT_TOL = 1e-4
LAYERS = (0, 1)  # tiny models have two blocks

# the layers every architecture must factor by default, per block
EXPECTED_KINDS = {
    "llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "phi3": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    "bert": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"),
}
EXPECTED_KINDS["mistral"] = EXPECTED_KINDS["qwen2"] = EXPECTED_KINDS["llama"]
BLOCK_PREFIX = {"gpt2": "transformer.h.{}.", "bert": "encoder.layer.{}."}
NEVER_TARGET = re.compile(r"embed|wte|wpe|lm_head|norm|ln_|LayerNorm|pooler", re.IGNORECASE)


def expected_targets(arch: str) -> set[str]:
    prefix = BLOCK_PREFIX.get(arch, "model.layers.{}.")
    return {prefix.format(i) + kind for i in LAYERS for kind in EXPECTED_KINDS[arch]}


# ---- helpers -------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """The matrices are tiny: intra-op threads only cost time (a lot of it on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def raw_tensors(directory: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (safetensors dtype, shape, raw bytes) over every safetensors file of a directory."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        f = SafetensorsFile(path)
        try:
            for info in f.infos():
                assert info.name not in out, f"{info.name} stored twice"
                out[info.name] = (info.dtype, info.shape, bytes(f.load_bytes(info.name)))
        finally:
            f.close()
    return out


def all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory read with the reference safetensors reader."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        for k, v in safetensors.torch.load_file(path).items():
            assert k not in out
            out[k] = v
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    return (torch.linalg.matrix_norm(a64 - b64) / torch.linalg.matrix_norm(b64)).item()


def ortho_err(Q: torch.Tensor) -> float:
    """max |QᵀQ − I| for a matrix with (supposedly) orthonormal columns."""
    Q = Q.double()
    return (Q.t() @ Q - torch.eye(Q.shape[1], dtype=torch.float64)).abs().max().item()


def out_in(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """The [out, in] matrix a stored weight applies (GPT-2 Conv1D stores [in, out])."""
    return weight.t() if layout == "conv1d" else weight


def model_output(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def output_diff(original, ckpt: FactoredCheckpoint) -> float:
    """max |original − rebuilt| of the logits (last_hidden_state for BERT) on random input ids."""
    dense = ckpt.dense_model()
    assert type(dense) is type(original)
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, original.config.vocab_size, (2, 12), generator=gen)
    ref, got = model_output(original, ids), model_output(dense, ids)
    assert ref.shape == got.shape
    return (ref - got).abs().max().item()


def assert_same_outputs(original, ckpt: FactoredCheckpoint, tol: float = LOGIT_TOL) -> None:
    diff = output_diff(original, ckpt)
    assert diff < tol, f"outputs differ by {diff:.3e}"


def svdvals(W: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(W.double())


def truncation_error(W: torch.Tensor, r: int) -> float:
    """Eckart-Young: the best rank-r relative Frobenius error."""
    s = svdvals(W)
    return math.sqrt((s[r:] ** 2).sum().item() / (s**2).sum().item())


def save(model, directory: Path, **kwargs) -> Path:
    model.save_pretrained(directory, **kwargs)
    return directory


# ---- 1. full-rank conversion of every architecture ----------------------------------------------

@pytest.fixture(scope="module")
def full_conversions(tmp_path_factory):
    """arch -> (original model, source dir, out dir, report, source digest before); converted once."""
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            base = tmp_path_factory.mktemp(f"full-{arch}")
            model = build_tiny(arch)
            src = save(model, base / "src")
            before = tree_digest(src)
            report = moorize.convert(src, base / "out")
            cache[arch] = (model, src, base / "out", report, before)
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_is_exact(arch, full_conversions):
    model, src, out, report, _ = full_conversions(arch)
    sd = model.state_dict()
    ckpt = FactoredCheckpoint(out)
    assert set(ckpt.layers) == expected_targets(arch)
    assert [r.name for r in report.layers] == list(ckpt.layers)
    for name, rec in ckpt.layers.items():
        W = sd[f"{name}.weight"]
        assert rec.layout == ("conv1d" if arch == "gpt2" else "linear")
        assert rec.shape == tuple(out_in(W, rec.layout).shape)
        assert rec.rank == rec.full_rank == min(rec.shape)
        assert not rec.residual and rec.source_dtype == "float32" and rec.dtype == "float32"
        assert rec.rel_error < EXACT and rec.factor_rel_error < EXACT
        assert rec.energy_kept == pytest.approx(1.0, abs=1e-9)
        U, S, Vh, R = ckpt.factors(name)
        m, n = rec.shape
        assert R is None and factor_key(name, "residual") not in ckpt.tensor_names()
        assert U.shape == (m, rec.rank) and S.shape == (rec.rank,) and Vh.shape == (rec.rank, n)
        assert ortho_err(U) < ORTHO, f"{name}: U not orthonormal"
        assert ortho_err(Vh.t()) < ORTHO, f"{name}: Vh not orthonormal"
        assert (S[:-1] >= S[1:]).all() and (S >= 0).all(), f"{name}: singular values not sorted"
        torch.testing.assert_close(S.double(), svdvals(W), rtol=1e-4, atol=1e-6)
        rebuilt = ckpt.reconstruct_weight(name)
        assert rebuilt.shape == W.shape and rebuilt.dtype == W.dtype
        err = rel_err(rebuilt, W)
        assert err < EXACT, f"{name}: reconstruction error {err:.2e}"
        assert abs(err - rec.rel_error) < 1e-6
    assert report.worst_rel_error < EXACT
    assert_same_outputs(model, ckpt)


@pytest.mark.parametrize("arch", ARCHS)
def test_non_targets_copied_byte_identical(arch, full_conversions):
    model, src, out, report, before = full_conversions(arch)
    source, result = raw_tensors(src), raw_tensors(out)
    targets = {r.name for r in report.layers}
    target_weights = {f"{t}.weight" for t in targets}
    assert target_weights <= set(source)
    copied = set(source) - target_weights
    factors = {factor_key(t, p) for t in targets for p in ("U", "S", "Vh")}
    assert set(result) == copied | factors
    for name in copied:
        assert result[name] == source[name], f"{name} was not copied byte for byte"
    assert (src / "generation_config.json").exists() or arch == "bert"
    for aux in ("config.json", "generation_config.json"):
        if (src / aux).exists():
            assert (out / aux).read_bytes() == (src / aux).read_bytes()
    assert (out / "config.json").exists()
    assert tree_digest(src) == before, "the source directory was modified"
    assert not list(out.parent.glob(".*moorize-partial")), "temporary directory left behind"


@pytest.mark.parametrize("arch", ARCHS)
def test_embeddings_heads_norms_are_never_targets(arch, full_conversions):
    model, src, out, report, _ = full_conversions(arch)
    for rec in report.layers:
        assert not NEVER_TARGET.search(rec.name), f"{rec.name} must not be factored"
    kept = raw_tensors(out)
    untouched = [k for k in raw_tensors(src) if NEVER_TARGET.search(k)]
    assert untouched, "the tiny model has embeddings and norms"
    for k in untouched:
        assert k in kept
    if arch == "bert":
        assert "pooler.dense.weight" in kept and "pooler.dense.bias" in kept
    if arch in ("llama", "mistral", "qwen2", "phi3"):
        assert "lm_head.weight" in kept and "model.embed_tokens.weight" in kept


def test_phi3_fused_projections_are_single_matrices(full_conversions):
    model, _, out, _, _ = full_conversions("phi3")
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    layers = FactoredCheckpoint(out).layers
    for i in LAYERS:
        qkv = layers[f"model.layers.{i}.self_attn.qkv_proj"]
        assert qkv.shape == (cfg.hidden_size + 2 * cfg.num_key_value_heads * head_dim, cfg.hidden_size)
        gate_up = layers[f"model.layers.{i}.mlp.gate_up_proj"]
        assert gate_up.shape == (2 * cfg.intermediate_size, cfg.hidden_size)
    assert not any(re.search(r"\.(q|k|v|gate|up)_proj$", n) for n in layers)


def test_gpt2_conv1d_factors_describe_out_in(full_conversions):
    model, _, out, _, _ = full_conversions("gpt2")
    sd = model.state_dict()
    ckpt = FactoredCheckpoint(out)
    for name, rec in ckpt.layers.items():
        assert rec.layout == "conv1d" and rec.bias
        W = sd[f"{name}.weight"]  # Conv1D stores [in, out]
        inp, outp = W.shape
        assert rec.shape == (outp, inp)
        U, S, Vh, _ = ckpt.factors(name)
        assert U.shape[0] == outp and Vh.shape[1] == inp
        assert rel_err(ckpt.reconstruct(name), W.t()) < EXACT  # the [out, in] map
        assert ckpt.reconstruct_weight(name).shape == W.shape  # transposed back to storage
    # c_fc is 48 -> 192: tall in [out, in], so its stored [in, out] is wide
    assert ckpt.layers["transformer.h.0.mlp.c_fc"].shape == (4 * model.config.n_embd, model.config.n_embd)


def test_qwen2_biases_copied(full_conversions):
    model, src, out, report, _ = full_conversions("qwen2")
    source, result = raw_tensors(src), raw_tensors(out)
    by_name = {r.name: r for r in report.layers}
    for i in LAYERS:
        for proj in ("q_proj", "k_proj", "v_proj"):
            name = f"model.layers.{i}.self_attn.{proj}"
            assert by_name[name].bias
            assert result[f"{name}.bias"] == source[f"{name}.bias"]
            assert f"{name}.weight" not in result
        assert not by_name[f"model.layers.{i}.self_attn.o_proj"].bias
    torch.testing.assert_close(FactoredCheckpoint(out).tensor("model.layers.0.self_attn.q_proj.bias"),
                               model.model.layers[0].self_attn.q_proj.bias.detach(), rtol=0, atol=0)


# ---- 3. truncation, solvers and storage dtypes -------------------------------------------------

@pytest.fixture(scope="module")
def llama_src(tmp_path_factory):
    model = build_tiny("llama")
    return model, save(model, tmp_path_factory.mktemp("llama") / "src")


def llama_weights(model) -> dict[str, torch.Tensor]:
    return {k[: -len(".weight")]: v for k, v in model.state_dict().items()
            if k.endswith(".weight") and ".layers." in k and "norm" not in k}


def test_energy_rank_with_residual_is_exact(llama_src, tmp_path):
    model, src = llama_src
    report = moorize.convert(src, tmp_path / "out", rank="energy:0.9", residual="keep")
    ckpt = FactoredCheckpoint(tmp_path / "out")
    weights = llama_weights(model)
    assert set(ckpt.layers) == set(weights)
    for name, rec in ckpt.layers.items():
        W = weights[name]
        s = svdvals(W)
        cum = torch.cumsum(s**2, 0) / (s**2).sum()
        r = rec.rank
        assert rec.energy_kept >= 0.9
        assert rec.energy_kept == pytest.approx(cum[r - 1].item(), abs=1e-6)
        assert r == 1 or cum[r - 2].item() < 0.9, f"{name}: rank {r} is not the smallest reaching 0.9"
        assert r < min(W.shape), "a random matrix needs fewer than all directions for 90% energy"
        assert rec.residual
        U, S, Vh, R = ckpt.factors(name)
        assert U.shape == (W.shape[0], r) and Vh.shape == (r, W.shape[1]) and R.shape == W.shape
        assert rec.factor_rel_error == pytest.approx(math.sqrt(1 - cum[r - 1].item()), abs=1e-4)
        assert rec.rel_error < EXACT
        assert rel_err(ckpt.reconstruct_weight(name), W) < EXACT
    assert report.policy["rank"]["default"] == "energy:0.9"
    assert_same_outputs(model, ckpt)


def test_fixed_rank_residual_drop_reports_truncation_error(llama_src, tmp_path):
    model, src = llama_src
    moorize.convert(src, tmp_path / "out", rank="8", residual="drop")
    ckpt = FactoredCheckpoint(tmp_path / "out")
    assert not any(n.endswith(".moore.residual") for n in ckpt.tensor_names())
    for name, W in llama_weights(model).items():
        rec = ckpt.layers[name]
        assert rec.rank == 8 and not rec.residual
        U, S, Vh, R = ckpt.factors(name)
        assert R is None and U.shape == (W.shape[0], 8) and S.shape == (8,) and Vh.shape == (8, W.shape[1])
        expected = truncation_error(W, 8)
        assert expected > 0.1  # a random matrix: the truncation is far from exact
        assert rec.rel_error == pytest.approx(expected, abs=1e-4)
        assert rel_err(ckpt.reconstruct_weight(name), W) == pytest.approx(rec.rel_error, abs=1e-5)
        assert ortho_err(U) < ORTHO and ortho_err(Vh.t()) < ORTHO
    assert output_diff(model, ckpt) > 1e-3  # dropping the residual really changes the model


def test_ratio_rank(llama_src, tmp_path):
    model, src = llama_src
    seen = []
    report = moorize.convert(src, tmp_path / "out", rank="ratio:0.25", progress=seen.append)
    ckpt = FactoredCheckpoint(tmp_path / "out")
    for name, W in llama_weights(model).items():
        rec = ckpt.layers[name]
        assert rec.rank == math.ceil(0.25 * min(W.shape))  # 48 -> 12, 24 -> 6
        assert rec.residual and rel_err(ckpt.reconstruct_weight(name), W) < EXACT
    assert seen and seen[-1].layers_done == seen[-1].layers_total == len(report.layers)
    assert seen[-1].bytes_done == seen[-1].bytes_total == report.bytes_in
    assert_same_outputs(model, ckpt)


def test_per_pattern_overrides(llama_src, tmp_path):
    model, src = llama_src
    moorize.convert(src, tmp_path / "out", rank=["full", "mlp.*=4"])
    ckpt = FactoredCheckpoint(tmp_path / "out")
    for name, rec in ckpt.layers.items():
        if ".mlp." in name:
            assert rec.rank == 4 and rec.residual
        else:
            assert rec.rank == min(rec.shape) and not rec.residual
    assert sum(".mlp." in n for n in ckpt.layers) == 6
    assert_same_outputs(model, ckpt)

    # the last matching override wins
    moorize.convert(src, tmp_path / "out2", rank=["8", "mlp.*=4", "down_proj=full"], residual="drop")
    for name, rec in FactoredCheckpoint(tmp_path / "out2").layers.items():
        want = min(rec.shape) if name.endswith("down_proj") else 4 if ".mlp." in name else 8
        assert rec.rank == want, name


@pytest.fixture(scope="module")
def decaying_src(tmp_path_factory):
    """A tiny llama whose block weights have a known geometrically decaying spectrum."""
    model = build_tiny("llama", seed=3)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                m, n = module.weight.shape
                k = min(m, n)
                Q1, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
                Q2, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
                sigma = 0.8 ** torch.arange(k, dtype=torch.float64)
                module.weight.copy_((Q1 * sigma) @ Q2.t())
    return model, save(model, tmp_path_factory.mktemp("decaying") / "src")


def test_randomized_solver_near_optimal(decaying_src, tmp_path):
    model, src = decaying_src
    report = moorize.convert(src, tmp_path / "out", solver="randomized", rank="8", residual="drop")
    assert report.solver == "randomized"
    ckpt = FactoredCheckpoint(tmp_path / "out")
    for name, W in llama_weights(model).items():
        rec = ckpt.layers[name]
        assert rec.rank == 8 and rec.solver == "randomized" and not rec.residual
        U, S, Vh, _ = ckpt.factors(name)
        assert U.shape == (W.shape[0], 8) and Vh.shape == (8, W.shape[1])
        assert ortho_err(U) < ORTHO and ortho_err(Vh.t()) < ORTHO
        best = truncation_error(W, 8)
        got = rel_err(ckpt.reconstruct_weight(name), W)
        assert got == pytest.approx(rec.rel_error, abs=1e-5)
        assert best * (1 - 1e-3) <= got <= 1.1 * best, f"{name}: {got:.4f} vs optimal {best:.4f}"


def test_randomized_solver_rejects_energy_rank(llama_src, tmp_path):
    _, src = llama_src
    with pytest.raises(MoorizeError, match="randomized"):
        moorize.convert(src, tmp_path / "out", solver="randomized", rank="energy:0.9")
    assert not (tmp_path / "out").exists()


def test_rank_larger_than_matrix_is_an_error(llama_src, tmp_path):
    _, src = llama_src
    with pytest.raises(MoorizeError, match="exceeds"):
        moorize.convert(src, tmp_path / "out", rank="25")  # k_proj is 24 x 48
    assert not (tmp_path / "out").exists()


def test_lapack_solver_float64_is_exact(llama_src, tmp_path):
    model, src = llama_src
    report = moorize.convert(src, tmp_path / "out", solver="svd", svd_dtype="float64")
    assert report.policy["svd_dtype"] == "float64"
    ckpt = FactoredCheckpoint(tmp_path / "out")
    for name, W in llama_weights(model).items():
        rec = ckpt.layers[name]
        assert rec.solver == "svd" and rec.rank == min(W.shape) and rec.dtype == "float32"
        assert rel_err(ckpt.reconstruct_weight(name), W) < EXACT and rec.rel_error < EXACT
        U, _, Vh, _ = ckpt.factors(name)
        assert ortho_err(U) < ORTHO and ortho_err(Vh.t()) < ORTHO
    assert_same_outputs(model, ckpt)


def test_rank_deficient_weight_stays_exact_with_orthonormal_experts(tmp_path):
    """The Gram solver squares the condition number; its tail re-solve must keep a singular weight
    exact and every expert (all 48 columns of U, including the 45 null directions) orthonormal."""
    model = build_tiny("llama")
    gen = torch.Generator().manual_seed(5)
    target = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        target.weight.copy_(torch.randn(48, 3, generator=gen) @ torch.randn(3, 48, generator=gen))
    src = save(model, tmp_path / "src")
    moorize.convert(src, tmp_path / "out")
    ckpt = FactoredCheckpoint(tmp_path / "out")
    rec = ckpt.layers["model.layers.0.self_attn.q_proj"]
    assert rec.solver == "gram" and rec.rank == 48
    U, S, Vh, _ = ckpt.factors(rec.name)
    assert rel_err(ckpt.reconstruct_weight(rec.name), target.weight.detach()) < EXACT
    assert ortho_err(U) < ORTHO and ortho_err(Vh.t()) < ORTHO
    assert float(S[3]) < 1e-5 * float(S[0])  # the rank really is 3
    assert_same_outputs(model, ckpt)


def test_ill_conditioned_weight_is_accurate_to_the_tail(tmp_path):
    """σ spanning 1e0..1e-7: singular values match LAPACK's float64 ones, experts stay orthonormal."""
    model = build_tiny("llama")
    gen = torch.Generator().manual_seed(6)
    Q1, _ = torch.linalg.qr(torch.randn(48, 48, generator=gen, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(48, 48, generator=gen, dtype=torch.float64))
    sigma = torch.logspace(0, -7, 48, dtype=torch.float64)
    target = model.model.layers[1].self_attn.o_proj
    with torch.no_grad():
        target.weight.copy_(((Q1 * sigma) @ Q2.t()).float())
    src = save(model, tmp_path / "src")
    moorize.convert(src, tmp_path / "out", dtype="float64")
    ckpt = FactoredCheckpoint(tmp_path / "out")
    U, S, Vh, _ = ckpt.factors("model.layers.1.self_attn.o_proj")
    exact = torch.linalg.svdvals(target.weight.detach().double())
    assert (S - exact).abs().max() < 1e-12
    assert ortho_err(U) < 1e-8 and ortho_err(Vh.t()) < 1e-8


@pytest.mark.parametrize("dtype, tol", [("float16", 5e-3), ("bfloat16", 2e-2), ("float64", 1e-6)])
def test_storage_dtype(llama_src, tmp_path, dtype, tol):
    model, src = llama_src
    moorize.convert(src, tmp_path / "out", dtype=dtype)
    ckpt = FactoredCheckpoint(tmp_path / "out")
    stored = raw_tensors(tmp_path / "out")
    for name, W in llama_weights(model).items():
        rec = ckpt.layers[name]
        assert rec.dtype == dtype and rec.source_dtype == "float32"
        for part in ("U", "S", "Vh"):
            assert ckpt.tensor(factor_key(name, part)).dtype == getattr(torch, dtype)
        rebuilt = ckpt.reconstruct_weight(name)
        assert rebuilt.dtype == torch.float32
        err = rel_err(rebuilt, W)
        assert err < tol and rec.rel_error < tol
        assert err == pytest.approx(rec.rel_error, rel=0.05, abs=1e-6)
    # non-target tensors keep their source dtype and bytes
    source = raw_tensors(src)
    assert stored["model.embed_tokens.weight"] == source["model.embed_tokens.weight"]
    assert stored["model.norm.weight"][0] == "F32"


def test_half_precision_source_keeps_its_dtype(tmp_path):
    model = build_tiny("llama").to(torch.float16)
    src = save(model, tmp_path / "src")
    moorize.convert(src, tmp_path / "out")
    ckpt = FactoredCheckpoint(tmp_path / "out")
    for name, W in llama_weights(model).items():
        rec = ckpt.layers[name]
        assert rec.dtype == rec.source_dtype == "float16"
        assert ckpt.tensor(factor_key(name, "U")).dtype == torch.float16
        rebuilt = ckpt.reconstruct_weight(name)
        assert rebuilt.dtype == torch.float16 and rel_err(rebuilt, W) < 5e-3
    source, result = raw_tensors(src), raw_tensors(tmp_path / "out")
    assert result["model.embed_tokens.weight"] == source["model.embed_tokens.weight"]
    assert result["model.embed_tokens.weight"][0] == "F16"


def test_float16_truncated_with_residual(llama_src, tmp_path):
    model, src = llama_src
    moorize.convert(src, tmp_path / "out", dtype="float16", rank="8")
    ckpt = FactoredCheckpoint(tmp_path / "out")
    for name, W in llama_weights(model).items():
        _, _, _, R = ckpt.factors(name)
        assert R is not None and R.dtype == torch.float16
        assert rel_err(ckpt.reconstruct_weight(name), W) < 5e-3


# ---- 4. target selection, input and output layouts ----------------------------------------------

def test_target_patterns_select_exactly(llama_src, tmp_path):
    model, src = llama_src
    moorize.convert(src, tmp_path / "out", targets=["q_proj", "re:.*down_proj$"])
    ckpt = FactoredCheckpoint(tmp_path / "out")
    assert set(ckpt.layers) == {f"model.layers.{i}.{k}" for i in LAYERS
                                for k in ("self_attn.q_proj", "mlp.down_proj")}
    source, result = raw_tensors(src), raw_tensors(tmp_path / "out")
    for i in LAYERS:
        for k in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"):
            key = f"model.layers.{i}.{k}.weight"
            assert result[key] == source[key]
        assert f"model.layers.{i}.self_attn.q_proj.weight" not in result
    assert_same_outputs(model, ckpt)


def test_target_pattern_matching_nothing_is_an_error(llama_src, tmp_path):
    _, src = llama_src
    with pytest.raises(MoorizeError, match="matches no linear layer"):
        moorize.convert(src, tmp_path / "out", targets=["q_proj", "no_such_layer"])
    with pytest.raises(MoorizeError):
        moorize.convert(src, tmp_path / "out", targets=["re:("])
    assert not (tmp_path / "out").exists()


def test_sharded_source_converts_like_single_file(llama_src, tmp_path):
    model, single_src = llama_src
    sharded_src = save(model, tmp_path / "sharded", max_shard_size="20KB")
    assert (sharded_src / "model.safetensors.index.json").exists()
    assert len(list(sharded_src.glob("model-*.safetensors"))) > 2
    before = tree_digest(sharded_src)
    r_single = moorize.convert(single_src, tmp_path / "a")
    r_sharded = moorize.convert(sharded_src, tmp_path / "b")
    assert r_sharded.source_kind == "sharded-safetensors" and r_single.source_kind == "safetensors"
    assert tree_digest(sharded_src) == before
    a, b = all_tensors(tmp_path / "a"), all_tensors(tmp_path / "b")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert [(x.name, x.shape, x.rank) for x in r_sharded.layers] == [(x.name, x.shape, x.rank) for x in r_single.layers]
    for x, y in zip(r_sharded.layers, r_single.layers):
        assert x.rel_error == pytest.approx(y.rel_error, abs=1e-7)
    assert raw_tensors(tmp_path / "b")["lm_head.weight"] == raw_tensors(single_src)["lm_head.weight"]
    assert_same_outputs(model, FactoredCheckpoint(tmp_path / "b"))


def test_pickle_source_needs_allow_pickle(llama_src, tmp_path):
    model, single_src = llama_src
    src = tmp_path / "pickled"
    model.save_pretrained(src, safe_serialization=False)
    # recent transformers always write safetensors: make sure the source really is pickle-only
    for f in src.glob("*.safetensors*"):
        f.unlink()
    if not (src / "pytorch_model.bin").exists():
        torch.save(model.state_dict(), src / "pytorch_model.bin")
    with pytest.raises(MoorizeError, match="allow.pickle"):
        moorize.convert(src, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    report = moorize.convert(src, tmp_path / "out", allow_pickle=True)
    assert report.source_kind == "pickle"
    ref = moorize.convert(single_src, tmp_path / "ref")
    a, b = all_tensors(tmp_path / "ref"), all_tensors(tmp_path / "out")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert [r.name for r in report.layers] == [r.name for r in ref.layers]
    assert_same_outputs(model, FactoredCheckpoint(tmp_path / "out"))


def test_sharded_output(llama_src, tmp_path):
    model, src = llama_src
    moorize.convert(src, tmp_path / "out", max_shard_size="30KB")
    out = tmp_path / "out"
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 1 and not (out / "model.safetensors").exists()
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert set(weight_map.values()) == set(shards)
    loaded = {}
    for shard in shards:
        tensors = safetensors.torch.load_file(out / shard)
        assert tensors, f"{shard} is empty"
        for k, v in tensors.items():
            assert weight_map[k] == shard
            loaded[k] = v
    assert set(weight_map) == set(loaded)
    assert index["metadata"]["total_size"] > 0
    moorize.convert(src, tmp_path / "single")
    single = all_tensors(tmp_path / "single")
    assert set(single) == set(loaded)
    for k in single:
        torch.testing.assert_close(loaded[k], single[k], rtol=0, atol=0, msg=k)
    assert_same_outputs(model, FactoredCheckpoint(out))


def test_existing_output_needs_overwrite(llama_src, tmp_path):
    _, src = llama_src
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(MoorizeError, match="not empty"):
        moorize.convert(src, out)
    assert (out / "keep.txt").read_text() == "x"
    moorize.convert(src, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / MANIFEST).exists()
    with pytest.raises(MoorizeError, match="inside"):
        moorize.convert(src, src / "factored")
    assert not (src / "factored").exists()


# ---- 5. moorize.json and the report -------------------------------------------------------------

def test_manifest_and_report(llama_src, tmp_path):
    model, src = llama_src
    report = moorize.convert(src, tmp_path / "out", rank=["full", "mlp.*=energy:0.95"])
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["format"] == FORMAT_NAME == "moorize.factored"
    assert manifest["format_version"] == FORMAT_VERSION == 1
    assert manifest["moorize_version"] == moorize.__version__
    source = manifest["source"]
    assert source["kind"] == "safetensors" and source["model_type"] == "llama"
    assert source["architectures"] == ["LlamaForCausalLM"]
    assert source["fingerprint"].startswith("sha256:") and source["fingerprint"] == report.fingerprint
    assert manifest["policy"]["rank"] == {"default": "full", "overrides": [["mlp.*", "energy:0.95"]]}
    assert manifest["summary"]["layers"] == len(report.layers) == 14
    assert set(manifest["layers"]) == set(llama_weights(model))
    for name, entry in manifest["layers"].items():
        for key in ("shape", "rank", "energy_kept", "rel_error", "dtype", "layout"):
            assert key in entry, f"{name}: {key} missing"
        assert entry["shape"] == list(llama_weights(model)[name].shape)
        assert entry["layout"] == "linear" and entry["dtype"] == "float32"
        assert 0 < entry["energy_kept"] <= 1 and entry["rel_error"] < EXACT
        assert 1 <= entry["rank"] <= min(entry["shape"])
    d = report.to_dict()
    again = json.loads(json.dumps(d))
    assert again["num_layers"] == 14 and set(again["layers"]) == set(manifest["layers"])
    assert again["layers"] == manifest["layers"]
    assert again["fingerprint"] == report.fingerprint and again["worst_rel_error"] == report.worst_rel_error
    assert FactoredCheckpoint(tmp_path / "out").fingerprint == report.fingerprint


def test_fingerprint_identifies_the_source(llama_src, tmp_path):
    _, src = llama_src
    first = moorize.convert(src, tmp_path / "a").fingerprint
    second = moorize.convert(src, tmp_path / "b", rank="8").fingerprint
    assert first == second
    other = save(build_tiny("qwen2"), tmp_path / "other")
    assert moorize.convert(other, tmp_path / "c").fingerprint != first
    # same architecture, one config value changed
    cfg = json.loads((src / "config.json").read_text())
    model = build_tiny("llama")
    model.config.rms_norm_eps = cfg["rms_norm_eps"] * 10
    changed = save(model, tmp_path / "changed")
    assert moorize.convert(changed, tmp_path / "d").fingerprint != first
    # same config and shapes, different weights (two fine-tunes of one base)
    finetuned = save(build_tiny("llama", seed=1), tmp_path / "finetuned")
    assert moorize.convert(finetuned, tmp_path / "e").fingerprint != first


# ---- 6. rank specs and patterns -----------------------------------------------------------------

@pytest.mark.parametrize("text, kind, value", [
    ("full", "full", 0.0), (" FULL ", "full", 0.0), ("8", "fixed", 8), ("1", "fixed", 1),
    ("energy:0.9", "energy", 0.9), ("energy:1", "energy", 1.0), ("ratio:0.25", "ratio", 0.25),
    ("RATIO:1.0", "ratio", 1.0),
])
def test_rank_policy_parse_valid(text, kind, value):
    p = RankPolicy.parse(text)
    assert (p.kind, p.value) == (kind, value)
    assert RankPolicy.parse(str(p)) == p


@pytest.mark.parametrize("text", ["", "0", "-3", "8.5", "abc", "energy:", "energy:0", "energy:1.5", "energy:x",
                                  "ratio:-0.1", "ratio:nan", "ratio:2", "top:3"])
def test_rank_policy_parse_invalid(text):
    with pytest.raises(MoorizeError):
        RankPolicy.parse(text)


def test_rank_policy_ranks():
    assert RankPolicy.parse("full").fixed_rank((24, 48)) == 24
    assert RankPolicy.parse("8").fixed_rank((24, 48)) == 8
    assert RankPolicy.parse("ratio:0.25").fixed_rank((80, 48)) == 12
    assert RankPolicy.parse("ratio:0.3").fixed_rank((24, 48)) == 8  # ceil(7.2)
    assert RankPolicy.parse("ratio:0.001").fixed_rank((24, 48)) == 1
    sigma = torch.tensor([3.0, 2.0, 1.0, 1.0])  # energies 9, 4, 1, 1 of 15
    energy = lambda x: RankPolicy.parse(f"energy:{x}").rank_for(sigma, (4, 4))  # noqa: E731
    assert energy(0.5) == 1 and energy(0.6) == 1 and energy(0.61) == 2
    assert energy(13 / 15) == 2 and energy(0.9) == 3 and energy(1.0) == 4
    assert RankPolicy.parse("energy:0.9").needs_spectrum and not RankPolicy.parse("8").needs_spectrum


def test_rank_rules_parse():
    assert RankRules.parse(None).for_layer("model.layers.0.mlp.up_proj") == RankPolicy("full")
    assert not RankRules.parse(None).truncates
    rules = RankRules.parse(["16", "mlp.*=energy:0.95", "re:layers\\.1\\..*down_proj$=full", "q_proj=ratio:0.5"])
    assert rules.default == RankPolicy("fixed", 16) and rules.truncates
    assert rules.for_layer("model.layers.0.self_attn.k_proj") == RankPolicy("fixed", 16)
    assert rules.for_layer("model.layers.0.self_attn.q_proj") == RankPolicy("ratio", 0.5)
    assert rules.for_layer("model.layers.0.mlp.down_proj") == RankPolicy("energy", 0.95)
    assert rules.for_layer("model.layers.1.mlp.down_proj") == RankPolicy("full")
    assert rules.describe() == {"default": "16", "overrides": [
        ["mlp.*", "energy:0.95"], ["re:layers\\.1\\..*down_proj$", "full"], ["q_proj", "ratio:0.5"]]}
    assert RankRules.parse("energy:0.8").default == RankPolicy("energy", 0.8)
    assert RankRules.parse(["full", "mlp.*=full"]).truncates is False


@pytest.mark.parametrize("specs", [["mlp.*=bogus"], ["=4"], ["re:(=4"], ["mlp.*=0"], ["full", "energy:2"]])
def test_rank_rules_parse_invalid(specs):
    with pytest.raises(MoorizeError):
        RankRules.parse(specs)


@pytest.mark.parametrize("pattern, name, expected", [
    ("q_proj", "model.layers.0.self_attn.q_proj", True),
    ("q_proj", "model.layers.0.self_attn.q_proj_extra", False),
    ("proj", "model.layers.0.self_attn.q_proj", False),
    ("*proj", "model.layers.0.self_attn.q_proj", True),
    ("self_attn", "model.layers.0.self_attn.q_proj", False),
    ("self_attn.*", "model.layers.0.self_attn.q_proj", True),
    ("mlp.*", "model.layers.3.mlp.down_proj", True),
    ("mlp.*", "model.layers.3.self_attn.o_proj", False),
    ("layers.1.*", "model.layers.1.mlp.up_proj", True),
    ("layers.1.*", "model.layers.11.mlp.up_proj", False),
    ("model.layers.*.mlp.up_proj", "model.layers.7.mlp.up_proj", True),
    ("re:.*down_proj$", "model.layers.0.mlp.down_proj", True),
    ("re:down_proj$", "model.layers.0.mlp.down_proj.extra", False),
    ("re:layers\\.1\\.", "model.layers.1.mlp.up_proj", True),
    ("re:layers\\.1\\.", "model.layers.11.mlp.up_proj", False),
    ("re:^encoder", "encoder.layer.0.attention.self.query", True),
    ("re:^layer", "encoder.layer.0.attention.self.query", False),
])
def test_pattern_matches(pattern, name, expected):
    assert pattern_matches(pattern, name) is expected


@pytest.mark.parametrize("capability,want", [((9, 0), "gram"), ((8, 0), "gram"), ((8, 9), "svd"), ((12, 0), "svd")])
def test_auto_solver_on_cuda_follows_float64_rate(monkeypatch, capability, want):
    """gram where the GPU runs float64 at full rate (measured 7.9x faster than cuSOLVER SVD on an H200, and
    more accurate), svd on consumer GPUs; gram on the CPU. An explicit solver is kept everywhere."""
    from moorize.conversion.svd import resolve_solver

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_solver("auto", torch.device("cuda:0")) == want
    assert resolve_solver("auto", torch.device("cpu")) == "gram"
    assert resolve_solver("svd", torch.device("cuda:0")) == "svd"
