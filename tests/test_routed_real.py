"""The routed model (moorize.load) on the real checkpoints: SmolLM2-135M-Instruct and all-MiniLM-L6-v2.

A freshly loaded MoORE model computes exactly the original (H = I, A = B = 0), so its
logits, greedy generations (single and batched, left-padded) and BERT hidden states must
match the transformers originals, for every task; a trained-looking adapter must round-trip
bit for bit; and loading must not materialise the dense weights next to the factors.
Each conversion and each model load happens once per module.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import moorize
from moorize import moore_layers
from moorize.model.adapter import WEIGHTS_NAME
from moorize.model.layer import layer_trainable
from moorize.quickstart import greedy

pytestmark = pytest.mark.slow  # every test here

TASKS = ["a", "b"]
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
NEW_TOKENS = 16
# Max |logit diff| allowed against the original. In float64 the routed model is checked to ATOL. In
# float32 the routed layers compute U (σ ⊙ (Vh H x)), whose rounding differs from the dense W x: each
# float32 model is ~1e-4 off the float64 logits (worst at the first, attention-sink position, whose
# activations are huge), so two float32 runs differ by up to about twice that, F32_ATOL; there the
# check that matters is that the routed model is about as far from the float64 logits as the original:
# it rounds twice (Vh x, then U ·) where the original rounds once, so within 3x (2.4x measured on an
# AVX-512 CPU, under 2x on others).
ATOL = 1e-4
F32_ATOL = 3e-4
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Singular values measure how much a matrix stretches.",
             "all-MiniLM-L6-v2 maps sentences to a 384 dimensional dense vector space."]


def _safetensors_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# ---- shared conversions, models and references --------------------------------------------------

@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("routed-real")


@pytest.fixture(scope="module")
def smol_routed(smollm2_full):
    return moorize.load(smollm2_full[0], router="task+sample", tasks=TASKS)


@pytest.fixture(scope="module")
def tokenizer(smollm2_full):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_full[0])
    assert tok.chat_template, "the factored directory lost the chat template"
    return tok


def _chat(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


@pytest.fixture(scope="module")
def smol_ids(tokenizer):
    ids = tokenizer(_chat(tokenizer, "Explain what a singular value is."), return_tensors="pt").input_ids
    assert ids.shape[1] > 10
    return ids


@pytest.fixture(scope="module")
def ref_logits(smollm2_original, smol_ids):
    with torch.no_grad():
        return smollm2_original(smol_ids).logits


@pytest.fixture(scope="module")
def exact_logits(smollm2_dir, smol_ids):
    """The original model run in float64: what float32 runs are rounding away from."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        return model(smol_ids).logits


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _logits(model, ids, **task) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=ids, **task).logits
    assert torch.isfinite(logits).all()
    return logits


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.double() - b.double()).abs().max().item()


def _check_float32_logits(got: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor) -> tuple[float, float, float]:
    """(|got - ref|, |got - exact|, |ref - exact|) maxima; got is as accurate as the float32 original ref."""
    diff, err_got, err_ref = _max_diff(got, ref), _max_diff(got, exact), _max_diff(ref, exact)
    assert diff < F32_ATOL, f"max |logit diff| {diff:.2e} vs the original"
    assert err_got < max(3 * err_ref, ATOL), f"{err_got:.2e} off float64 logits, the original {err_ref:.2e}"
    return diff, err_got, err_ref


# ---- 1. SmolLM2 full rank, routed: logits and greedy generation ----------------------------------

def test_smollm2_routed_logits_equal_original(smol_routed, smollm2_full, smol_ids, ref_logits, exact_logits):
    assert type(smol_routed).__name__ == "LlamaForCausalLM"
    layers = moore_layers(smol_routed)
    assert len(layers) == 210 and all(isinstance(m, moorize.MoORELinear) for m in layers.values())
    for t, name in enumerate(TASKS):
        by_id = _logits(smol_routed, smol_ids, task_ids=torch.tensor([t]))
        by_name = _logits(smol_routed, smol_ids, task_ids=[name])
        assert torch.equal(by_id, by_name)
        diff, err_routed, err_original = _check_float32_logits(by_id, ref_logits, exact_logits)
        print(f"\nSmolLM2 routed full rank, task {name!r}: max |logit diff| vs original {diff:.2e} (max |logit| "
              f"{ref_logits.abs().max().item():.1f}); vs float64 original: routed {err_routed:.2e}, "
              f"original {err_original:.2e}")
    assert smol_routed.moore_state.task_ids is None
    # free of float32 rounding, the routed model is the original
    model64 = moorize.load(smollm2_full[0], router="task+sample", tasks=TASKS, dtype=torch.float64)
    diffs = []
    for t in range(len(TASKS)):
        logits = _logits(model64, smol_ids, task_ids=torch.tensor([t]))
        assert logits.dtype == torch.float64
        diffs.append(_max_diff(logits, exact_logits))
    print(f"SmolLM2 routed full rank in float64: max |logit diff| vs float64 original {max(diffs):.2e}")
    assert max(diffs) < ATOL


def test_smollm2_routed_greedy_generation_equals_original(smol_routed, smollm2_original, tokenizer):
    for prompt in PROMPTS:
        want = greedy(smollm2_original, tokenizer, prompt, NEW_TOKENS)
        assert len(want) > 0
        for t, name in enumerate(TASKS):
            got = greedy(smol_routed, tokenizer, prompt, NEW_TOKENS, task_ids=torch.tensor([t]))
            assert got == want, f"task {name!r}: generation differs for {prompt!r}"
    print(f"\nSmolLM2 routed: {len(PROMPTS)} prompts x {len(TASKS)} tasks x {NEW_TOKENS} tokens identical; "
          f"e.g. {tokenizer.decode(want, skip_special_tokens=True)!r}")
    assert smol_routed.moore_state.task_ids is None and smol_routed.moore_state.sticky is None


def test_smollm2_routed_batched_generation_mixed_tasks(smol_routed, smollm2_original, smollm2_full):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_full[0], padding_side="left")
    texts = [_chat(tok, PROMPTS[0]), _chat(tok, PROMPTS[2])]
    batch = tok(texts, return_tensors="pt", padding=True)
    assert (batch.attention_mask == 0).any()  # the two prompts differ in length: left padding is in play
    assert (batch.attention_mask[:, -1] == 1).all()
    kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=_pad_id(tok))
    with torch.no_grad():
        want = smollm2_original.generate(**batch, **kw)
        got = smol_routed.generate(**batch, task_ids=torch.tensor([0, 1]), **kw)
    assert want.shape == got.shape and want.shape[1] > batch.input_ids.shape[1]
    assert torch.equal(got, want)
    assert smol_routed.moore_state.task_ids is None


# ---- 2. SmolLM2 at rank 64 with the residual kept ------------------------------------------------

def test_smollm2_rank64_keep_routed_equals_original(smollm2_dir, outputs, smol_ids, ref_logits, exact_logits):
    out = outputs / "smol-r64-keep"
    moorize.convert(smollm2_dir, out, rank="64", residual="keep")
    with moorize.FactoredCheckpoint(out) as ckpt:
        assert all(r.rank == 64 and r.residual for r in ckpt.layers.values())
    model = moorize.load(out, router="task+sample", tasks=TASKS)
    assert all(m.rank == 64 and m.residual is not None for m in moore_layers(model).values())
    for t, name in enumerate(TASKS):
        logits = _logits(model, smol_ids, task_ids=torch.tensor([t]))
        diff, err_routed, err_original = _check_float32_logits(logits, ref_logits, exact_logits)
        print(f"\nSmolLM2 routed rank 64 + residual, task {name!r}: max |logit diff| vs original {diff:.2e}; "
              f"vs float64 original: routed {err_routed:.2e}, original {err_original:.2e}")


# ---- 3. MiniLM-L6 (BERT) routed ------------------------------------------------------------------

def test_minilm_routed_hidden_states_equal_original(minilm_path, outputs):
    from transformers import AutoModel, AutoTokenizer

    out = outputs / "minilm"
    moorize.convert(minilm_path, out)
    model = moorize.load(out, router="task+sample", tasks=TASKS)
    assert type(model).__name__ == "BertModel" and len(moore_layers(model)) == 36
    original = AutoModel.from_pretrained(minilm_path).eval()
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    mask = batch.attention_mask.bool()
    assert (~mask).any()  # the batch is padded
    with torch.no_grad():
        want = original(**batch).last_hidden_state
        diffs = []
        for t in range(len(TASKS)):
            got = model(**batch, task_ids=torch.full((len(SENTENCES),), t)).last_hidden_state
            assert got.shape == want.shape and torch.isfinite(got).all()
            diffs.append((got - want).abs()[mask].max().item())
        mixed = model(**batch, task_ids=torch.tensor([0, 1, 0])).last_hidden_state
        diffs.append((mixed - want).abs()[mask].max().item())
    print(f"\nMiniLM routed: max |hidden diff| on real tokens per task {[f'{d:.2e}' for d in diffs[:-1]]}, "
          f"mixed batch {diffs[-1]:.2e}")
    assert max(diffs) < ATOL


# ---- 4. a non-trivial adapter on SmolLM2 ---------------------------------------------------------

def test_smollm2_adapter_roundtrip(smol_routed, smollm2_full, smollm2_dir, smol_ids, ref_logits, tmp_path):
    """Perturbs the shared routed model like training would, and puts it back afterwards."""
    params = [p for layer in moore_layers(smol_routed).values() for p in layer_trainable(layer).values()]
    saved = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
        before = [_logits(smol_routed, smol_ids, task_ids=torch.tensor([t])) for t in range(len(TASKS))]
        adapter = moorize.save_adapter(smol_routed, tmp_path / "adapter")
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
    task_gap = _max_diff(before[0], before[1])
    moved = _max_diff(before[0], ref_logits)
    assert task_gap > 1e-2, "the two tasks give the same logits"
    assert moved > 1e-2, "the perturbed adapter did not change the model"

    again = moorize.load(smollm2_full[0], adapter)
    assert again.moore_tasks == {"a": 0, "b": 1} and again.moore_config.router == "task+sample"
    for t in range(len(TASKS)):
        assert torch.equal(_logits(again, smol_ids, task_ids=torch.tensor([t])), before[t]), f"task {t}"

    n_params = sum(p.numel() for p in params)
    adapter_size = (adapter / WEIGHTS_NAME).stat().st_size
    base_size, dense_size = _safetensors_size(smollm2_full[0]), _safetensors_size(smollm2_dir)
    mib = 2**20
    print(f"\nSmolLM2 adapter: {n_params} parameters, {WEIGHTS_NAME} {adapter_size / mib:.1f} MiB vs factored base "
          f"{base_size / mib:.1f} MiB ({adapter_size / base_size:.3f}x; dense original {dense_size / mib:.1f} MiB); "
          f"max |logit diff| between tasks {task_gap:.3f}, from the original {moved:.3f}")
    assert adapter_size < 0.35 * base_size and adapter_size < 0.35 * dense_size
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", WEIGHTS_NAME]


# ---- 5. peak memory of moorize.load ---------------------------------------------------------------

LOAD_SNIPPET = textwrap.dedent("""
    import resource, sys
    import torch, transformers, accelerate, moorize
    import transformers.models.llama.modeling_llama

    def hwm():  # peak RSS of this process image only: ru_maxrss also holds the parent's peak, kept over exec
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    maxrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    b_hwm, b_max = hwm(), maxrss()
    model = moorize.load(sys.argv[1], router="task+sample", tasks=["a", "b"])
    assert len(moorize.moore_layers(model)) == 210
    print(b_hwm, hwm(), b_max, maxrss())
""")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS from /proc (Linux)")
def test_load_peak_memory_is_factors_not_dense(smollm2_full, smollm2_dir):
    """Loading holds the factors (and the MoORE parameters), never the dense weights beside them.

    The peak is VmHWM of a fresh interpreter, measured after its imports and after the load:
    ru_maxrss of a child of this (large) pytest process starts at this process's peak.
    """
    res = subprocess.run([sys.executable, "-c", LOAD_SNIPPET, str(smollm2_full[0])], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    base, peak, b_max, a_max = (int(v) for v in res.stdout.split()[-4:])
    factors, dense = _safetensors_size(smollm2_full[0]), _safetensors_size(smollm2_dir)
    mib = 2**20
    print(f"\nmoorize.load peak RSS {peak / mib:.0f} MiB, after imports {base / mib:.0f} MiB: "
          f"+{(peak - base) / mib:.0f} MiB (bound +{1.5 * factors / mib:.0f} MiB = 1.5 x factored safetensors "
          f"{factors / mib:.0f} MiB; dense original {dense / mib:.0f} MiB); ru_maxrss {b_max / mib:.0f} -> "
          f"{a_max / mib:.0f} MiB (parent's peak)")
    assert peak < base + 1.5 * factors
    assert peak - base < factors + dense
