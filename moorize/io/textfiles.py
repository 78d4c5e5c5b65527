"""A user's text file, decoded as the user saw it: one reader for every data, input and JSON file moorize is given.

Spreadsheets, editors and shells write text in several ways: UTF-8 with or without a byte-order
mark (Excel's "CSV UTF-8", Notepad), UTF-16 with a mark (Excel's "Unicode Text", PowerShell's
``>``), CRLF, lone-CR (old Mac) or mixed line ends. All of these read; line ends become ``\\n``.
What cannot be read as text fails in one line that names file:line:column and what to change: a
legacy encoding (Windows-1252, Latin-1), a binary file (an Excel workbook, Parquet), NUL bytes.

Lines are split on line ends only (``\\n``, ``\\r\\n``, ``\\r``), never on the other separators
``str.splitlines`` knows (U+2028, U+2029, ``\\x0b``, ``\\x0c``, …), which are data inside a
JSON string. Reading streams in chunks: no line over ``MAX_RECORD_CHARS`` is ever held whole.
"""

from __future__ import annotations

import codecs
import itertools
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import MoorizeError

MAX_RECORD_CHARS = 16 << 20  # one line, JSON record or CSV field: far beyond any --max-length, bounded in memory
CHUNK_BYTES = 1 << 16
SNIFF_BYTES = 4096  # the first bytes, looked at for a byte-order mark, a binary format or NUL bytes

# checked longest first: a UTF-32 LE mark starts with the UTF-16 LE one
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
         (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
_CODEC_NAMES = {"utf-8": "UTF-8", "utf-16-le": "UTF-16", "utf-16-be": "UTF-16", "utf-32-le": "UTF-32",
                "utf-32-be": "UTF-32"}
# what a file starting with these bytes most likely is
_BINARY_MAGIC = ((b"PK\x03\x04", "an Excel workbook .xlsx, or another zip archive"),
                 (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an Excel 97-2003 workbook .xls"),
                 (b"PAR1", "a Parquet file"), (b"ARROW1", "an Arrow/Feather file"),
                 (b"SQLite format 3\x00", "an SQLite database"), (b"%PDF-", "a PDF document"),
                 (b"\x1f\x8b", "a gzip-compressed file"), (b"\x28\xb5\x2f\xfd", "a zstd-compressed file"),
                 (b"\xfd7zXZ\x00", "an xz-compressed file"))


def text_chunks(path: Path, save_as: str = "UTF-8 text") -> Iterator[str]:
    """The file's text in chunks, decoded (UTF-8, or UTF-8/16/32 by its byte-order mark, the mark dropped) and
    with every line end made ``\\n``; an empty file yields nothing. ``save_as`` names the format an error
    asks for ("CSV UTF-8 or JSONL")."""
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise MoorizeError(f"cannot read {path}: {e.strerror}") from None
    with fh:
        head = fh.read(max(CHUNK_BYTES, SNIFF_BYTES))
        codec, bom = _sniff(path, head, save_as)
        yield from _Decoder(path, codec, save_as).chunks(head[bom:], fh)


def split_lines(chunks: Iterable[str], path: Path) -> Iterator[str]:
    """Lines of ``\\n``-normalised text, each ending in ``\\n`` (the last perhaps not); a line over
    ``MAX_RECORD_CHARS`` characters is refused before it is held."""
    limit = MAX_RECORD_CHARS
    parts: list[str] = []
    size, lineno = 0, 1
    for text in chunks:
        start = 0
        while (end := text.find("\n", start)) >= 0:
            size += end - start
            if size > limit:
                raise _too_long(path, lineno, limit)
            parts.append(text[start:end + 1])
            yield "".join(parts)
            parts, size, lineno, start = [], 0, lineno + 1, end + 1
        size += len(text) - start
        if size > limit:
            raise _too_long(path, lineno, limit)
        parts.append(text[start:])
    if size:
        yield "".join(parts)


def text_lines(path: Path, save_as: str = "UTF-8 text") -> Iterator[str]:
    """The file's lines as the user sees them (see ``text_chunks`` and ``split_lines``)."""
    return split_lines(text_chunks(path, save_as), path)


def read_text(path: Path, save_as: str = "UTF-8 text") -> str:
    """A whole small file (a JSON document), decoded as ``text_chunks`` does, at most ``MAX_RECORD_CHARS``."""
    parts, size = [], 0
    for text in text_chunks(path, save_as):
        size += len(text)
        if size > MAX_RECORD_CHARS:
            raise MoorizeError(f"{path} is over {MAX_RECORD_CHARS >> 20} MiB characters; this file should be small")
        parts.append(text)
    return "".join(parts)


def first_char(chunks: Iterable[str]) -> tuple[str, Iterator[str]]:
    """The first non-blank character of the text ("" if none), and the text's chunks from its start."""
    chunks, seen = iter(chunks), []
    for text in chunks:
        seen.append(text)
        if stripped := text.lstrip():
            return stripped[0], itertools.chain(seen, chunks)
    return "", iter(seen)


def _too_long(path: Path, lineno: int, limit: int) -> MoorizeError:
    return MoorizeError(f"{path}:{lineno}: line longer than {limit >> 20} MiB characters; "
                        "split the example or shorten it")


def _sniff(path: Path, head: bytes, save_as: str) -> tuple[str, int]:
    """(codec, byte-order mark length) from the first bytes; a binary file is refused here."""
    for bom, codec in _BOMS:
        if head.startswith(bom):
            return codec, len(bom)
    for magic, what in _BINARY_MAGIC:
        if head.startswith(magic):
            raise MoorizeError(f"{path} looks like a binary file ({what}?), not text; save it as {save_as}")
    sample = head[:SNIFF_BYTES]
    if (nul := sample.find(b"\x00")) >= 0:
        if sample[1::2].count(0) > 0.9 * len(sample[1::2]) or sample[0::2].count(0) > 0.9 * len(sample[0::2]):
            raise MoorizeError(f"{path} looks like UTF-16 text without a byte-order mark; re-save it as UTF-8 "
                               f"({save_as})")
        line = sample.count(b"\n", 0, nul) + 1
        raise MoorizeError(f"{path} looks like a binary file (a NUL byte on line {line}), not text; "
                           f"save it as {save_as}")
    return "utf-8", 0


class _Decoder:
    """Incremental decoding and line-end normalisation, keeping the position (line, column) for messages."""

    def __init__(self, path: Path, codec: str, save_as: str):
        self.path, self.codec, self.save_as = path, codec, save_as
        self.line, self.column = 1, 1  # of the next character
        self.skip_lf = False  # the last chunk ended in "\r": a "\n" opening the next one belongs to it

    def chunks(self, head: bytes, fh) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder(self.codec)()
        data = head
        while True:
            try:
                text, bad = decoder.decode(data, final=not data), None
            except UnicodeDecodeError as e:
                text, bad = e.object[:e.start].decode(self.codec), e
            text = self._normalise(text)
            if (nul := text.find("\x00")) >= 0:
                line, column = self._at(text, nul)
                raise MoorizeError(f"{self.path}:{line}:{column}: a NUL byte: the file looks binary, not text; "
                                   f"save it as {self.save_as}")
            if bad is not None:
                raise self._undecodable(text, bad)
            self._advance(text)
            if text:
                yield text
            if not data:
                return
            data = fh.read(CHUNK_BYTES)

    def _normalise(self, text: str) -> str:
        if not text:
            return text
        if self.skip_lf and text[0] == "\n":
            text = text[1:]
        self.skip_lf = text.endswith("\r")
        return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text

    def _at(self, text: str, index: int) -> tuple[int, int]:
        """(line, column) of ``text[index]``, ``text`` starting at the current position."""
        breaks = text.count("\n", 0, index)
        if not breaks:
            return self.line, self.column + index
        return self.line + breaks, index - text.rfind("\n", 0, index)

    def _advance(self, text: str) -> None:
        self.line, self.column = self._at(text, len(text))

    def _undecodable(self, text: str, e: UnicodeDecodeError) -> MoorizeError:
        line, column = self._at(text, len(text))
        where = f"{self.path}:{line}:{column}"
        name = _CODEC_NAMES[self.codec]
        if self.codec != "utf-8":
            return MoorizeError(f"{where}: bytes {e.object[e.start:e.end].hex(' ')} are not valid {name} "
                                f"({e.reason}); re-save the file as {self.save_as}")
        byte = e.object[e.start]
        if e.reason == "unexpected end of data" and e.end - e.start > 1:
            return MoorizeError(f"{where}: the file ends inside a UTF-8 character (was it cut short?); "
                                "complete or remove its last line")
        try:
            seen = bytes([byte]).decode("cp1252")
        except UnicodeDecodeError:
            guess, iconv = "in a legacy encoding", "-f ENCODING"
        else:
            guess, iconv = f"like Windows-1252 or Latin-1 (where 0x{byte:02x} is {seen!r})", "-f cp1252"
        return MoorizeError(f"{where}: byte 0x{byte:02x} is not UTF-8; the file looks {guess}; re-save it as UTF-8 "
                            f"(Excel: Save As > 'CSV UTF-8'; editors: Save with Encoding > UTF-8; or "
                            f"iconv {iconv} -t utf-8 {self.path.name} > utf8-{self.path.name})")
