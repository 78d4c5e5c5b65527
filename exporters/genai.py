"""``genai_config.json``: what onnxruntime-genai needs to run a ``--with-past`` decoder export.

onnxruntime-genai drives a decoder through named inputs and outputs given in its
config; moorize's graph already has the names and the layout it expects
(``input_ids``, ``attention_mask``, ``past_key_values.%d.key|value`` →
``logits``, ``present.%d.key|value``, keys [batch, kv_heads, seq, head_dim]). The
cache is a concatenation (present = past + new), so ``past_present_share_buffer`` is
off. ``task_ids`` is not a genai input: callers feed it with
``generator.set_model_input("task_ids", ids)`` (one id per row), and genai passes
it to every run. The tokenizer files beside the graph are the checkpoint's.
"""

from __future__ import annotations

import json
from pathlib import Path

GENAI_CONFIG = "genai_config.json"


def genai_config(meta: dict, hf_config: dict) -> dict:
    """The config for an export's ``moorize_export.json`` (``meta``) and its ``config.json``."""
    cfg = {**hf_config.get("text_config", {}), **hf_config} if isinstance(hf_config.get("text_config"), dict) \
        else hf_config
    kv = meta["kv"]
    eos = list(meta.get("eos_token_id") or [])
    pad = meta.get("pad_token_id")
    context = cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048
    heads = cfg.get("num_attention_heads") or cfg.get("n_head") or kv["num_kv_heads"]
    return {
        "model": {
            "type": "llama",  # genai's generic decoder-only runner; the graph decides the architecture
            "bos_token_id": cfg.get("bos_token_id") if isinstance(cfg.get("bos_token_id"), int) else 0,
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": pad if isinstance(pad, int) else (eos[0] if eos else 0),
            "context_length": context,
            "vocab_size": cfg.get("vocab_size"),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": meta.get("graph", "model.onnx"),
                "head_size": kv["head_dim"],
                "hidden_size": cfg.get("hidden_size") or cfg.get("n_embd") or heads * kv["head_dim"],
                "num_attention_heads": heads,
                "num_key_value_heads": kv["num_kv_heads"],
                "num_hidden_layers": kv["num_layers"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def write_genai_config(directory: Path, meta: dict) -> Path:
    """Write ``genai_config.json`` into an export directory that has its ``config.json``."""
    directory = Path(directory)
    hf = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
    path = directory / GENAI_CONFIG
    path.write_text(json.dumps(genai_config(meta, hf), indent=2) + "\n")
    return path
