"""End to end on the real checkpoints: SmolLM2-135M-Instruct (Llama) and all-MiniLM-L6-v2 (BERT).

Each conversion runs once per module (10-15 s each on a 2-core CPU) and is shared by
the tests that look at it. The full-rank and the energy:0.9 + residual keep variants
must reproduce the original model exactly (logits and greedy generation); the
residual drop variant must report the error the SVD truncation implies.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moorize.assets import smollm2_gguf
from moorize.conversion.pipeline import convert
from moorize.io.factored import MANIFEST, FactoredCheckpoint, factor_key
from moorize.io.safetensors import SafetensorsFile
from moorize.quickstart import greedy

pytestmark = pytest.mark.slow  # every test here

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
NEW_TOKENS = 16
# max |logit diff| <= LOGIT_ATOL + LOGIT_RTOL * max |logit| (the export validation's rule). The rebuilt
# float32 weights differ from the source by float32 rounding of U diag(S) Vh (+ R) (~3e-7 relative),
# which after 30 layers moves logits of magnitude ~38 by 1e-4 to 2e-4 depending on the CPU's kernels
# (about 25-50 float32 ulps at that magnitude): the error scales with the largest logit, not with each one.
LOGIT_ATOL, LOGIT_RTOL = 1e-4, 1e-5
SMOL_KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
BERT_KINDS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense")
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Singular values measure how much a matrix stretches.",
             "all-MiniLM-L6-v2 maps sentences to a 384 dimensional dense vector space."]


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---- shared conversions and models --------------------------------------------------------------

@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("real-factored")


@pytest.fixture(scope="module")
def smol_keep(smollm2_dir, outputs):
    out = outputs / "smol-keep"
    return out, convert(smollm2_dir, out, rank="energy:0.9", residual="keep")


@pytest.fixture(scope="module")
def smol_drop(smollm2_dir, outputs):
    out = outputs / "smol-drop"
    return out, convert(smollm2_dir, out, rank="energy:0.9", residual="drop")


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_full):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_full[0])
    assert tok.chat_template, "the factored directory lost the chat template"
    return tok


@pytest.fixture(scope="module")
def smol_ids(smol_tokenizer):
    """A real chat-formatted prompt, tokenized."""
    text = smol_tokenizer.apply_chat_template([{"role": "user", "content": "Explain what a singular value is."}],
                                              tokenize=False, add_generation_prompt=True)
    ids = smol_tokenizer(text, return_tensors="pt").input_ids
    assert ids.shape[1] > 10
    return ids


@pytest.fixture(scope="module")
def smol_reference(smollm2_original, smol_tokenizer, smol_ids):
    """The original model's logits on smol_ids and its greedy continuations of PROMPTS."""
    with torch.no_grad():
        logits = smollm2_original(smol_ids).logits
    gens = [greedy(smollm2_original, smol_tokenizer, p, NEW_TOKENS) for p in PROMPTS]
    return logits, gens


def _rebuilt(out: Path):
    with FactoredCheckpoint(out) as ckpt:
        return ckpt.dense_model()


def _logits(model, ids, ref: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == ref.shape
    assert torch.isfinite(logits).all()
    return logits


def _assert_logits_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    diff, bound = (got - ref).abs().max().item(), LOGIT_ATOL + LOGIT_RTOL * ref.abs().max().item()
    assert diff <= bound, f"max |logit diff| {diff:.2e} > {bound:.2e}"


# ---- 1. SmolLM2, full rank ----------------------------------------------------------------------

def test_smollm2_full_rank_layers(smollm2_full):
    out, report = smollm2_full
    with FactoredCheckpoint(out) as ckpt:
        layers = ckpt.layers
    assert len(layers) == 210 == len(report.layers)
    for i in range(30):
        for kind in SMOL_KINDS:
            assert f"model.layers.{i}.{kind}" in layers
    assert all(r.rank == r.full_rank and not r.residual for r in layers.values())
    worst = max(r.rel_error for r in layers.values())
    print(f"\nSmolLM2 full rank: worst rel_error {worst:.2e}, {report.bytes_in} B in -> {report.bytes_out} B out")
    assert worst < 1e-5


def test_smollm2_full_rank_exact(smollm2_full, smol_tokenizer, smol_ids, smol_reference):
    ref_logits, ref_gens = smol_reference
    model = _rebuilt(smollm2_full[0])
    logits = _logits(model, smol_ids, ref_logits)
    print(f"\nSmolLM2 full rank: max |logit diff| {(logits - ref_logits).abs().max().item():.2e} "
          f"(max |logit| {ref_logits.abs().max().item():.1f})")
    _assert_logits_close(logits, ref_logits)
    for prompt, want in zip(PROMPTS, ref_gens):
        got = greedy(model, smol_tokenizer, prompt, NEW_TOKENS)
        assert len(got) == len(want) > 0
        assert got == want, f"generation differs for {prompt!r}"


# ---- 2. SmolLM2, energy:0.9 with the residual kept ----------------------------------------------

def test_smollm2_energy_keep_is_truncated_and_exact(smol_keep, smol_tokenizer, smol_ids, smol_reference):
    out, report = smol_keep
    with FactoredCheckpoint(out) as ckpt:
        layers = ckpt.layers
        names = set(ckpt.tensor_names())
        assert len(layers) == 210
        ranks = [r.rank for r in layers.values()]
        full = [r.full_rank for r in layers.values()]
        mean_rank, mean_full = sum(ranks) / len(ranks), sum(full) / len(full)
        print(f"\nSmolLM2 energy:0.9 keep: ranks {min(ranks)}-{max(ranks)}, mean {mean_rank:.1f} of "
              f"{mean_full:.1f}; {report.bytes_out} B out (factors + dense residuals)")
        assert mean_rank < 0.75 * mean_full
        truncated = [r for r in layers.values() if r.rank < r.full_rank]
        assert truncated
        for r in layers.values():
            assert r.energy_kept >= 0.9 - 1e-6
            assert r.residual == (r.rank < r.full_rank)
            assert (factor_key(r.name, "residual") in names) == r.residual
            assert r.rel_error < 1e-5
        rec = truncated[0]
        U, S, Vh, R = ckpt.factors(rec.name)
        assert U.shape == (rec.shape[0], rec.rank) and S.shape == (rec.rank,) and Vh.shape == (rec.rank, rec.shape[1])
        assert R is not None and R.shape == rec.shape
        model = ckpt.dense_model()
    ref_logits, ref_gens = smol_reference
    logits = _logits(model, smol_ids, ref_logits)
    print(f"SmolLM2 energy:0.9 keep: max |logit diff| {(logits - ref_logits).abs().max().item():.2e}")
    _assert_logits_close(logits, ref_logits)
    for prompt, want in zip(PROMPTS, ref_gens):
        assert greedy(model, smol_tokenizer, prompt, NEW_TOKENS) == want, f"generation differs for {prompt!r}"


# ---- 3. SmolLM2, energy:0.9 with the residual dropped -------------------------------------------

def test_smollm2_energy_drop_reports_truncation_error(smol_drop, smollm2_full, smol_ids, smol_reference):
    out, report = smol_drop
    with FactoredCheckpoint(out) as ckpt:
        layers = ckpt.layers
        names = set(ckpt.tensor_names())
        model = ckpt.dense_model()
    assert len(layers) == 210
    assert not any(r.residual for r in layers.values())
    assert not any(n.endswith(".moore.residual") for n in names)
    for r in layers.values():
        assert r.energy_kept >= 0.9 - 1e-6
        assert r.rel_error == pytest.approx(math.sqrt(max(0.0, 1.0 - r.energy_kept)), abs=1e-3), r.name
        assert r.rel_error == pytest.approx(r.factor_rel_error, abs=1e-12)
    errs = [r.rel_error for r in layers.values()]
    ranks = [r.rank for r in layers.values()]
    full_size, drop_size = _dir_size(smollm2_full[0]), _dir_size(out)
    diff = (_logits(model, smol_ids, smol_reference[0]) - smol_reference[0]).abs().max().item()
    print(f"\nSmolLM2 energy:0.9 drop: mean rank {sum(ranks) / len(ranks):.1f}, rel_error mean "
          f"{sum(errs) / len(errs):.4f} worst {max(errs):.4f}; size {drop_size} B vs full {full_size} B "
          f"({drop_size / full_size:.2f}x); max |logit diff| {diff:.3f}")
    assert max(errs) < 0.35  # 1 - 0.9 energy -> about 0.32
    assert drop_size < full_size
    assert report.bytes_out < smollm2_full[1].bytes_out
    assert math.isfinite(diff) and diff > 0


# ---- 4. straight from the GGUF file -------------------------------------------------------------

def test_smollm2_from_gguf(outputs, smollm2_full):
    out = outputs / "smol-gguf"
    report = convert(smollm2_gguf(), out)
    manifest = json.loads((out / MANIFEST).read_text())
    dir_manifest = json.loads((smollm2_full[0] / MANIFEST).read_text())
    assert report.source_kind == "gguf" and manifest["source"]["kind"] == "gguf"
    assert manifest["source"]["fingerprint"] == report.fingerprint
    assert manifest["source"]["fingerprint"] != dir_manifest["source"]["fingerprint"]
    assert len(report.layers) == 210 and report.worst_rel_error < 1e-5
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["model_type"] == "llama"
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer.model").is_file()
    assert (out / "tokenizer_config.json").is_file()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template


# ---- 5. MiniLM-L6 (BERT) ------------------------------------------------------------------------

def test_minilm_full_rank(minilm_path, outputs):
    from transformers import AutoModel, AutoTokenizer

    out = outputs / "minilm"
    report = convert(minilm_path, out)
    src = SafetensorsFile(minilm_path / "model.safetensors")
    try:
        src_dtypes = {i.name: i.torch_dtype for i in src.infos()}
        with FactoredCheckpoint(out) as ckpt:
            layers = ckpt.layers
            assert len(layers) == 36
            for i in range(6):
                for kind in BERT_KINDS:
                    rec = layers[f"encoder.layer.{i}.{kind}"]
                    assert rec.rank == rec.full_rank and not rec.residual and rec.bias
                    assert rec.dtype == rec.source_dtype == str(src_dtypes[f"{rec.name}.weight"]).replace("torch.", "")
                    assert ckpt.tensor(factor_key(rec.name, "U")).dtype == src_dtypes[f"{rec.name}.weight"]
            assert max(r.rel_error for r in layers.values()) < 1e-5
            # non-target tensors (embeddings, pooler, norms, biases) are copied byte-identical
            kept = [n for n in ckpt.tensor_names() if n.startswith(("pooler.", "embeddings."))]
            assert any(n.startswith("pooler.") for n in kept) and any(n.startswith("embeddings.") for n in kept)
            for n in kept:
                a, b = ckpt.tensor(n), src.load(n)
                assert a.dtype == b.dtype and a.shape == b.shape
                assert ckpt._file(ckpt.weight_map[n]).load_bytes(n) == src.load_bytes(n), n
            model = ckpt.dense_model()
    finally:
        src.close()
    original = AutoModel.from_pretrained(minilm_path).eval()
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = original(**batch).last_hidden_state
        got = model(**batch).last_hidden_state
    assert got.shape == want.shape and torch.isfinite(got).all()
    mask = batch.attention_mask.bool()
    assert (~mask).any()  # the batch is padded
    diff = (got - want).abs()
    print(f"\nMiniLM full rank: worst rel_error {report.worst_rel_error:.2e}, max |hidden diff| "
          f"{diff[mask].max().item():.2e} on tokens, {diff[~mask].max().item():.2e} on padding")
    assert diff[mask].max().item() < 1e-4
    # hidden states at padded positions (which pooling masks out) are far more sensitive to rounding
    assert diff.max().item() < 1e-3


# ---- 6. moorize inspect --plot ------------------------------------------------------------------

def test_inspect_plot_cli(smollm2_full, tmp_path):
    png = tmp_path / "f.png"
    res = subprocess.run([sys.executable, "-m", "moorize", "inspect", str(smollm2_full[0]), "--plot", str(png)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "self_attn.q_proj" in res.stdout and "mlp.down_proj" in res.stdout
    assert "210 layers" in res.stdout
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
