"""The adapter files as PEFT writes them and the serving engines read them.

``adapter_config.json`` is PEFT's LoraConfig; ``adapter_model.safetensors`` holds, per module,
``base_model.model.<module>.lora_A.weight`` [r, in] and ``…lora_B.weight`` [out, r] (the adapter-name-free
keys PEFT saves, and the ones vLLM, SGLang and LoRAX load). Every module's scale lora_alpha / r is 1:
``lora_alpha`` equals ``r`` and ``alpha_pattern`` equals ``rank_pattern``, so an engine that reads only the
global ``r`` and ``lora_alpha`` (vLLM ignores both patterns) scales each module right, its rank coming
from its tensors' shapes.
"""

from __future__ import annotations

KEY_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
REPORT_NAME = "moorize_lora.json"
# vLLM's --max-lora-rank accepts these values (vllm.config.lora.MaxLoRARanks, v0.14 to v0.22)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# modules a LoRA engine does not patch in the form moorize writes (vLLM rejects them on load)
_UNPATCHED = ("lm_head", "embed_tokens", "wte", "word_embeddings", "embed_out")
# transformers task heads whose PEFT task type makes PeftModel.from_pretrained give the matching wrapper
TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForSeq2SeqLM": "SEQ_2_SEQ_LM",
              "ForConditionalGeneration": "SEQ_2_SEQ_LM", "ForSequenceClassification": "SEQ_CLS",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}


def tensor_keys(module: str) -> tuple[str, str]:
    """The (lora_A, lora_B) keys of one module."""
    return f"{KEY_PREFIX}{module}.lora_A.weight", f"{KEY_PREFIX}{module}.lora_B.weight"


def target_modules(targets: list[str], linear_modules: list[str]) -> list[str]:
    """``target_modules`` as people write it, the modules' last names (``q_proj``), where those names pick
    exactly the targets among the model's linear layers; otherwise every target's full path."""
    suffix = {t.rpartition(".")[2] for t in targets}
    picked = {m for m in linear_modules if m.rpartition(".")[2] in suffix}
    return sorted(suffix) if picked == set(targets) else sorted(targets)


def task_type(architectures) -> str | None:
    for arch in architectures or ():
        for ending, kind in TASK_TYPES.items():
            if arch.endswith(ending):
                return kind
    return None


def adapter_config(ranks: dict[str, int], targets: list[str], *, base: str, task: str | None,
                   fan_in_fan_out: bool) -> dict:
    """PEFT's LoraConfig of one task: per-module ranks, every module's scale 1."""
    r = max(ranks.values())
    pattern = {module: k for module, k in ranks.items() if k != r}
    return {
        "peft_type": "LORA", "task_type": task, "base_model_name_or_path": base, "revision": None,
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
        "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
    }


def engine_notes(r: int, modules: list[str]) -> list[str]:
    """What the serving engines need to take this adapter, or why one cannot."""
    notes = []
    fits = [v for v in VLLM_MAX_LORA_RANKS if v >= r]
    if fits:
        notes.append(f"vLLM: serve with --enable-lora --max-lora-rank {fits[0]} (rank {r})")
    else:
        notes.append(f"vLLM: rank {r} exceeds the largest --max-lora-rank, {VLLM_MAX_LORA_RANKS[-1]}: export with "
                     f"--rank {VLLM_MAX_LORA_RANKS[-1]} or a larger --max-error")
    unpatched = [m for m in modules if m.rpartition(".")[2] in _UNPATCHED]
    if unpatched:
        notes.append(f"vLLM, SGLang: LoRA on {', '.join(unpatched[:3])} is not applied by these engines; convert "
                     "without those targets to serve there")
    return notes
