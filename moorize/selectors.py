"""Selectors: a name or pattern a user gives to pick something must pick something.

Task names (``--task``, a row's ``"task"``, ``use_task``), layer patterns (``--targets``, ``--rank
PATTERN=POLICY``), the choices of an option (``--router``), a shipped checkpoint, a GGUF file, an execution
provider: ``require_matches`` checks each one given against what it could name and refuses the first that
names nothing, in one line saying which selector, by which flag, what it could have matched and the closest
of those::

    --targets 'qproj' matches no linear layer; linear layers are: q_proj, k_proj, ...; did you mean 'q_proj'?
    unknown task 'maths' (--task); tasks are: math, poem; did you mean 'math'?

Every selector given is checked on its own (not only their union), before the long work of a command.
Exact names are compared as they are written (case and dots count). No torch import: the CLI and the
ONNX Runtime side use it.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

from .errors import MoorizeError

SHOWN = 16  # candidates a message names; the others are counted


def listing(names: Iterable[str], limit: int = SHOWN) -> str:
    """``a, b, c``; past ``limit`` distinct names, the first ones and how many there are in all."""
    names = list(dict.fromkeys(names))
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", ... ({len(names)} in all)"


def closest(value: str, pool: Iterable[str]) -> str | None:
    """The name of ``pool`` a likely typo of it: ignoring case, the fewest edits away (a letter inserted,
    deleted, replaced, or two neighbours swapped: 'peom' -> 'poem'), at most one per four letters (at least
    one); None when no name is that close."""
    if not isinstance(value, str):
        return None
    lowered, best, best_edits = value.lower(), None, max(1, len(value) // 4) + 1
    for name in dict.fromkeys(pool):
        if name != value and abs(len(name) - len(value)) < best_edits:
            edits = _edits(lowered, name.lower())
            if edits < best_edits:
                best, best_edits = name, edits
    return best


def _edits(a: str, b: str) -> int:
    """Insertions, deletions, replacements and swaps of neighbours from ``a`` to ``b`` (optimal string alignment)."""
    before, row = None, list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for k, cb in enumerate(b, 1):
            d = min(row[k] + 1, cur[k - 1] + 1, row[k - 1] + (ca != cb))
            if before is not None and k > 1 and ca == b[k - 2] and a[i - 2] == cb:
                d = min(d, before[k - 2] + 1)
            cur.append(d)
        before, row = row, cur
    return row[-1]


def no_match(flag: str | None, value: str, noun: str, shown: Sequence[str], *, pattern: bool = False,
             pool: Iterable[str] | None = None, plural: str | None = None, where: str | None = None) -> MoorizeError:
    """The one-line error for a selector that selects nothing (``require_matches`` raises it)."""
    if pattern:
        head = f"{flag} {value!r} matches no {noun}"
    else:
        head = f"unknown {noun} {value!r}" + (f" ({flag})" if flag else "")
    plural = plural or f"{noun}s"
    text = f"{head}; {plural} are: {listing(shown)}" if shown else f"{head}; there are no {plural}"
    close = closest(value, shown if pool is None else pool)
    if close is not None:
        text += f"; did you mean {close!r}?"
    return MoorizeError(f"{where}: {text}" if where else text)


def require_matches(flag: str | None, selectors: Iterable[str], candidates: Iterable, *,
                    match: Callable[[str, object], bool] | None = None, noun: str = "name",
                    plural: str | None = None, shown: Sequence[str] | None = None,
                    pool: Iterable[str] | None = None, where: str | None = None) -> dict[str, list]:
    """Each selector's matches among ``candidates``, in their order; a selector matching none is refused.

    ``flag`` names where the selectors came from (``--targets``; a keyword for the Python API).
    ``match(selector, candidate)`` decides a match (a pattern); without it a selector is an exact name.
    ``noun`` (and ``plural``) name what the candidates are; ``shown`` lists them for the message (default:
    the candidates themselves) and ``pool`` is where a close match is looked for (default: ``shown``);
    ``where`` prefixes the message (a file and line).
    """
    candidates = list(candidates)
    out: dict[str, list] = {}
    for s in selectors:
        if match is None:
            hits = [s] if s in candidates else []
        else:
            hits = [c for c in candidates if match(s, c)]
        if not hits:
            raise no_match(flag, s, noun, [str(c) for c in candidates] if shown is None else shown,
                           pattern=match is not None, pool=pool, plural=plural, where=where)
        out[s] = hits
    return out


def require_name(flag: str | None, name: str, candidates: Iterable[str], **how) -> str:
    """``name`` when it is one of ``candidates`` (compared exactly), else the one-line error."""
    require_matches(flag, [name], candidates, **how)
    return name


__all__ = ["closest", "listing", "no_match", "require_matches", "require_name"]
