"""The generation loop over an export: prefill, then one token per step.

A ``--with-past`` decoder export starts from an empty cache and each step feeds the previous
``present`` tensors back as ``past_key_values``; an export without a cache recomputes the whole
sequence each step. The loop is the same for ``moorize run`` and ``MoOREOrtModel.generate``; the
server batches its own steps over the same session (``moorize.serving.engine``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import MoorizeError
from .sampling import check_sampling, sample_nucleus

log = logging.getLogger(__name__)


@dataclass
class GenerationTimes:
    """Wall-clock seconds of the last generate call: the prefill and every decoding step."""

    prefill: float = 0.0
    steps: list[float] = field(default_factory=list)
    new_tokens: int = 0  # generated tokens over the batch (finished rows excluded)

    @property
    def total(self) -> float:
        return self.prefill + sum(self.steps)


def capped_new_tokens(max_new_tokens, prompt_length: int, max_positions: int | None) -> int:
    """``max_new_tokens`` checked, and cut to the positions the prompt leaves (with a warning)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise MoorizeError(f"max_new_tokens must be an integer of at least 1, got {max_new_tokens!r}")
    if max_positions and prompt_length + max_new_tokens > max_positions:
        room = max_positions - prompt_length
        if room < 1:
            raise MoorizeError(f"the prompt's {prompt_length} tokens fill the model's {max_positions} "
                               "positions: nothing left to generate")
        log.warning("max_new_tokens %d capped to %d: the prompt's %d tokens leave no more of the model's %d "
                    "positions", max_new_tokens, room, prompt_length, max_positions)
        return room
    return int(max_new_tokens)


def generate_ids(model, input_ids, attention_mask=None, task=None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None) -> np.ndarray:
    """[batch, max_new_tokens] new token ids of ``model`` (a ``MoOREOrtModel``); rows that met EOS continue
    with the pad token. The timings land in ``model.last_times``."""
    if model.kind != "decoder":
        raise MoorizeError("generate() needs a decoder export; this one is an encoder (use classify())")
    check_sampling(do_sample, temperature, top_p, seed)
    ids, mask = model.check_ids(input_ids, attention_mask)
    max_new_tokens = capped_new_tokens(max_new_tokens, ids.shape[1], model.max_positions)
    batch = ids.shape[0]
    tids = model.task_ids(task, batch)
    eos = np.array(model.meta.get("eos_token_id") or [], dtype=np.int64)
    pad = model.meta.get("pad_token_id")
    pad = int(pad) if pad is not None else (int(eos[0]) if eos.size else 0)
    rng = np.random.default_rng(seed)
    done = np.zeros(batch, dtype=bool)
    out = np.full((batch, max_new_tokens), pad, dtype=np.int64)
    times = GenerationTimes()
    past, step_ids, seq = None, ids, ids
    for i in range(max_new_tokens):
        t0 = time.perf_counter()
        outputs = model.run(step_ids, mask, tids, past)
        logits = outputs[0][:, -1].astype(np.float32)
        nxt = sample_nucleus(logits, rng, temperature, top_p) if do_sample else logits.argmax(-1)
        nxt = np.where(done, pad, nxt)
        dt = time.perf_counter() - t0
        if i == 0:
            times.prefill = dt
        else:
            times.steps.append(dt)
        times.new_tokens += int((~done).sum())
        out[:, i] = nxt
        done |= np.isin(nxt, eos)
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], 1)
        if model.with_past:
            past, step_ids = list(outputs[1:]), nxt[:, None]
        else:  # no cache in the graph: recompute the whole sequence
            seq = np.concatenate([seq, nxt[:, None]], 1)
            step_ids = seq
        if done.all():
            out = out[:, : i + 1]
            break
    model.last_times = times
    return out
