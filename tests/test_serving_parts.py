"""The serving parts that need no server: incremental text with stop strings, the KV batch's layout, metrics."""

from __future__ import annotations

import numpy as np
import pytest

from moorize.serving.kvbatch import KVBatch
from moorize.serving.textstream import TextStream


class ByteTokenizer:
    """A byte-level tokenizer (one token per UTF-8 byte): a token can end in the middle of a character."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def stream(text: str, stop=None) -> tuple[list[str], str]:
    ts = TextStream(ByteTokenizer(), stop)
    pieces = []
    for b in text.encode():
        pieces.append(ts.push(b))
        if ts.stopped:
            break
    pieces.append(ts.finish())
    return pieces, "".join(pieces)


def test_no_half_characters_and_nothing_lost():
    text = "héllo wörld ✓ 日本語 🎉!"
    pieces, joined = stream(text)
    assert joined == text and all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("text,stop,want", [
    ("abc STOP def", ["STOP"], "abc "),
    ("abc STO def", ["STOP"], "abc STO def"),  # a held-back prefix that did not become the stop string
    ("x ✓✓ y", ["✓✓"], "x "),  # a stop string of multi-byte characters
    ("aaXbbYcc", ["Y", "X"], "aa"),  # the earliest of several
    ("no stop here", ["zzz"], "no stop here"),
])
def test_stop_strings(text, stop, want):
    pieces, joined = stream(text, stop)
    assert joined == want
    for s in stop:
        assert s not in joined


def test_kv_batch_merge_keep_and_trim():
    def rows(lengths, fill):
        n = max(lengths)
        mask = np.array([[0] * (n - k) + [1] * k for k in lengths], dtype=np.int64)
        past = [np.where(mask[:, None, :, None] == 1, fill, 0.0) * np.ones((len(lengths), 2, n, 3))]
        return KVBatch(past, mask)

    a, b = rows([2, 4], 1.0), rows([6], 2.0)
    m = a.merge(b)
    assert m.rows == 3 and m.length == 6
    assert m.mask.tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert (m.past[0][:2, :, :2] == 0).all() and (m.past[0][2] == 2.0).all()  # left padding is zeros
    kept = m.keep([1, 0])  # the longest row left: the leading all-padding columns go
    assert kept.length == 4 and kept.mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert (kept.past[0][0] == 1.0).all()
    assert m.keep([]) is None
    assert kept.step_mask().tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]


def test_gauges_are_scrapable_before_the_first_request():
    from moorize.serving.metrics import server_metrics

    text = server_metrics().text().splitlines()
    assert "moorize_queue_length 0" in text and "moorize_running_rows 0" in text
