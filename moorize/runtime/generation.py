"""The generation loop over an export: prefill, then one token per step.

A ``--with-past`` decoder export starts from an empty cache and each step feeds the previous
``present`` tensors back as ``past_key_values``; an export without a cache recomputes the whole
sequence each step. An encoder-decoder runs its encoder once and its decoder every step (with past,
on its caches). The loop is the same for ``moorize run`` and ``MoOREOrtModel.generate``; the
server batches its own steps over the same session (``moorize.serving.engine``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import MoorizeError
from .beam import beam_search, check_beams
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

    def record(self, step: int, seconds: float, new_tokens: int) -> None:
        """Step ``step`` (0: the prefill) took ``seconds`` and made ``new_tokens`` tokens."""
        if step == 0:
            self.prefill = seconds
        else:
            self.steps.append(seconds)
        self.new_tokens += new_tokens


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
                 seed: int | None = None, num_beams: int = 1) -> np.ndarray:
    """[batch, max_new_tokens] new token ids of ``model`` (a ``MoOREOrtModel``); rows that met EOS continue
    with the pad token. ``num_beams`` > 1 is beam search (``moorize.runtime.beam``), with the length penalty and
    early stopping of the generation config the export recorded. The timings land in ``model.last_times``."""
    if not model.generates:
        raise MoorizeError(f"generate() needs a decoder or encoder-decoder export; this one is an {model.kind} (use "
                           "classify())")
    check_sampling(do_sample, temperature, top_p, seed)
    num_beams = check_beams(num_beams, do_sample)
    ids, mask = model.check_ids(input_ids, attention_mask)
    batch = ids.shape[0]
    tids = model.task_ids(task, batch)
    if num_beams > 1:  # each prompt's rows side by side, as transformers expands them
        ids, mask, tids = (np.repeat(a, num_beams, axis=0) for a in (ids, mask, tids))
    if model.kind == "decoder":
        max_new_tokens = capped_new_tokens(max_new_tokens, ids.shape[1], model.max_positions)
        step = _DecoderSteps(model, ids, mask, tids)
    else:  # the decoder's own positions: its start token and the new tokens
        max_new_tokens = capped_new_tokens(max_new_tokens, 1, model.max_positions)
        step = _Seq2SeqSteps(model, ids, mask, tids, max_new_tokens)
    eos = np.array(model.meta.get("eos_token_id") or [], dtype=np.int64)
    pad = model.meta.get("pad_token_id")
    pad = int(pad) if pad is not None else (int(eos[0]) if eos.size else 0)
    if num_beams > 1:
        times = GenerationTimes()
        out = beam_search(step, batch, num_beams, max_new_tokens, eos, pad, model.meta.get("length_penalty", 1.0),
                          model.meta.get("early_stopping", False), times)
        model.last_times = times
        return out
    rng = np.random.default_rng(seed)
    done = np.zeros(batch, dtype=bool)
    out = np.full((batch, max_new_tokens), pad, dtype=np.int64)
    times = GenerationTimes()
    nxt = None
    for i in range(max_new_tokens):
        t0 = time.perf_counter()
        logits = step(nxt)
        step.constrain(logits, i)
        nxt = sample_nucleus(logits, rng, temperature, top_p) if do_sample else logits.argmax(-1)
        nxt = np.where(done, pad, nxt)
        times.record(i, time.perf_counter() - t0, int((~done).sum()))
        out[:, i] = nxt
        done |= np.isin(nxt, eos)
        if done.all():
            out = out[:, : i + 1]
            break
    model.last_times = times
    return out


class _DecoderSteps:
    """A decoder's steps: ``step(previous tokens or None)`` gives [rows, vocab] float32 logits of the next one. With
    a cache each step feeds the previous ``present`` tensors back; without one it recomputes the whole sequence."""

    def __init__(self, model, ids: np.ndarray, mask: np.ndarray, tids: np.ndarray):
        self.model, self.tids, self.past, self.mask, self.seq = model, tids, None, mask, ids

    def __call__(self, prev):
        model, feed = self.model, self.seq
        if prev is not None:
            self.mask = np.concatenate([self.mask, np.ones((len(self.mask), 1), dtype=np.int64)], 1)
            if model.with_past:
                feed = prev[:, None]
            else:
                feed = self.seq = np.concatenate([self.seq, prev[:, None]], 1)
        outputs = model.run(feed, self.mask, self.tids, self.past)
        if model.with_past:
            self.past = list(outputs[1:])
        return outputs[0][:, -1].astype(np.float32)

    def constrain(self, scores: np.ndarray, position: int) -> None:
        """A decoder export records no generation constraints."""

    def reorder(self, rows: np.ndarray) -> None:
        """Row r continues from row ``rows[r]`` (beam search): its cache, mask and sequence."""
        self.mask, self.seq = self.mask[rows], self.seq[rows]
        if self.past is not None:
            self.past = [p[rows] for p in self.past]


class _Seq2SeqSteps:
    """An encoder-decoder's steps: the encoder runs once (in the first step, so the prefill time holds it); each
    step the decoder reads the target so far, from the start token, against the encoder's states, or (exported
    with past) only the new token, after its self-attention cache and the encoder's cross-attention cache. The generation
    config's constraints that the export records apply as transformers applies them (``constrain``): the forced
    first token (mBART's target language), the forced last one (EOS at the length limit) and the tokens never
    generated."""

    def __init__(self, model, ids: np.ndarray, mask: np.ndarray, tids: np.ndarray, max_new_tokens: int):
        meta = model.meta
        self.model, self.ids, self.mask, self.tids = model, ids, mask, tids
        self.states, self.cross, self.past = None, [], None
        self.target = np.full((len(ids), 1), int(meta["decoder_start_token_id"]), dtype=np.int64)
        forced_eos = meta.get("forced_eos_token_id")
        if isinstance(forced_eos, list):  # a forced EOS given as several ids: the first, as transformers does
            forced_eos = forced_eos[0] if forced_eos else None
        self.forced = {0: meta.get("forced_bos_token_id"), max_new_tokens - 1: forced_eos}
        self.suppress = [t for t in meta.get("suppress_token_ids") or [] if 0 <= t]

    def __call__(self, prev):
        model, feed = self.model, self.target
        if prev is None:
            self.states, self.cross = model.encode_with_cache(self.ids, self.mask, self.tids)
        else:
            self.target = np.concatenate([self.target, prev[:, None]], 1)
            feed = prev[:, None] if model.with_past else self.target
        if not model.with_past:
            return model.decode(feed, self.states, self.mask, self.tids)[:, -1].astype(np.float32)
        logits, self.past = model.decode_step(feed, self.states, self.mask, self.tids, self.past, self.cross)
        return logits[:, -1].astype(np.float32)

    def constrain(self, scores: np.ndarray, position: int) -> None:
        """The generation config's constraints on the scores of new token ``position`` (0: the first), in place."""
        scores[:, [t for t in self.suppress if t < scores.shape[1]]] = -np.inf
        token = self.forced.get(position)
        if token is not None and 0 <= token < scores.shape[1]:
            scores[:, :] = -np.inf
            scores[:, token] = 0.0

    def reorder(self, rows: np.ndarray) -> None:
        """Row r continues from row ``rows[r]`` (beam search): its target and self-attention cache; the encoder's
        states and cross-attention cache are the same within a prompt."""
        self.target = self.target[rows]
        if self.past is not None:
            self.past = [p[rows] for p in self.past]
