"""Beam search over an export's steps, choosing what transformers' ``generate(num_beams=K)`` chooses.

Each prompt keeps K running beams. A step scores every (beam, token) pair as the beam's summed
log-probability plus the token's, keeps the best 2K (more with several EOS ids) so that K stay
alive after some end, and moves an ending candidate among the first K to the prompt's finished
hypotheses with the score divided by (its generated length ** ``length_penalty``). The search
stops where transformers stops: when no running beam can beat the worst finished one (its
``early_stopping=False`` heuristic: the running score at the current length), when every prompt has
K finished ones (``early_stopping=True``), or at ``max_new_tokens``. The export's state (a cache, or
the sequence so far) follows the surviving beams through ``steps.reorder``.
"""

from __future__ import annotations

import time

import numpy as np

from ..errors import MoorizeError

_NEG = -1.0e9  # transformers' "never chosen" score


def check_beams(num_beams, do_sample: bool) -> int:
    """``num_beams`` as an int >= 1, or one line saying why not."""
    if isinstance(num_beams, bool) or not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
        raise MoorizeError(f"num_beams must be an integer of at least 1, got {num_beams!r}")
    if num_beams > 1 and do_sample:
        raise MoorizeError("beam search is deterministic: give num_beams > 1 or do_sample, not both")
    return int(num_beams)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row, the indices of the k largest scores, largest first (ties: the lower index first)."""
    part = np.argpartition(-scores, k - 1, axis=-1)[:, :k] if k < scores.shape[-1] else \
        np.broadcast_to(np.arange(scores.shape[-1]), scores.shape)
    picked = np.take_along_axis(scores, part, -1)
    order = np.lexsort((part, -picked), axis=-1)
    return np.take_along_axis(part, order, -1)


def beam_search(steps, batch: int, num_beams: int, max_new_tokens: int, eos: np.ndarray, pad: int,
                length_penalty: float = 1.0, early_stopping: bool | str = False, times=None) -> np.ndarray:
    """[batch, length] new ids of each prompt's best hypothesis (EOS kept, then ``pad``).

    ``steps(prev)`` gives [batch * num_beams, vocab] logits (``prev`` None first: the prefill of each prompt
    repeated num_beams times, rows grouped by prompt), ``steps.constrain(log_probs, position)`` applies the
    generation config's constraints in place, ``steps.reorder(rows)`` makes row r continue from row rows[r];
    ``times`` (a ``GenerationTimes``) records each step."""
    k = num_beams
    keep = max(2, 1 + len(eos)) * k
    first_k = np.arange(keep) < k
    running = np.full((batch, k, max_new_tokens), pad, dtype=np.int64)
    running_scores = np.zeros((batch, k), dtype=np.float32)
    running_scores[:, 1:] = _NEG
    finished = running.copy()
    finished_scores = np.full((batch, k), _NEG, dtype=np.float32)
    is_finished = np.zeros((batch, k), dtype=bool)
    finished_lengths = np.zeros((batch, k), dtype=np.int64)
    improvable = np.ones(batch, dtype=bool)
    prev = None
    for i in range(max_new_tokens):
        t0 = time.perf_counter()
        logits = steps(prev)
        log_probs = _log_softmax(logits.astype(np.float32))
        steps.constrain(log_probs, i)
        vocab = log_probs.shape[-1]
        total = (log_probs.reshape(batch, k, vocab) + running_scores[:, :, None]).reshape(batch, k * vocab)
        idx = _top(total, keep)
        top_scores = np.take_along_axis(total, idx, -1)
        source, token = idx // vocab, idx % vocab
        cand = np.take_along_axis(running, source[:, :, None], 1).copy()
        cand[:, :, i] = token
        cand_lengths = np.full((batch, keep), i + 1, dtype=np.int64)
        hits = np.isin(token, eos) | (i + 1 >= max_new_tokens)

        open_scores = top_scores + hits * _NEG  # an ending candidate does not run on
        alive = _top(open_scores, k)
        running = np.take_along_axis(cand, alive[:, :, None], 1)
        running_scores = np.take_along_axis(open_scores, alive, -1).astype(np.float32)
        rows = (np.take_along_axis(source, alive, -1) + np.arange(batch)[:, None] * k).reshape(-1)

        ended = hits & first_k[None, :]
        scored = top_scores / float((i + 1) ** length_penalty)
        full = is_finished.all(-1) & (early_stopping is True)
        scored = scored + full[:, None] * _NEG + (~improvable)[:, None] * _NEG + (~ended) * _NEG
        merged_scores = np.concatenate([finished_scores, scored], 1)
        best = _top(merged_scores, k)
        finished = np.take_along_axis(np.concatenate([finished, cand], 1), best[:, :, None], 1)
        finished_scores = np.take_along_axis(merged_scores, best, -1).astype(np.float32)
        finished_lengths = np.take_along_axis(np.concatenate([finished_lengths, cand_lengths], 1), best, -1)
        is_finished = np.take_along_axis(np.concatenate([is_finished, ended], 1), best, -1)

        steps.reorder(rows)
        prev = running[:, :, i].reshape(-1)
        if times is not None:
            times.record(i, time.perf_counter() - t0, batch)
        length = max_new_tokens if (early_stopping == "never" and length_penalty > 0) else i + 1
        best_possible = running_scores[:, 0] / float(length ** length_penalty)
        worst = np.where(is_finished, finished_scores.min(-1, keepdims=True), _NEG)
        improvable &= (best_possible[:, None] > worst).any(-1)
        open_beams = not (is_finished.all() and early_stopping is True)
        if not (improvable.any() and open_beams and not hits.all()):
            break
    n = int(finished_lengths[:, 0].max())
    return finished[:, 0, :n]
