"""Options written once: each option of ``MoOREConfig``, ``ConvertOptions``, ``TrainOptions`` and ``ExportOptions``
is one dataclass field whose metadata (``option(...)``) holds its help, choices and range. From it come the
validation (``check_options``, one line naming the flag and the keyword), the click options of the command
(``click_options``) and so the CLI reference (``scripts/cli_reference.py``). Adding a flag is adding a field.

Also what every options object shares: built from defaults or a given object, with keyword overrides, an
unknown keyword refused in one line. No torch import: the CLI builds its options from here at start-up.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Callable, TypeVar

from .errors import MoorizeError
from .selectors import require_matches

T = TypeVar("T")


@dataclass(frozen=True)
class Option:
    """What the CLI and the validation need to know of one field (its name, type and default are the field's)."""

    help: str
    choices: tuple | None = None  # the allowed values (a list object is read when used: routers register late)
    label: str | None = None  # the word an unknown choice is called ('router mode'); default: the flag
    kind: type | None = None  # int or float: checked to be a finite number of that kind
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the lowest value itself is refused ('positive')
    high_open: bool = False  # the highest value itself is refused ([0, 1))
    flag: str | None = None  # the CLI name, when it is not --field-name
    negatable: bool = False  # a boolean shown as --x/--no-x
    multiple: bool = False  # repeatable on the CLI (a list in the API; none given: the default)
    metavar: str | None = None
    envvar: str | None = None  # the CLI also reads it from this environment variable
    cli_type: Any = None  # a click type other than the one the field's kind gives
    cli: bool = True  # False: an API-only field
    show_default: bool | str = True

    def flag_name(self, field_name: str) -> str:
        return self.flag or field_name.replace("_", "-")


def option(default=MISSING, *, default_factory=MISSING, **spec) -> Any:
    """A dataclass field with its ``Option`` (help, choices, range ...) in its metadata."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"option": Option(**spec)})


def options_of(cls) -> list[tuple[dataclasses.Field, Option]]:
    return [(f, f.metadata["option"]) for f in fields(cls) if "option" in f.metadata]


def field_default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def check_options(obj) -> None:
    """Every field of ``obj`` with an ``Option``: its choice known, its number finite, of its kind and in range;
    the first wrong one is one line naming the CLI flag and the keyword (``--batch-size``, ``batch_size``)."""
    where = type(obj).__name__
    for f, opt in options_of(type(obj)):
        value = getattr(obj, f.name)
        if value is None and f.default is None:  # an optional field left unset (a factory never gives None)
            continue
        flag = opt.flag_name(f.name)
        if opt.choices is not None:
            values = value if opt.multiple and isinstance(value, (list, tuple)) else [value]
            require_matches(f"--{flag}, {where}.{f.name}" if opt.label else f"{where}.{f.name}", map(str, values),
                            map(str, opt.choices), noun=opt.label or f"--{flag} value")
        if opt.kind in (int, float):
            check_number(flag, value, opt, f"{where}.{f.name}")


def check_number(flag: str, value, opt: Option, where: str) -> None:
    """One numeric option, or one line saying what is wrong with it."""
    kind = opt.kind
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and is_number and not isinstance(value, int):
        is_number = isinstance(value, float) and value.is_integer()
    if not is_number:
        raise MoorizeError(f"{flag} must be {'an integer' if kind is int else 'a number'}, got {value!r} ({where})")
    if not math.isfinite(value):
        raise MoorizeError(f"{flag} must be a finite number, got {value} ({where})")
    lo, hi = opt.low, opt.high
    if lo is not None and hi is not None and (opt.high_open or opt.low_open):
        span = f"{'(' if opt.low_open else '['}{lo:g}, {hi:g}{')' if opt.high_open else ']'}"
        if value < lo or value > hi or (opt.low_open and value == lo) or (opt.high_open and value == hi):
            raise MoorizeError(f"{flag} must be in {span}, got {value} ({where})")
        return
    if lo is not None and (value < lo or (opt.low_open and value == lo)):
        bound = "positive" if opt.low_open and lo == 0 else f"at least {lo:g}"
        raise MoorizeError(f"{flag} must be {bound}, got {value} ({where})")
    if hi is not None and value > hi:
        raise MoorizeError(f"{flag} must be at most {hi:g}, got {value} ({where})")


def click_options(cls, *, skip: tuple[str, ...] = (), defaults: dict | None = None) -> Callable:
    """A decorator adding a click option for every CLI field of ``cls`` (in field order), their help, choices,
    defaults and types read from the fields. ``defaults`` replaces a shown default (another class's)."""
    import click

    def decorate(command):
        for f, opt in reversed(options_of(cls)):
            if not opt.cli or f.name in skip:
                continue
            default = (defaults or {}).get(f.name, field_default(f))
            flag = "--" + opt.flag_name(f.name)
            kw: dict[str, Any] = {"help": opt.help}
            if opt.metavar:
                kw["metavar"] = opt.metavar
            if opt.envvar:
                kw.update(envvar=opt.envvar, show_envvar=True)
            if isinstance(default, bool) or f.type in ("bool", bool):
                decl = f"{flag}/--no-{flag[2:]}" if opt.negatable else flag
                kw.update(default=bool(default), show_default=opt.negatable)
                if not opt.negatable:
                    kw["is_flag"] = True
                command = click.option(decl, f.name, **kw)(command)
                continue
            if opt.multiple:
                kw["multiple"] = True
            else:
                kw["default"] = default
                kw["show_default"] = opt.show_default if default is not None else False
            if opt.cli_type is not None:
                kw["type"] = opt.cli_type
            elif opt.choices is not None:
                kw["type"] = click.Choice(opt.choices)
            elif opt.kind is not None:
                kw["type"] = opt.kind
            command = click.option(flag, f.name, **kw)(command)
        return command

    return decorate


def cli_values(cls, values: dict) -> dict:
    """The CLI's values as the API takes them: a repeatable option given no value means the field's default."""
    out = dict(values)
    for f, opt in options_of(cls):
        if opt.multiple and f.name in out:
            out[f.name] = list(out[f.name]) or field_default(f)
    return out


def with_overrides(cls: type[T], options: T | None, overrides: dict, what: str) -> T:
    """``options`` (or ``cls()``'s defaults) with keyword ``overrides``, validated by ``cls`` as it is built."""
    unknown = set(overrides) - {f.name for f in fields(cls)}
    if unknown:
        raise MoorizeError(f"unknown {what} option(s): {', '.join(sorted(unknown))}")
    base = options if options is not None else cls()
    return cls(**{**{f.name: getattr(base, f.name) for f in fields(cls)}, **overrides})


__all__ = ["Option", "asdict", "check_options", "field_default", "cli_values", "click_options", "option", "options_of",
           "with_overrides"]
