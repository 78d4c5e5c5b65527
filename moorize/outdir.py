"""Writing an output directory atomically: a hidden sibling renamed into place when complete.

Every command that writes a directory (convert, merge, later train and export) goes
through here, so an interrupted or failed run never leaves anything that looks
complete, a full disk cleans up after itself, and sources are never overwritten.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from .errors import MoorizeError, OutOfSpaceError


def partial_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.moorize-partial"


def check_out_dir(out_dir: Path, overwrite: bool, protect: Iterable[Path] = ()) -> None:
    """Refuse an OUT_DIR that is, contains or lies inside a protected source, or is non-empty."""
    out_r = out_dir.resolve()
    for src in protect:
        src_r = Path(src).resolve()
        src_root = src_r if src_r.is_dir() else src_r.parent
        if out_r == src_root:
            raise MoorizeError(f"OUT_DIR {out_dir} is the source directory; choose a directory elsewhere")
        if src_root in out_r.parents:
            raise MoorizeError(f"OUT_DIR {out_dir} is inside the source {src_root}; choose a directory elsewhere")
        if out_r in src_r.parents:
            raise MoorizeError(f"the source {src} is inside OUT_DIR {out_dir}; choose a directory elsewhere")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise MoorizeError(f"OUT_DIR {out_dir} exists and is not a directory")
        try:
            non_empty = any(out_dir.iterdir())
        except OSError as e:
            raise MoorizeError(f"cannot read OUT_DIR {out_dir}: {e.strerror}") from None
        if non_empty and not overwrite:
            raise MoorizeError(f"OUT_DIR {out_dir} is not empty; pass --overwrite to replace it")
    check_parent_writable(out_dir, "OUT_DIR ")


def check_parent_writable(path: Path, label: str = "") -> None:
    """The directory ``path`` will be created in exists and may be written."""
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise MoorizeError(f"cannot write {label}{path}: {parent} is not a directory")
    if not parent.is_dir():
        raise MoorizeError(f"the parent directory of {label}{path} ({parent}) does not exist")
    if not os.access(parent, os.W_OK):
        raise MoorizeError(f"cannot write into {parent}: permission denied")


def publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished directory into place; an existing OUT_DIR is replaced only now."""
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.moorize-old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def raise_for_os_error(e: OSError, out_dir: Path) -> None:
    """Turn an OSError met while writing into the user-facing error."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise OutOfSpaceError(f"no space left on the device writing {out_dir}; partial output removed") from None
    raise MoorizeError(f"cannot write {out_dir}: {e.strerror or e}") from None


@contextlib.contextmanager
def atomic_output_dir(out_dir: Path, overwrite: bool, protect: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield an empty hidden directory; publish it as ``out_dir`` on success, delete it on any failure."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite, protect)
    tmp = partial_dir(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)  # left over by an interrupted run
    try:
        tmp.mkdir()
        yield tmp
        publish(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_for_os_error(e, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_output_file(dest: Path, overwrite: bool, protect: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a hidden sibling path to write; renamed to ``dest`` on success, deleted on any failure."""
    dest = Path(dest)
    if dest.exists() and (dest.is_dir() or not overwrite):
        raise MoorizeError(f"{dest} exists" + ("" if dest.is_dir() else "; pass --overwrite to replace it"))
    for src in protect:
        if dest.resolve() == Path(src).resolve() or Path(src).resolve() in dest.resolve().parents:
            raise MoorizeError(f"{dest} would be written inside the source {src}; choose a path elsewhere")
    check_parent_writable(dest)
    tmp = partial_dir(dest)
    try:
        yield tmp
        os.replace(tmp, dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise_for_os_error(e, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
