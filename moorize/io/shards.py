"""Writing safetensors: ``ShardFile``, the one streaming writer (tensor by tensor, the header last, in room
reserved from the planned names), the final shard names and index, sizes such as '2GB', and small
whole-tensor files (adapters, training checkpoints). The format itself is ``safetensors``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MoorizeBug, MoorizeError
from .safetensors import TensorInfo, tensor_bytes, torch_dtypes

if TYPE_CHECKING:
    import torch


def _entry_bound(name: str) -> int:
    # {"<name>":{"dtype":"F8_E4M3","shape":[d0,d1,d2,d3],"data_offsets":[o0,o1]}, with 20-digit numbers
    return len(json.dumps(name)) + 160


class ShardFile:
    """A safetensors file written tensor by tensor, never held in memory.

    The names that may go in are known up front (the conversion plans its shards),
    so header space is reserved from them; the header is written last and padded
    with spaces, which the safetensors specification allows.
    """

    def __init__(self, path: Path, planned_names: list[str]):
        self.path = path
        # the data start 64-byte aligned (8 + header_room): memory-mapped tensors then meet the 16-byte
        # alignment of kernels such as torch._grouped_mm (transformers' fused MoE experts on torch 2.9)
        self.header_room = 64 * -(-(64 + sum(_entry_bound(n) for n in planned_names)) // 64) - 8
        self._f = open(path, "wb")
        self._f.seek(8 + self.header_room)
        self._entries: dict[str, dict] = {}
        self._offset = 0
        self.names: list[str] = []

    def add(self, name: str, st_dtype: str, shape: tuple[int, ...], buf: bytes | bytearray | memoryview) -> None:
        start = self._offset
        self._write_raw(buf)
        self._record(name, st_dtype, shape, start)

    def add_copy(self, info: "TensorInfo") -> None:
        """Copy a source tensor's bytes unchanged, streamed from its file."""
        start = self._offset
        info.source.copy_to(info.name, self._write_raw)
        if self._offset - start != info.nbytes:
            raise MoorizeError(f"{info.source.path}: {info.name!r} has {self._offset - start} bytes, "
                               f"expected {info.nbytes}")
        self._record(info.name, info.dtype, info.shape, start)

    def _write_raw(self, buf: bytes | bytearray | memoryview) -> None:
        self._f.write(buf)
        self._offset += memoryview(buf).nbytes

    def _record(self, name: str, st_dtype: str, shape: tuple[int, ...], start: int) -> None:
        self._entries[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [start, self._offset]}
        self.names.append(name)

    def add_tensor(self, name: str, t: torch.Tensor) -> None:
        torch_to_st = torch_dtypes()[1]
        if t.dtype not in torch_to_st:
            raise MoorizeError(f"cannot store {name!r}: dtype {t.dtype} is not supported by safetensors")
        self.add(name, torch_to_st[t.dtype], tuple(t.shape), tensor_bytes(t))

    def close(self) -> "ShardPart":
        """Write the header, sync, close; returns what was written (to name the shard later)."""
        header = {"__metadata__": {"format": "pt"}, **self._entries}
        hb = json.dumps(header, separators=(",", ":")).encode()
        if len(hb) > self.header_room:  # a planning bug, never user input
            raise MoorizeBug(f"header of {self.path} ({len(hb)} bytes) exceeds its reserved room")
        self._f.seek(0)
        self._f.write(struct.pack("<Q", self.header_room))
        self._f.write(hb + b" " * (self.header_room - len(hb)))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return ShardPart(self.path, list(self.names), 8 + self.header_room + self._offset)

    @property
    def closed(self) -> bool:
        return self._f.closed

    def abort(self) -> None:
        """Close without a header (the partial directory is removed by the caller)."""
        self._f.close()


@dataclass
class ShardPart:
    """One written shard before its final name is known (the count is known only at the end)."""

    path: Path
    names: list[str]
    nbytes: int


def finalize_shards(directory: Path, parts: list[ShardPart]) -> dict[str, str]:
    """Rename temporary shards to HF names and write the index; returns the weight map."""
    parts = [p for p in parts if p.names]
    n = len(parts)
    weight_map: dict[str, str] = {}
    total = 0
    for i, part in enumerate(parts):
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(part.path, directory / final)
        for name in part.names:
            weight_map[name] = final
        total += part.nbytes
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def parse_size(text: str | int) -> int:
    """'500MB' -> 500_000_000; plain integers are bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper()
    for suffix, mult in (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 10**9), ("MB", 10**6),
                         ("KB", 10**3), ("B", 1)):
        if s.endswith(suffix):
            s, m = s[: -len(suffix)], mult
            break
    else:
        m = 1
    try:
        v = int(float(s) * m)
    except (ValueError, OverflowError):  # also NaN and infinity
        raise MoorizeError(f"cannot read size {text!r} (use e.g. 500MB, 2GB)") from None
    if v <= 0:
        raise MoorizeError(f"size must be positive, got {text!r}")
    return v


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A small safetensors file of whole tensors (adapters, training checkpoints), through ``ShardFile``."""
    tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    shard = ShardFile(Path(path), list(tensors))
    for k, t in tensors.items():
        shard.add_tensor(k, t)
    shard.close()
