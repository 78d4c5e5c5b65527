"""What an export's ``config.json`` allows: the position limit and the vocabulary size."""

from __future__ import annotations

import json
from pathlib import Path


def model_limits(directory: Path) -> tuple[int | None, int | None]:
    """(position limit, vocabulary size) from the export's config.json; None where it does not say."""
    try:
        cfg = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(cfg, dict):
        return None, None
    cfg = {**cfg.get("text_config", {}), **cfg} if isinstance(cfg.get("text_config"), dict) else cfg

    def positive(*keys):
        for key in keys:
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    return positive("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"), positive("vocab_size")
