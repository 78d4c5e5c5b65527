"""The safetensors codec: dtypes, strict header validation, and reading checkpoints tensor by tensor.

Why not ``safetensors.safe_open``: we need (a) the raw bytes of every tensor, so
that non-target tensors are copied byte-identical whatever their dtype, (b) plain
reads instead of a memory map, so resident memory stays bounded by what we hold and
not by how much of a 4 GB file we touched, and (c) our own validation so that a
truncated or corrupt file gives a one-line error instead of a Rust panic.

Writing is ``shards`` (the streaming shard writer, shard names, sizes).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

from ..errors import MoorizeError

log = logging.getLogger(__name__)

# bytes per element of every safetensors dtype: the header is validated with these alone (no torch import,
# so that `moorize inspect` starts light); the torch side is built on first use
ST_ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "U16": 2, "U32": 4, "U64": 8,
    "C64": 8,
}
# dtypes the format defines that no torch dtype holds byte for byte (packed 4- and 6-bit floats)
_ST_SUBBYTE = frozenset({"F4", "F6_E2M3", "F6_E3M2"})
_OPTIONAL_TORCH = (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"),
                   ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("U16", "uint16"),
                   ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64"))


@functools.lru_cache(maxsize=None)
def torch_dtypes() -> tuple[dict, dict, frozenset]:
    """(safetensors name -> torch dtype, its inverse, names this torch cannot hold), built on first use."""
    import torch

    st_to_torch = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                   "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                   "U8": torch.uint8, "BOOL": torch.bool}
    for name, attr in _OPTIONAL_TORCH:
        if hasattr(torch, attr):
            st_to_torch[name] = getattr(torch, attr)
    unsupported = frozenset(_ST_SUBBYTE | (set(ST_ITEMSIZE) - set(st_to_torch)))
    return st_to_torch, {v: k for k, v in st_to_torch.items()}, unsupported


def __getattr__(name: str):  # ST_TO_TORCH / TORCH_TO_ST for importers, without importing torch here
    if name == "ST_TO_TORCH":
        return torch_dtypes()[0]
    if name == "TORCH_TO_ST":
        return torch_dtypes()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_MAX_HEADER = 100_000_000  # bytes of JSON: the safetensors library's own limit
_U64_MAX = (1 << 64) - 1  # the library reads every number as a 64-bit usize
_I64_MAX = (1 << 63) - 1  # torch sizes are int64
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: the spelling used in reports and moorize.json."""
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, without reading it."""

    name: str
    dtype: str  # safetensors spelling, e.g. "F32"
    shape: tuple[int, ...]
    nbytes: int
    source: "TensorSource"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype_of(self.dtype)

    def load(self) -> torch.Tensor:
        return self.source.load(self.name)


class TensorSource:
    """A file holding tensors: safetensors (lazy) or a pickled state dict (eager)."""

    path: Path

    def infos(self) -> list[TensorInfo]:
        raise NotImplementedError

    def load(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def load_bytes(self, name: str) -> bytes | bytearray | memoryview:
        return tensor_bytes(self.load(name))

    def copy_to(self, name: str, write: Callable[[memoryview], object]) -> None:
        """Hand the tensor's raw bytes to ``write`` (in chunks where the source allows)."""
        write(memoryview(self.load_bytes(name)).cast("B"))

    def close(self) -> None:
        pass


def torch_dtype_of(st_dtype: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name; one line when this torch has none for it."""
    st_to_torch, _, unsupported = torch_dtypes()
    if st_dtype not in st_to_torch:
        raise MoorizeError(f"dtype {st_dtype} is {'not supported by this torch' if st_dtype in unsupported else 'unknown'}")
    return st_to_torch[st_dtype]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The little-endian row-major bytes of a tensor (no copy when contiguous on CPU)."""
    import torch

    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def bytes_to_tensor(buf: bytes | bytearray | memoryview, st_dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    import torch

    dtype = torch_dtype_of(st_dtype)
    if len(buf) == 0:
        return torch.empty(shape, dtype=dtype)
    if isinstance(buf, bytes):
        buf = bytearray(buf)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)


# ---- safetensors header validation ---------------------------------------------------------------

class _BadNumber:
    """A JSON number the format never holds (negative, fraction, exponent, >= 2**64): kept as its text."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


class _HeaderError(ValueError):
    pass


def _json_int(text: str) -> "int | _BadNumber":
    # "-0" is an integer to Python but a float to serde (the library): both refuse it as a usize
    if text.startswith("-") or len(text) > 20:
        return _BadNumber(text)
    v = int(text)
    return v if v <= _U64_MAX else _BadNumber(text)


def _json_constant(text: str):
    raise _HeaderError(f"{text} is not valid JSON")


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")  # refuses the unpaired surrogates a \ud800 escape produces
    except UnicodeEncodeError:
        return False
    return True


def _object(pairs: list) -> dict:
    out: dict = {}
    for k, v in pairs:
        if not _utf8(k):
            raise _HeaderError(f"key {_q(k)} holds an unpaired surrogate escape")
        if k in out:
            raise _HeaderError(f"duplicate key {_q(k)}")
        out[k] = v
    return out


def _one_line(text: str) -> str:
    return text if text.isprintable() else repr(text)


def _q(name: "str | None", limit: int = 120) -> str:
    """A tensor name for a one-line message: quoted, escaped, shortened."""
    r = repr(name)
    return r if len(r) <= limit else r[: limit - 5] + "...'"


def _show(value, limit: int = 80) -> str:
    """A header value as it was written, shortened, for a one-line message."""

    def show(v) -> str:
        if isinstance(v, _BadNumber):
            return v.text
        if isinstance(v, list):
            return "[" + ", ".join(show(x) for x in v[:8]) + (", ..." if len(v) > 8 else "") + "]"
        if isinstance(v, dict):
            return "{...}"
        return json.dumps(v)

    r = show(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _decode_header(raw: bytes, where: str) -> tuple[dict[str, str], dict]:
    """(metadata, tensor entries) of a header's bytes; MoorizeError for anything the format does not allow."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MoorizeError(f"{where} is corrupt: its header is not valid UTF-8 (byte {e.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_object, parse_int=_json_int, parse_float=_BadNumber,
                            parse_constant=_json_constant)
    except _HeaderError as e:
        raise MoorizeError(f"{where} is corrupt: its header is not valid: {e}") from None
    except json.JSONDecodeError as e:
        raise MoorizeError(f"{where} is corrupt: its header is not valid JSON ({e.msg} at byte {e.pos})") from None
    except (ValueError, RecursionError):
        raise MoorizeError(f"{where} is corrupt: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise MoorizeError(f"{where} is corrupt: its header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise MoorizeError(f"{where} is corrupt: __metadata__ is not an object of strings")
    for k, v in meta.items():
        if not isinstance(v, str) or not _utf8(v):
            raise MoorizeError(f"{where} is corrupt: __metadata__ value of {_q(k)} is not a string "
                               f"({_show(v)})")
    return meta, header


def _check_entry(name: str, e, where: str) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked against itself (not yet its neighbours)."""
    bad = f"{where} is corrupt: tensor {_q(name)}"
    if not isinstance(e, dict):
        raise MoorizeError(f"{bad} has a header entry that is not an object")
    missing = [f for f in _ENTRY_FIELDS if f not in e]
    if missing:
        raise MoorizeError(f"{bad} has no {', '.join(missing)} in its header entry")
    extra = [f for f in e if f not in _ENTRY_FIELDS]
    if extra:
        raise MoorizeError(f"{bad} has unexpected field(s) {', '.join(_q(f, 40) for f in extra[:3])} in its header "
                           "entry (only dtype, shape, data_offsets)")
    dt, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dt, str):
        raise MoorizeError(f"{bad} has dtype {_show(dt)}, not a dtype name")
    if dt in _ST_SUBBYTE:
        raise MoorizeError(f"{where}: tensor {_q(name)} has unsupported dtype {dt}")
    if dt not in ST_ITEMSIZE:
        raise MoorizeError(f"{bad} has unknown dtype {_q(dt, 40)}")
    if not isinstance(shape, list) or not all(type(s) is int for s in shape):
        raise MoorizeError(f"{bad} has shape {_show(shape)}: not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)):
        raise MoorizeError(f"{bad} has data_offsets {_show(offsets)}: not two non-negative integers")
    if any(s > _I64_MAX for s in shape):  # only possible beside a 0: the size check would refuse it otherwise
        raise MoorizeError(f"{bad} has shape {_show(shape)}: a dimension over 2**63 - 1 (no tensor can have it)")
    begin, end = offsets
    if begin > end:
        raise MoorizeError(f"{bad} has data_offsets [{begin}, {end}]: begin is past end")
    numel = 1
    for s in shape:  # in order, each partial product checked, as the library does
        numel *= s
        if numel > _U64_MAX:
            break
    bits = numel * ST_ITEMSIZE[dt] * 8
    if bits > _U64_MAX:
        raise MoorizeError(f"{bad} has shape {_show(shape)}: its size overflows 64 bits")
    if end - begin != bits // 8:
        raise MoorizeError(f"{bad}: shape {_show(shape)} of {dt} needs {bits // 8} bytes, its data_offsets "
                           f"[{begin}, {end}] span {end - begin}")
    return dt, tuple(shape), begin, end


class SafetensorsFile(TensorSource):
    """A validated safetensors file, read tensor by tensor with plain file reads."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise MoorizeError(f"cannot read {self.path}: {e.strerror}") from None
        try:
            self._parse_header()
        except BaseException:
            self._fh.close()
            raise

    def _parse_header(self) -> None:
        """Validate the header as strictly as the safetensors library (``SafeTensors::read_metadata``).

        Refused, like the library does: a header length over 100 MB or past the end of
        the file; a header that is not UTF-8, not one JSON object (NaN, Infinity,
        trailing characters), or whose strings hold unpaired surrogate escapes;
        ``__metadata__`` other than null or an object of string values; an entry without
        dtype, shape or data_offsets, an unknown dtype, a shape other than a list of
        integers in [0, 2**64), data_offsets other than two such integers with
        begin <= end; a byte length that is not numel * itemsize (or overflows 64
        bits); and data ranges that, sorted by offset, do not tile the data section
        exactly: starting at 0, no gap, no overlap, no missing or trailing byte. A
        dimension over 2**63 - 1 (beside a 0) is refused too: the library's header
        check lets it through, but its torch binding then fails to build the tensor.

        Refused deliberately although the library accepts them: duplicate JSON keys
        (the library keeps the last tensor of a name; other readers may keep the
        first), fields besides dtype/shape/data_offsets in an entry, and dtypes with no
        whole-byte torch dtype (F4, F6_*), which moorize cannot copy as tensors.
        """
        where = _one_line(str(self.path))
        size = os.fstat(self._fh.fileno()).st_size
        head = self._fh.read(8)
        if len(head) < 8:
            raise MoorizeError(f"{where} is not a safetensors file (truncated: {size} bytes)")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > _MAX_HEADER:
            raise MoorizeError(f"{where} is truncated or corrupt (header length {hlen} is over the "
                               f"{_MAX_HEADER}-byte limit)")
        if 8 + hlen > size:
            raise MoorizeError(f"{where} is truncated or corrupt (header length {hlen}, file size {size})")
        self.header_bytes = self._fh.read(hlen)
        if len(self.header_bytes) != hlen:
            raise MoorizeError(f"{where} is truncated: short read of its header")
        self.metadata, entries = _decode_header(self.header_bytes, where)
        self._data_start = 8 + hlen
        data_size = size - self._data_start
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in entries.items():
            self._entries[name] = _check_entry(name, e, where)
        # the byte ranges, in offset order, must tile the data section: no gap, no overlap
        expected, prev, prev_start = 0, None, 0
        for name, (_, _, start, end) in sorted(self._entries.items(), key=lambda kv: (kv[1][2], kv[1][3], kv[0])):
            if start < expected:
                raise MoorizeError(f"{where} is corrupt: tensor {_q(name)} (data bytes {start}-{end}) overlaps "
                                   f"{_q(prev)} (data bytes {prev_start}-{expected})")
            if start > expected:
                what = f"after tensor {_q(prev)}" if prev is not None else "at the start of the data"
                raise MoorizeError(f"{where} is corrupt: a gap of {start - expected} byte(s) {what} belongs to no "
                                   f"tensor ({_q(name)} starts at data byte {start})")
            expected, prev, prev_start = end, name, start
        if expected > data_size:
            raise MoorizeError(f"{where} is truncated: tensors need {expected} data bytes, the file has {data_size}")
        if expected < data_size:
            raise MoorizeError(f"{where} is corrupt: {data_size - expected} trailing byte(s) after the last tensor's "
                               "data")

    def infos(self) -> list[TensorInfo]:
        return [
            TensorInfo(n, dt, shape, end - start, self)
            for n, (dt, shape, start, end) in sorted(self._entries.items(), key=lambda kv: kv[1][2])
        ]

    def _read_into(self, buf: memoryview, offset: int, name: str) -> None:
        # pread: no shared file position, so the reader and writer threads can both use the file
        done = 0
        while done < len(buf):
            got = os.preadv(self._fh.fileno(), [buf[done:]], self._data_start + offset + done)
            if got <= 0:
                raise MoorizeError(f"{self.path} is truncated: short read for {name!r}")
            done += got

    def data_range(self, name: str) -> tuple[str, tuple[int, ...], int, int]:
        """(dtype, shape, offset in the file, length) of a tensor's bytes: for readers that map the file."""
        dt, shape, start, end = self._entries[name]
        return dt, shape, self._data_start + start, end - start

    def load_bytes(self, name: str) -> bytearray:
        _, _, start, end = self._entries[name]
        buf = bytearray(end - start)
        self._read_into(memoryview(buf), start, name)
        return buf

    def copy_to(self, name: str, write: Callable[[memoryview], object], chunk: int = 16 << 20) -> None:
        """Stream the tensor's raw bytes to ``write`` in ``chunk``-sized pieces: bounded memory."""
        _, _, start, end = self._entries[name]
        buf = memoryview(bytearray(min(chunk, end - start) or 1))
        for off in range(start, end, chunk):
            n = min(chunk, end - off)
            self._read_into(buf[:n], off, name)
            write(buf[:n])

    def sample_bytes(self, name: str, chunk: int = 4096) -> bytes:
        """Up to three ``chunk``-byte windows (start, middle, end) of a tensor's data, for fingerprints."""
        _, _, start, end = self._entries[name]
        n = end - start
        windows = [(0, n)] if n <= 3 * chunk else [(0, chunk), (n // 2 - chunk // 2, chunk), (n - chunk, chunk)]
        out = bytearray()
        for off, size in windows:
            piece = memoryview(bytearray(size))
            self._read_into(piece, start + off, name)
            out += piece
        return bytes(out)

    def load(self, name: str) -> torch.Tensor:
        dt, shape, _, _ = self._entries[name]
        return bytes_to_tensor(self.load_bytes(name), dt, shape)

    def close(self) -> None:
        self._fh.close()


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, validated like any other (``SafetensorsFile``)."""
    f = SafetensorsFile(path)
    try:
        return {info.name: f.load(info.name) for info in f.infos()}
    finally:
        f.close()
