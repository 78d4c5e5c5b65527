"""JSON in files: moorize's own versioned metadata (strict) and users' JSONL / JSON-array records (lenient).

moorize's files (moorize.json, adapter_config.json, moorize_export.json) carry ``format`` and
``format_version``; readers refuse a file they do not know rather than misread it (docs/FORMAT.md,
"Versioning"). A user's records come one per line (JSONL) or, in a ``.json`` file, as one array,
the export most tools write. Both are decoded by ``textfiles`` (byte-order marks, UTF-16, CRLF).
No torch import here, so the ONNX Runtime serving path stays light.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import MoorizeError
from . import textfiles
from .textfiles import first_char, read_text, split_lines, text_chunks


def read_versioned_json(path: Path, fmt: str, version: int, what: str) -> dict:
    """One of moorize's JSON files (moorize.json, adapter_config.json, moorize_export.json), its
    ``format`` and ``format_version`` checked: readers refuse what they do not know."""
    try:
        meta = json.loads(read_text(path, save_as="UTF-8 JSON"))
    except (json.JSONDecodeError, RecursionError) as e:
        raise MoorizeError(f"{path} is unreadable: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise MoorizeError(f"{path} is not a {what}")
    if meta.get("format_version") != version:
        raise MoorizeError(f"{path} has format version {meta.get('format_version')}; this moorize reads {what} "
                           f"version {version}")
    return meta


def json_records(path: Path, save_as: str = "JSONL") -> Iterator[tuple[str, object]]:
    """(where, parsed value) of every record, ``where`` naming file:line for messages: one record per
    non-blank line (JSONL), or each item of a ``.json`` file holding one array (``where`` is then
    ``file[index] (line N)``). Invalid JSON is an error naming file:line; a record over
    ``MAX_RECORD_CHARS`` characters is refused without being held."""
    path = Path(path)
    first, chunks = first_char(text_chunks(path, save_as))
    if first == "[" and path.suffix.lower() == ".json":
        return _array_items(path, chunks)
    return _jsonl(path, chunks)


# strict=False: a raw tab (or other control character) inside a string reads as the user typed it
_DECODER = json.JSONDecoder(strict=False)
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _jsonl(path: Path, chunks: Iterable[str]) -> Iterator[tuple[str, object]]:
    for lineno, line in enumerate(split_lines(chunks, path), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", _DECODER.decode(line)
        except json.JSONDecodeError as e:
            hint = "; a file holding one JSON array must be named .json" if line.strip() == "[" else ""
            raise MoorizeError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}){hint}") from None
        except RecursionError:
            raise MoorizeError(f"{path}:{lineno}: invalid JSON (nested too deeply)") from None


def _array_items(path: Path, chunks: Iterator[str]) -> Iterator[tuple[str, object]]:
    """Each item of one JSON array, parsed as the text streams in: no item over ``MAX_RECORD_CHARS`` is held."""
    limit = textfiles.MAX_RECORD_CHARS
    buf, i, line, index = "", 0, 1, 0

    def more(at_least: int) -> bool:
        """Read at least ``at_least`` more characters (fewer at the end), dropping what is parsed."""
        nonlocal buf, i
        parts, got = [], 0
        for text in chunks:
            parts.append(text)
            got += len(text)
            if got >= at_least:
                break
        if got:
            buf, i = buf[i:] + "".join(parts), 0
        return got > 0

    def next_char() -> str:
        """The next non-blank character ("" at the end), not consumed."""
        nonlocal i, line
        while True:
            end = _WHITESPACE.match(buf, i).end()
            line += buf.count("\n", i, end)
            i = end
            if i < len(buf) or not more(textfiles.CHUNK_BYTES):
                return buf[i] if i < len(buf) else ""

    next_char()  # the "[" json_records saw
    i += 1
    if next_char() == "]":
        i += 1
    else:
        while True:
            next_char()
            while True:  # one item, reading on while the text so far ends inside it
                try:
                    value, end = _DECODER.raw_decode(buf, i)
                    if end < len(buf) or not more(textfiles.CHUNK_BYTES):
                        break
                except json.JSONDecodeError as e:
                    if len(buf) - i > limit:
                        raise MoorizeError(f"{path}:{line}: item {index} is longer than {limit >> 20} MiB "
                                           "characters; split the example or shorten it") from None
                    if not more(max(textfiles.CHUNK_BYTES, len(buf) - i)):
                        at = line + buf.count("\n", i, e.pos)
                        raise MoorizeError(f"{path}:{at}: invalid JSON ({e.msg}) in item {index} of the array") from None
                except RecursionError:
                    raise MoorizeError(f"{path}:{line}: invalid JSON (nested too deeply) in item {index}") from None
            yield f"{path}[{index}] (line {line})", value
            line += buf.count("\n", i, end)
            i, index = end, index + 1
            c = next_char()
            if c == "]":
                i += 1
                break
            if c != ",":
                what = "the file ends" if not c else f"{c!r} follows"
                raise MoorizeError(f"{path}:{line}: invalid JSON (the array is not closed: {what} after item "
                                   f"{index - 1}; expected ',' or ']')")
            i += 1
    if next_char():
        raise MoorizeError(f"{path}:{line}: invalid JSON (text after the array's closing ']')")
