"""What every options object shares (``ConvertOptions``, ``ExportOptions``, ``TrainOptions``, ``MoOREConfig``):
built from defaults or a given object, with keyword overrides, an unknown keyword refused in one line."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import TypeVar

from .errors import MoorizeError

T = TypeVar("T")


def with_overrides(cls: type[T], options: T | None, overrides: dict, what: str) -> T:
    """``options`` (or ``cls()``'s defaults) with keyword ``overrides``, validated by ``cls`` as it is built."""
    unknown = set(overrides) - {f.name for f in fields(cls)}
    if unknown:
        raise MoorizeError(f"unknown {what} option(s): {', '.join(sorted(unknown))}")
    return cls(**{**asdict(options if options is not None else cls()), **overrides})
