"""Source checkpoints: a Hugging Face directory (safetensors, sharded, guarded pickle) or a GGUF file,
opened tensor by tensor, with the fingerprint adapters and factored checkpoints record."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import MoorizeError
from ..selectors import require_name
from .safetensors import TORCH_TO_ST, SafetensorsFile, TensorInfo, TensorSource, _show

log = logging.getLogger(__name__)



class PickleFile(TensorSource):
    """A ``pytorch_model.bin`` state dict, loaded with ``weights_only=True`` (never arbitrary code)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise MoorizeError(f"cannot load {path} safely: {str(e).splitlines()[0]}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise MoorizeError(f"{path} does not hold a state dict of tensors")
        self._sd = sd

    def infos(self) -> list[TensorInfo]:
        out = []
        for n, t in self._sd.items():
            if t.dtype not in TORCH_TO_ST:
                raise MoorizeError(f"{self.path}: tensor {n!r} has unsupported dtype {t.dtype}")
            out.append(TensorInfo(n, TORCH_TO_ST[t.dtype], tuple(t.shape), t.numel() * t.element_size(), self))
        return out

    def load(self, name: str) -> torch.Tensor:
        return self._sd[name].contiguous()


@dataclass
class SourceCheckpoint:
    """An opened source model: its directory (config, tokenizer) and every tensor in it."""

    model_dir: Path
    kind: str  # "safetensors", "sharded-safetensors", "pickle", "gguf"
    sources: list[TensorSource]
    tensors: dict[str, TensorInfo]
    fingerprint: str
    original: Path  # what the user named (dir or .gguf file)

    @property
    def config_path(self) -> Path:
        return self.model_dir / "config.json"

    def close(self) -> None:
        for s in self.sources:
            s.close()


def _sha256_file(path: Path, h: "hashlib._Hash") -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)


def _fingerprint(model_dir: Path, sources: list[TensorSource], kind: str, extra: Path | None = None) -> str:
    """Identifies the source cheaply: config bytes, each file's size and safetensors header,
    and three 4 KB windows of every tensor's data.

    The header pins every tensor's name, dtype, shape and offset; the sampled data
    tells apart checkpoints of the same shapes (two fine-tunes of one base) without
    hashing gigabytes. Pickle and GGUF files have no such header and are hashed whole.
    """
    h = hashlib.sha256()
    h.update(kind.encode())
    h.update((model_dir / "config.json").read_bytes())
    if extra is not None:
        _sha256_file(extra, h)
    for s in sorted(sources, key=lambda s: s.path.name):
        h.update(s.path.name.encode())
        h.update(str(s.path.stat().st_size).encode())
        if isinstance(s, SafetensorsFile):
            h.update(s.header_bytes)
            for info in s.infos():
                h.update(s.sample_bytes(info.name))
        elif extra is None:
            _sha256_file(s.path, h)
    return "sha256:" + h.hexdigest()


def _shard_files(model_dir: Path, index_name: str) -> list[Path]:
    index_path = model_dir / index_name
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        files = sorted(set(index["weight_map"].values()))
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
        raise MoorizeError(f"{index_path} is not a valid shard index (needs a 'weight_map')") from None
    bad = [f for f in files if not isinstance(f, str) or not f or Path(f).is_absolute() or ".." in Path(f).parts]
    if bad:  # a shard is a file of this directory: no other path is read
        raise MoorizeError(f"{index_path} names an invalid shard file {_show(bad[0])}")
    missing = [f for f in files if not (model_dir / f).is_file()]
    if missing:
        raise MoorizeError(f"{index_path} names missing shard(s): {', '.join(missing)}")
    return [model_dir / f for f in files]


def check_safetensors_weights(model_dir: Path) -> None:
    """Validate the safetensors weights of a HF directory (``model.safetensors`` or the shards its index
    names) before a library that trusts them (transformers) loads the directory; no-op without them."""
    model_dir = Path(model_dir)
    if (model_dir / "model.safetensors.index.json").is_file():
        paths = _shard_files(model_dir, "model.safetensors.index.json")
    elif (model_dir / "model.safetensors").is_file():
        paths = [model_dir / "model.safetensors"]
    else:
        return
    for p in paths:
        SafetensorsFile(p).close()

def _open_dir(model_dir: Path, allow_pickle: bool, original: Path, gguf: Path | None = None) -> SourceCheckpoint:
    if not (model_dir / "config.json").is_file():
        raise MoorizeError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    sources: list[TensorSource] = []
    try:
        if (model_dir / "model.safetensors.index.json").is_file():
            kind = "sharded-safetensors"
            sources = [SafetensorsFile(p) for p in _shard_files(model_dir, "model.safetensors.index.json")]
        elif (model_dir / "model.safetensors").is_file():
            kind = "safetensors"
            sources = [SafetensorsFile(model_dir / "model.safetensors")]
        elif (model_dir / "pytorch_model.bin").is_file() or (model_dir / "pytorch_model.bin.index.json").is_file():
            if not allow_pickle:
                raise MoorizeError(
                    f"{model_dir} only has pickled weights (pytorch_model.bin); pass --allow-pickle to load them "
                    "with torch.load(weights_only=True)"
                )
            kind = "pickle"
            if (model_dir / "pytorch_model.bin.index.json").is_file():
                paths = _shard_files(model_dir, "pytorch_model.bin.index.json")
            else:
                paths = [model_dir / "pytorch_model.bin"]
            sources = [PickleFile(p) for p in paths]
        else:
            ggufs = sorted(model_dir.glob("*.gguf"))
            hint = f" (found {ggufs[0].name}: pass --gguf-file {ggufs[0].name})" if ggufs else ""
            raise MoorizeError(f"{model_dir} has no model.safetensors, shard index or pytorch_model.bin{hint}")
        tensors: dict[str, TensorInfo] = {}
        for s in sources:
            for info in s.infos():
                tensors[info.name] = info
        fp = _fingerprint(model_dir, sources, "gguf" if gguf else kind, extra=gguf)
    except BaseException:
        for s in sources:
            s.close()
        raise
    return SourceCheckpoint(model_dir, "gguf" if gguf else kind, sources, tensors, fp, original)


def dequantize_gguf(gguf_path: Path, dest: Path) -> None:
    """De-quantise a GGUF file through transformers into an ordinary HF directory at ``dest``.

    This loads the whole (small, quantised) model in memory: GGUF files are read by
    transformers as a unit. The result is float32.
    """
    try:
        import gguf  # noqa: F401  (transformers needs it; fail with our message first)
    except ImportError:
        raise MoorizeError("reading .gguf files needs the 'gguf' package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hf import quiet_progress

    src_dir, fname = gguf_path.parent, gguf_path.name
    with quiet_progress():  # moorize's own bar and summary say what happens; three of transformers' would not
        try:
            model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
        except Exception as e:
            raise MoorizeError(f"cannot de-quantise {gguf_path}: {str(e).splitlines()[0]}") from None
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(dest, safe_serialization=True)
        with contextlib.suppress(Exception):  # a GGUF without tokenizer metadata is still convertible
            AutoTokenizer.from_pretrained(src_dir, gguf_file=fname).save_pretrained(dest)


@contextlib.contextmanager
def open_checkpoint(
    path: str | os.PathLike, gguf_file: str | None = None, allow_pickle: bool = False
) -> Iterator[SourceCheckpoint]:
    """Open a HF model directory, or a .gguf file (de-quantised into a temporary directory)."""
    p = Path(path)
    if not p.exists():
        from .hub import missing_source

        raise missing_source(p)
    if not os.access(p, os.R_OK):
        raise MoorizeError(f"{p} is not readable")
    gguf_path: Path | None = None
    if p.is_file():
        if p.suffix != ".gguf":
            raise MoorizeError(f"{p} is a file; give a model directory or a .gguf file")
        gguf_path = p
    elif gguf_file:
        gguf_path = p / gguf_file
        if not gguf_path.is_file():  # refused, naming the .gguf files that are there
            require_name("--gguf-file", gguf_file, sorted(f.name for f in p.glob("*.gguf") if f.is_file()),
                         noun="GGUF file", plural=f"GGUF files in {p}")
    if gguf_path is None:
        if not p.is_dir():
            raise MoorizeError(f"{p} is not a directory")
        ckpt = _open_dir(p, allow_pickle, p)
        try:
            yield ckpt
        finally:
            ckpt.close()
        return
    with tempfile.TemporaryDirectory(prefix="moorize-gguf-") as tmp:
        log.info("de-quantising %s", gguf_path)
        dequantize_gguf(gguf_path, Path(tmp))
        ckpt = _open_dir(Path(tmp), False, gguf_path, gguf=gguf_path)
        try:
            yield ckpt
        finally:
            ckpt.close()


