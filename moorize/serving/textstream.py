"""Incremental detokenisation with stop strings, for streamed and whole responses alike.

Decoding token by token breaks multi-byte characters (a byte-level BPE token can end
mid-character, which decodes to U+FFFD), and a stop string can span several tokens.
``TextStream`` decodes the whole generated sequence each time, emits only text that
is final: never a trailing replacement character, and never a tail that could still
become the start of a stop string. Both a stream and a whole response are built from
its pieces, so they are identical.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    """Feed token ids one by one; ``push`` returns the newly final text, ``finish`` the rest."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer, self.stop = tokenizer, [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned
        self.stopped = False  # a stop string was met: nothing more is emitted

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        text = self._text()
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            return self._take(text, cut)
        end = len(text)
        while end > self.emitted and text[end - 1] == REPLACEMENT:  # perhaps half a character
            end -= 1
        end = min(end, self._safe_end(text, end))
        return self._take(text, end)

    def finish(self) -> str:
        """Whatever is left once generation ended (an incomplete character stays as U+FFFD, as decode gives it)."""
        if self.stopped:
            return ""
        text = self._text()
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
        return self._take(text, len(text) if cut is None else cut)

    def _take(self, text: str, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece, self.emitted = text[self.emitted:end], end
        return piece

    def _stop_at(self, text: str) -> int | None:
        """Index where the earliest stop string starts, searching only text not yet emitted (and its overlap)."""
        hits = []
        for s in self.stop:
            i = text.find(s, max(0, self.emitted - len(s) + 1))
            if i >= 0:
                hits.append(i)
        return min(hits) if hits else None

    def _safe_end(self, text: str, end: int) -> int:
        """Hold back a tail of ``text[:end]`` that is a proper prefix of some stop string."""
        safe = end
        for s in self.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[end - k:end] == s[:k]:
                    safe = min(safe, end - k)
                    break
        return safe
