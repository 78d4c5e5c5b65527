"""Reliability: safetensors headers are validated as strictly as the safetensors library does it.

Every crafted file below is written by hand (8-byte little-endian header length, the
JSON header, the data bytes). Each must give a one-line ``MoorizeError`` naming the
file (and the tensor where there is one), never a TypeError/ValueError/OverflowError,
and the official library must refuse the same file (opening it and reading every
tensor for torch, as moorize does), which proves "as strict as".
Where moorize refuses what the library accepts, it does so on purpose (see
``SafetensorsFile._parse_header``): duplicate JSON keys, fields besides
dtype/shape/data_offsets, and dtypes with no whole-byte torch dtype (F4, F6_*).

Then: a property test over random header layouts and random byte damage, the CLI end
to end (``convert`` on a crafted source, ``inspect`` on a damaged factored
checkpoint), every other reader of safetensors files, and the refusal of integer
(quantised-storage) target weights.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import build_tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moorize.cli import cli
from moorize.errors import MoorizeError
from moorize.io.safetensors import SafetensorsFile
from moorize.io.sources import check_safetensors_weights

# the messages moorize gives where it is deliberately stricter than the library
DELIBERATE = re.compile(r"duplicate key|unexpected field|unsupported dtype")


# ---- helpers -----------------------------------------------------------------------------------

def raw_file(path: Path, header, data: bytes = b"", hlen: int | None = None) -> Path:
    """A safetensors file by hand: ``header`` is bytes, or a JSON value to serialise."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if hlen is None else hlen) + hb + data)
    return path


def T(dtype="F32", shape=(1,), offsets=(0, 4), **extra) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets), **extra}


def library_accepts(path: Path) -> tuple[bool, str]:
    """Whether the official library opens the file and reads every tensor (torch framework)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
    except Exception as e:  # SafetensorError, or what its torch binding raises
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def moorize_reads(path: Path) -> str | None:
    """None when moorize opens the file and loads every tensor; else its one-line message.

    Anything but MoorizeError propagates: that is the bug these tests exist for."""
    try:
        f = SafetensorsFile(path)
    except MoorizeError as e:
        msg = str(e)
        assert "\n" not in msg and "\r" not in msg, msg
        assert str(path) in msg, msg
        return msg
    try:
        for info in f.infos():
            t = f.load(info.name)
            assert tuple(t.shape) == info.shape
    finally:
        f.close()
    return None


def check_agreement(path: Path) -> tuple[bool, str | None]:
    """moorize is never more lenient than the library; where it is stricter, it says why (DELIBERATE)."""
    lib_ok, lib_msg = library_accepts(path)
    msg = moorize_reads(path)
    if msg is None:
        assert lib_ok, f"moorize accepted a file the library refuses ({lib_msg})"
    elif lib_ok:
        assert DELIBERATE.search(msg), f"moorize refused a file the library accepts: {msg}"
    return lib_ok, msg


# ---- crafted files: moorize and the library both refuse ----------------------------------------

F32_4 = b"\0" * 4
CRAFTED = {
    # id: (header, data, header length override or None, phrase in the message)
    "overlapping offsets": ({"a": T(offsets=(0, 4)), "b": T(offsets=(0, 4))}, F32_4, None, "overlaps 'a'"),
    "overlap inside": ({"a": T(shape=(2,), offsets=(0, 8)), "b": T(offsets=(4, 8))}, b"\0" * 8, None, "overlaps"),
    "zero-size inside another": ({"a": T(shape=(2,), offsets=(0, 8)), "z": T(shape=(0,), offsets=(4, 4))},
                                 b"\0" * 8, None, "overlaps"),
    "gap": ({"a": T(offsets=(0, 4)), "b": T(offsets=(8, 12))}, b"\0" * 12, None, "gap of 4 byte(s) after"),
    "offsets not starting at 0": ({"a": T(offsets=(4, 8))}, b"\0" * 8, None, "at the start of the data"),
    "trailing bytes": ({"a": T()}, b"\0" * 5, None, "1 trailing byte(s)"),
    "trailing bytes, no tensor": ({}, b"\0", None, "trailing byte(s)"),
    "missing bytes": ({"a": T()}, b"\0" * 3, None, "is truncated: tensors need 4 data bytes, the file has 3"),
    "negative shape": ({"a": T(shape=(-1,), offsets=(0, 0))}, b"", None, "shape [-1]"),
    "negative zero shape": (b'{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', b"", None, "shape [-0]"),
    "float shape": ({"a": T(shape=(1.0,))}, F32_4, None, "shape [1.0]"),
    "exponent shape": (b'{"a":{"dtype":"F32","shape":[1e0],"data_offsets":[0,4]}}', F32_4, None, "shape [1e0]"),
    "bool shape": ({"a": T(shape=(True,))}, F32_4, None, "shape [true]"),
    "string shape": ({"a": T(shape=("1",))}, F32_4, None, 'shape ["1"]'),
    "nested shape": ({"a": T(shape=([1],))}, F32_4, None, "shape [[1]]"),
    "shape not a list": ({"a": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}}, F32_4, None, "shape 1"),
    "shape null": ({"a": {"dtype": "F32", "shape": None, "data_offsets": [0, 4]}}, F32_4, None, "shape null"),
    "shape past u64": ({"a": T(shape=(2 ** 64,))}, F32_4, None, "not a list of non-negative integers"),
    "huge shape product": ({"a": T(shape=(2 ** 32, 2 ** 32, 2 ** 32))}, F32_4, None, "overflows 64 bits"),
    "huge shape in bits": ({"a": T(shape=(2 ** 62,))}, F32_4, None, "overflows 64 bits"),
    "dimension over 2**63 - 1 beside a zero": ({"a": T(shape=(2 ** 63, 0), offsets=(0, 0))}, b"", None,
                                               "over 2**63 - 1"),
    "overflow before a zero": ({"a": T(shape=(2 ** 40, 2 ** 40, 0), offsets=(0, 0))}, b"", None, "overflows"),
    "shape and offsets disagree": ({"a": T(shape=(2,), offsets=(0, 4))}, F32_4, None, "needs 8 bytes"),
    "string offsets": ({"a": T(offsets=("0", "4"))}, F32_4, None, "data_offsets"),
    "one offset": ({"a": T(offsets=(0,))}, F32_4, None, "data_offsets [0]"),
    "three offsets": ({"a": T(offsets=(0, 4, 4))}, F32_4, None, "data_offsets [0, 4, 4]"),
    "float offset": ({"a": T(offsets=(0, 4.0))}, F32_4, None, "data_offsets [0, 4.0]"),
    "negative offset": ({"a": T(offsets=(-4, 0))}, F32_4, None, "data_offsets [-4, 0]"),
    "offsets not a list": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": {"0": 4}}}, F32_4, None,
                           "data_offsets"),
    "begin > end": ({"a": T(shape=(0,), offsets=(4, 0))}, F32_4, None, "begin is past end"),
    "offset past u64": ({"a": T(offsets=(0, 2 ** 64))}, F32_4, None, "data_offsets"),
    "unknown dtype": ({"a": T(dtype="F33")}, F32_4, None, "unknown dtype 'F33'"),
    "lower-case dtype": ({"a": T(dtype="f32")}, F32_4, None, "unknown dtype 'f32'"),
    "dtype not a string": ({"a": T(dtype=1)}, F32_4, None, "dtype 1"),
    "missing field": ({"a": {"dtype": "F32", "shape": [1]}}, F32_4, None, "no data_offsets"),
    "entry not an object": ({"a": [1]}, b"", None, "not an object"),
    "entry null": ({"a": None}, b"", None, "not an object"),
    "header is a list": ([1, 2], b"", None, "not a JSON object"),
    "header is a string": ("x", b"", None, "not a JSON object"),
    "not JSON": (b"{not json}", b"", None, "not valid JSON"),
    "trailing comma": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},}', F32_4, None, "not valid JSON"),
    "two JSON values": (b"{}{}", b"", None, "not valid JSON"),
    "trailing NUL in the header": (b"{}\0", b"", None, "not valid JSON"),
    "UTF-8 BOM": (b"\xef\xbb\xbf{}", b"", None, "not valid JSON"),
    "NaN": (b'{"__metadata__":{"a":NaN}}', b"", None, "NaN"),
    "Infinity": (b'{"a":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,4]}}', F32_4, None, "Infinity"),
    "control character": (b'{"a\x01":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', F32_4, None,
                          "not valid JSON"),
    "deep nesting": (b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", None, "not valid JSON"),
    "non-UTF-8 header": (b'{"\xff":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', F32_4, None,
                         "not valid UTF-8"),
    "unpaired surrogate escape": (b'{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', F32_4, None,
                                  "surrogate"),
    "metadata is a list": ({"__metadata__": []}, b"", None, "__metadata__ is not an object"),
    "metadata is a string": ({"__metadata__": "x"}, b"", None, "__metadata__ is not an object"),
    "metadata int value": ({"__metadata__": {"format": 1}}, b"", None, "__metadata__ value of 'format'"),
    "metadata null value": ({"__metadata__": {"format": None}}, b"", None, "__metadata__ value of 'format'"),
    "metadata object value": ({"__metadata__": {"format": {}}}, b"", None, "__metadata__ value of 'format'"),
    "duplicate dtype field": (b'{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}', F32_4,
                              None, "duplicate key 'dtype'"),
    "duplicate __metadata__": (b'{"__metadata__":{},"__metadata__":{}}', b"", None, "duplicate key"),
    "header length 0": (b"", b"", None, "not valid JSON"),
    "header length past the file": ({"a": T()}, F32_4, 1000, "truncated or corrupt (header length 1000"),
    "header length 2**63": ({"a": T()}, F32_4, 2 ** 63, "over the 100000000-byte limit"),
    "header length over 100 MB": ({}, b"", 100_000_001, "over the 100000000-byte limit"),
    "odd number of F4 values": ({"a": T(dtype="F4", shape=(1,), offsets=(0, 1))}, b"\0", None,
                                "unsupported dtype F4"),
}


@pytest.mark.parametrize("case", list(CRAFTED), ids=list(CRAFTED))
def test_crafted_header_refused_like_the_library(tmp_path, case):
    header, data, hlen, phrase = CRAFTED[case]
    path = raw_file(tmp_path / "X.safetensors", header, data, hlen)
    lib_ok, _ = library_accepts(path)
    assert not lib_ok, "the official library accepts this file: it is not a refusal case"
    msg = moorize_reads(path)
    assert msg is not None, "moorize accepted it"
    assert phrase in msg, msg
    assert msg.startswith(str(path)), msg


@pytest.mark.parametrize("size", [0, 4, 7])
def test_shorter_than_the_length_field(tmp_path, size):
    path = tmp_path / "X.safetensors"
    path.write_bytes(b"\0" * size)
    assert not library_accepts(path)[0]
    assert "is not a safetensors file" in moorize_reads(path)


def test_messages_stay_one_line_and_short(tmp_path):
    name = "a\nb\r" * 10_000
    path = raw_file(tmp_path / "X.safetensors", {name: T(shape=(-1,))})
    msg = moorize_reads(path)
    assert "\\n" in msg and len(msg) < 400, msg
    weird = tmp_path / "new\nline"
    weird.mkdir()
    path = raw_file(weird / "X.safetensors", {"a": T(shape=(-1,))})
    with pytest.raises(MoorizeError) as e:
        SafetensorsFile(path)
    assert "\n" not in str(e.value)


# ---- well-formed files: both accept, and read the same bytes -----------------------------------

ACCEPTED = {
    "plain": ({"a": T(), "b": T(dtype="I8", shape=(2, 2), offsets=(4, 8))}, b"\1\2\3\4\5\6\7\x08"),
    "entries out of order": ({"b": T(offsets=(4, 8)), "a": T()}, b"\0" * 8),
    "scalar": ({"a": T(shape=())}, b"\0\0\x80\x3f"),
    "empty header": ({}, b""),
    "zero-size tensors share an offset": ({"a": T(shape=(0,), offsets=(0, 0)), "b": T(shape=(0, 3), offsets=(0, 0)),
                                           "c": T()}, F32_4),
    "zero-size tensor between two": ({"a": T(), "z": T(shape=(0,), offsets=(4, 4)), "b": T(offsets=(4, 8))},
                                     b"\0" * 8),
    "huge dimension beside a zero": ({"a": T(shape=(2 ** 63 - 1, 0), offsets=(0, 0)), "b": T()}, F32_4),
    "metadata null": ({"__metadata__": None, "a": T()}, F32_4),
    "metadata strings": ({"__metadata__": {"format": "pt", "x": ""}, "a": T()}, F32_4),
    "empty and unicode names": ({"": T(), "é\u2028😀": T(offsets=(4, 8))}, b"\0" * 8),
    "escaped names and pairs": (b'{"\\u0061\\ud83d\\ude00":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', F32_4),
    "whitespace around the JSON": (b' \t\r\n{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}    ', F32_4),
    "unsigned and complex": ({"a": T(dtype="U16", shape=(2,)), "b": T(dtype="U32", offsets=(4, 8)),
                              "c": T(dtype="U64", offsets=(8, 16)), "d": T(dtype="C64", offsets=(16, 24))},
                             bytes(range(24))),
    "float8 variants": ({"a": T(dtype="F8_E4M3", shape=(1,), offsets=(0, 1)),
                         "b": T(dtype="F8_E5M2", shape=(1,), offsets=(1, 2)),
                         "c": T(dtype="F8_E8M0", shape=(1,), offsets=(2, 3)),
                         "d": T(dtype="BOOL", shape=(1,), offsets=(3, 4))}, b"\x01\x02\x7f\x01"),
}


@pytest.mark.parametrize("case", list(ACCEPTED), ids=list(ACCEPTED))
def test_well_formed_files_read_like_the_library(tmp_path, case):
    header, data = ACCEPTED[case]
    path = raw_file(tmp_path / "X.safetensors", header, data)
    assert library_accepts(path) == (True, "")
    assert moorize_reads(path) is None
    f = SafetensorsFile(path)
    try:
        with safe_open(str(path), framework="pt") as lib:
            assert sorted(lib.keys()) == sorted(i.name for i in f.infos())
            for info in f.infos():
                want = lib.get_tensor(info.name)
                assert want.dtype == info.torch_dtype and tuple(want.shape) == info.shape
                assert bytes(f.load_bytes(info.name)) == want.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            assert f.metadata == (lib.metadata() or {})
    finally:
        f.close()


def test_moorize_own_shards_pass(tmp_path):
    """ShardFile pads its header with spaces: valid for both."""
    from moorize.io.shards import ShardFile

    shard = ShardFile(tmp_path / "s.safetensors", ["a", "b"])
    shard.add_tensor("a", torch.arange(6, dtype=torch.float32).reshape(2, 3))
    shard.add_tensor("b", torch.zeros(0, dtype=torch.int8))
    shard.close()
    assert check_agreement(tmp_path / "s.safetensors") == (True, None)


# ---- deliberate differences: the library accepts, moorize refuses, and says why -----------------

STRICTER = {
    "extra field in an entry": ({"a": T(extra=1)}, F32_4, "unexpected field(s) 'extra'"),
    "duplicate tensor name": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                              b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', F32_4, "duplicate key 'a'"),
    "duplicate metadata key": (b'{"__metadata__":{"k":"1","k":"2"}}', b"", "duplicate key 'k'"),
    "packed 4-bit floats": ({"a": T(dtype="F4", shape=(2,), offsets=(0, 1))}, b"\0", "unsupported dtype F4"),
}


@pytest.mark.parametrize("case", list(STRICTER), ids=list(STRICTER))
def test_deliberately_stricter_than_the_library(tmp_path, case):
    header, data, phrase = STRICTER[case]
    path = raw_file(tmp_path / "X.safetensors", header, data)
    assert library_accepts(path)[0]
    msg = moorize_reads(path)
    assert msg is not None and phrase in msg, msg
    assert DELIBERATE.search(msg)


# ---- property: random layouts and random damage ------------------------------------------------

BITS = {"F32": 32, "F16": 16, "BF16": 16, "F64": 64, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
        "BOOL": 8, "U16": 16, "U32": 32, "U64": 64, "C64": 64, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4}
ODD_VALUES = st.sampled_from([-1, -0.0, 1.0, 2.5, True, False, None, "1", [1], {}, 2 ** 64, 2 ** 63, 2 ** 40])


@st.composite
def layouts(draw):
    """(header value, data bytes, header-length delta, deliberate): mostly valid, with one or two faults."""
    names = draw(st.lists(st.text(alphabet="ab.é_\n", max_size=3), max_size=4, unique=True))
    order = draw(st.permutations(names)) if names else []
    header: dict = {}
    deliberate = False
    off = 0
    for name in order:
        dtype = draw(st.sampled_from([*BITS, "F32", "F32", "F16", "I8", "F33", "f16", 7]))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        if draw(st.integers(0, 19)) == 0:
            shape.insert(draw(st.integers(0, len(shape))), draw(ODD_VALUES))
        bits = BITS.get(dtype, 8) if isinstance(dtype, str) else 8
        numel = math.prod(s for s in shape if type(s) is int and 0 <= s < 2 ** 20)
        nbytes = -(-numel * bits // 8)
        begin, end = off, off + nbytes
        fault = draw(st.integers(0, 40))
        if fault == 0:
            begin, end = begin + draw(st.integers(-3, 3)), end + draw(st.integers(-3, 3))
        elif fault == 1:
            begin, end = end, begin
        elif fault == 2:
            end += draw(st.sampled_from([-1, 1, 4]))
        offsets = [begin, end]
        if fault == 3:
            offsets = draw(st.sampled_from([[begin], [begin, end, end], [str(begin), end], [begin, float(end)],
                                            [begin, True], "0-4", None]))
        entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if fault == 4:
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])))
        if fault == 5:
            entry["extra"] = draw(ODD_VALUES)
            deliberate = True
        if dtype == "F4":
            deliberate = True
        header[name] = entry
        off = max(off, end if isinstance(end, int) else off)
    meta = draw(st.sampled_from([None, *["absent"] * 10, {"format": "pt"}, {}, {"k": 1}, [], "x", {"k": None}]))
    if meta != "absent":
        header["__metadata__"] = meta
    data = bytes(range(256)) * (off // 256 + 1)
    data = data[: max(0, off + draw(st.sampled_from([0] * 12 + [-1, 1, 3])))]
    hlen_delta = draw(st.sampled_from([0] * 20 + [-1, 1, 8]))
    pad = draw(st.sampled_from(["", "", " ", "  \n", "\t"]))
    return header, data, hlen_delta, pad, deliberate


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=layouts())
def test_property_random_layouts(tmp_path, layout):
    """moorize accepts a random layout if and only if the library does (deliberate differences aside)."""
    header, data, hlen_delta, pad, deliberate = layout
    hb = (json.dumps(header) + pad).encode()
    path = tmp_path / "P.safetensors"
    path.write_bytes(struct.pack("<Q", max(0, len(hb) + hlen_delta)) + hb + data)
    lib_ok, msg = check_agreement(path)
    if not deliberate:
        assert (msg is None) == lib_ok, msg


def _valid_file(tensors: dict[str, tuple[str, list[int]]]) -> bytes:
    header, data, off = {"__metadata__": {"format": "pt"}}, b"", 0
    for name, (dtype, shape) in tensors.items():
        n = math.prod(shape) * BITS[dtype] // 8
        header[name] = T(dtype, shape, (off, off + n))
        data += bytes((off + i) % 251 for i in range(n))
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(hb)) + hb + data


BASE_FILES = [
    _valid_file({"a": ("F32", [2, 3]), "b": ("I8", [4]), "c": ("F16", [1])}),
    _valid_file({"layer.0.w": ("BF16", [3, 2]), "layer.1.w": ("BF16", [3, 2])}),
    _valid_file({}),
]


@st.composite
def damage(draw):
    """A valid file with a few random bytes replaced, inserted or deleted, or cut short."""
    buf = bytearray(draw(st.sampled_from(BASE_FILES)))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["replace", "replace", "replace", "insert", "delete", "truncate"]))
        hlen = struct.unpack("<Q", bytes(buf[:8]))[0] if len(buf) >= 8 else 0
        # mostly inside the length field and the header, where the parser lives
        hi = max(0, min(len(buf), 8 + hlen) - 1) if draw(st.integers(0, 3)) else max(0, len(buf) - 1)
        pos = draw(st.integers(0, hi))
        if kind == "replace" and buf:
            buf[pos] = draw(st.sampled_from([*b'{}[]",:-.0123456789eE \\', 0, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif kind == "insert":
            buf[pos:pos] = draw(st.sampled_from([b"-", b"0", b",", b"1.5", b'"x"', b"\xc3", b"]", b"}", b"\0"]))
        elif kind == "delete" and buf:
            del buf[pos]
        elif kind == "truncate":
            del buf[pos:]
    return bytes(buf)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=damage())
def test_property_random_damage(tmp_path, blob):
    """Damaged bytes: only MoorizeError, one line; never accepted where the library refuses."""
    path = tmp_path / "D.safetensors"
    path.write_bytes(blob)
    check_agreement(path)


# ---- the CLI, end to end -----------------------------------------------------------------------

def _rewrite_header(path: Path, edit) -> None:
    """Load a safetensors header, let ``edit`` change the dict, write it back over the same data."""
    buf = path.read_bytes()
    (hlen,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8:8 + hlen])
    edit(header)
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + buf[8 + hlen:])


def _overlap(header: dict) -> None:
    """Point a later tensor at the bytes of an earlier one of the same size."""
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    for i, (_, a) in enumerate(entries):
        size = a["data_offsets"][1] - a["data_offsets"][0]
        for _, b in entries[i + 1:]:
            if size and b["data_offsets"][1] - b["data_offsets"][0] == size:
                b["data_offsets"] = list(a["data_offsets"])
                return
    raise AssertionError("no two tensors of one size")


def _string_offsets(header: dict) -> None:
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [str(o) for o in header[name]["data_offsets"]]


def _negative_shape(header: dict) -> None:
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [-1, *header[name]["shape"][1:]]


CORRUPTIONS = {"overlap": (_overlap, "overlaps"), "string offsets": (_string_offsets, "data_offsets"),
               "negative shape": (_negative_shape, "shape [-1")}


def assert_one_line_error(res, *phrases: str, code: int = 2) -> str:
    both = f"--- stdout ---\n{res.stdout}\n--- stderr ---\n{res.stderr}"
    assert res.exit_code == code, both
    assert "Traceback" not in res.stdout + res.stderr and "internal error" not in res.stderr, both
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), both
    for p in phrases:
        assert p in lines[0], f"{p!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("src") / "tiny-llama"
    build_tiny("llama").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_factored(tiny_src, tmp_path_factory) -> Path:
    import moorize

    out = tmp_path_factory.mktemp("factored") / "out"
    moorize.convert(tiny_src, out)
    return out


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_cli_convert_crafted_source(tiny_src, tmp_path, how):
    edit, phrase = CORRUPTIONS[how]
    src = shutil.copytree(tiny_src, tmp_path / "model")
    _rewrite_header(src / "model.safetensors", edit)
    assert not library_accepts(src / "model.safetensors")[0]
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["convert", str(src), str(out), "--no-progress"])
    assert_one_line_error(res, "model.safetensors is corrupt", phrase)
    assert not out.exists()


def test_cli_convert_string_offsets_subprocess(tiny_src, tmp_path):
    """The original bug (TypeError, exit 1) through the real entry point."""
    src = shutil.copytree(tiny_src, tmp_path / "model")
    _rewrite_header(src / "model.safetensors", _string_offsets)
    run = subprocess.run([sys.executable, "-m", "moorize", "convert", str(src), str(tmp_path / "out"),
                          "--no-progress"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and "internal error" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "data_offsets" in lines[0], run.stderr


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_cli_inspect_damaged_factored_checkpoint(tiny_factored, tmp_path, how):
    edit, phrase = CORRUPTIONS[how]
    ckpt = shutil.copytree(tiny_factored, tmp_path / "factored")
    assert CliRunner().invoke(cli, ["inspect", str(ckpt)]).exit_code == 0
    _rewrite_header(ckpt / "model.safetensors", edit)
    res = CliRunner().invoke(cli, ["inspect", str(ckpt)])
    assert_one_line_error(res, "model.safetensors is corrupt", phrase)


# ---- every other reader goes through the same validation ---------------------------------------

def _crafted(path: Path) -> Path:
    return raw_file(path, {"a": T(offsets=("0", "4"))}, F32_4)


def test_adapter_reader(tmp_path):
    from moorize.model import adapter

    d = tmp_path / "adapter"
    d.mkdir()
    (d / adapter.CONFIG_NAME).write_text(json.dumps(
        {"format": adapter.ADAPTER_FORMAT, "format_version": adapter.ADAPTER_VERSION, "moore": {}}))
    _crafted(d / adapter.WEIGHTS_NAME)
    with pytest.raises(MoorizeError, match="adapter_model.safetensors is corrupt"):
        adapter.read_adapter(d)


def test_training_checkpoint_reader(tmp_path):
    from moorize.training.checkpoints import read_tensors  # what training checkpoints are read with

    with pytest.raises(MoorizeError, match="trainable.safetensors is corrupt"):
        read_tensors(_crafted(tmp_path / "trainable.safetensors"))


def test_factored_checkpoint_reader(tiny_factored, tmp_path):
    from moorize.io.factored import FactoredCheckpoint

    ckpt = shutil.copytree(tiny_factored, tmp_path / "factored")
    _rewrite_header(ckpt / "model.safetensors", _overlap)
    with pytest.raises(MoorizeError, match="overlaps"):
        FactoredCheckpoint(ckpt)


def test_dense_export_reader(tiny_src, tmp_path):
    """export_dense_onnx hands the directory to transformers (the library): it is validated first."""
    from moorize.exporters.onnx import export_dense_onnx

    src = shutil.copytree(tiny_src, tmp_path / "model")
    check_safetensors_weights(src)
    _rewrite_header(src / "model.safetensors", _string_offsets)
    with pytest.raises(MoorizeError, match="model.safetensors is corrupt"):
        check_safetensors_weights(src)
    with pytest.raises(MoorizeError, match="model.safetensors is corrupt"):
        export_dense_onnx(src, tmp_path / "dense")
    assert not (tmp_path / "dense").exists()


@pytest.mark.parametrize("index", [b'{"weight_map":{"a":5}}', b'{"weight_map":{"a":"../model.safetensors"}}',
                                   b'{"weight_map":{"a":"/etc/hostname"}}', b'{"weight_map":{"a":["x"]}}',
                                   b"\xff{}", b"[" * 100_000, b'{"weight_map":[]}'])
def test_shard_index_refused(tmp_path, index):
    """The index that names the shards is read as strictly: only files of the directory, one-line errors."""
    (tmp_path / "model.safetensors.index.json").write_bytes(index)
    with pytest.raises(MoorizeError, match="model.safetensors.index.json") as e:
        check_safetensors_weights(tmp_path)
    assert "\n" not in str(e.value)


def test_onnx_reference_reader_uses_the_validated_file():
    """exporters/onnx.py maps factored shards "by reference" only through SafetensorsFile.data_range."""
    import inspect as pyinspect

    from moorize.exporters import onnx as onnx_exporter

    src = pyinspect.getsource(onnx_exporter)
    assert "SafetensorsFile(" in src and "data_range(" in src
    assert "struct.unpack" not in src and "safe_open" not in src


# ---- integer-dtype targets are refused --------------------------------------------------------

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def _quantise(src: Path, key: str, dtype: torch.dtype) -> None:
    path = src / "model.safetensors"
    tensors = load_file(path)
    w = tensors[key]
    info = torch.iinfo(dtype) if dtype != torch.bool else None
    tensors[key] = (w > 0) if info is None else torch.randint(info.min, info.max, w.shape, dtype=dtype)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.bool], ids=["int8", "uint8", "bool"])
def test_integer_default_target_refused(tiny_src, tmp_path, dtype):
    src = shutil.copytree(tiny_src, tmp_path / "model")
    _quantise(src, Q_PROJ, dtype)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["convert", str(src), str(out), "--no-progress"])
    name = str(dtype).replace("torch.", "")
    assert_one_line_error(res, Q_PROJ, f"stored as {name}", "de-quantise", "a default target")
    assert not out.exists()


def test_integer_explicit_target_refused(tiny_src, tmp_path):
    src = shutil.copytree(tiny_src, tmp_path / "model")
    _quantise(src, Q_PROJ, torch.int8)
    _quantise(src, "model.layers.1.self_attn.q_proj.weight", torch.int8)
    res = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "out"), "--no-progress",
                                   "--targets", "q_proj"])
    assert_one_line_error(res, Q_PROJ, "stored as int8", "selected by --targets", "and 1 more", "de-quantise")


def test_integer_weight_outside_the_targets_is_copied(tiny_src, tmp_path):
    """Leaving the quantised layer out works: its bytes go through unchanged."""
    src = shutil.copytree(tiny_src, tmp_path / "model")
    _quantise(src, Q_PROJ, torch.int8)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["convert", str(src), str(out), "--no-progress", "--targets", "mlp.*"])
    assert res.exit_code == 0, res.stdout + res.stderr
    f, g = SafetensorsFile(src / "model.safetensors"), SafetensorsFile(out / "model.safetensors")
    try:
        assert g.data_range(Q_PROJ)[0] == "I8"
        assert g.load_bytes(Q_PROJ) == f.load_bytes(Q_PROJ)
    finally:
        f.close()
        g.close()
