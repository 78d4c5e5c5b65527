"""The running batch's KV cache: rows join and leave between decoding steps.

Layout: left-padded. Every row's tokens end at the last column; shorter rows are
padded on the left with zero keys/values and attention-mask zeros. The export
computes positions from the mask (``cumsum - 1``) and masks padded keys out, so a
padded row decodes exactly as it would alone (the same layout ``generate`` uses for
a padded batch). A newcomer is merged by padding the shorter side on the left; when
rows leave, columns that are padding in every remaining row are trimmed, so the
cache never grows beyond the longest live row.
"""

from __future__ import annotations

import numpy as np


def left_pad(a: np.ndarray, length: int, axis: int) -> np.ndarray:
    """``a`` padded with zeros at the start of ``axis`` up to ``length``."""
    extra = length - a.shape[axis]
    if extra <= 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (extra, 0)
    return np.pad(a, widths)


class KVBatch:
    """Past keys/values [batch, heads, seq, dim] per layer and the mask [batch, seq] of the running rows."""

    def __init__(self, past: list[np.ndarray], mask: np.ndarray):
        self.past, self.mask = past, mask

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def merge(self, other: "KVBatch") -> "KVBatch":
        """This batch's rows followed by ``other``'s, both left-padded to the longer cache."""
        n = max(self.length, other.length)
        past = [np.concatenate([left_pad(a, n, 2), left_pad(b, n, 2)], 0) for a, b in zip(self.past, other.past)]
        mask = np.concatenate([left_pad(self.mask, n, 1), left_pad(other.mask, n, 1)], 0)
        return KVBatch(past, mask)

    def keep(self, rows: list[int]) -> "KVBatch | None":
        """Only ``rows`` (in that order), leading all-padding columns trimmed; None when no row is left."""
        if not rows:
            return None
        idx = np.asarray(rows, dtype=np.int64)
        mask = self.mask[idx]
        live = np.flatnonzero(mask.any(0))
        start = int(live[0]) if live.size else 0
        return KVBatch([p[idx, :, start:] for p in self.past], np.ascontiguousarray(mask[:, start:]))

    def step_mask(self) -> np.ndarray:
        """The mask of a decoding step: the cache's columns plus the one new token of every row."""
        return np.concatenate([self.mask, np.ones((self.rows, 1), dtype=np.int64)], 1)
