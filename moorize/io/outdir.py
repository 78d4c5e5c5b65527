"""Writing an output atomically: a hidden sibling renamed into place when complete, under a lock.

Every command that writes an output (convert, merge, train, export) goes through here,
so an interrupted or failed run never leaves anything that looks complete, a full disk
cleans up after itself, no output can replace or delete one of the command's own
inputs whatever the flags, and two runs writing the same output at once are refused
(the second one, with one line) instead of silently replacing each other.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: locks fall back to exclusive creation of the lock file
    fcntl = None

from ..errors import MoorizeError, OutOfSpaceError


def partial_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.moorize-partial"


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.moorize-lock"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` for as long as a run writes it; a second run is refused.

    The lock is an advisory ``flock`` on a hidden sibling file, so it dies with its process
    (a killed run never leaves ``out`` locked); the file is removed on release.
    """
    out = Path(out)
    path = lock_path(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | (0 if fcntl else os.O_EXCL), 0o644)
        except FileExistsError:
            raise MoorizeError(_busy_message(out, path)) from None
        except OSError as e:
            raise_for_os_error(e, out)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise MoorizeError(_busy_message(out, path)) from None
        try:  # the holder before us may have unlinked the file we opened: lock the one on disk
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass  # the pid is only for the message of a refused run
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _busy_message(out: Path, lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        pid = ""
    who = f" (pid {pid})" if pid.isdigit() else ""
    return f"{out} is being written by another moorize run{who}; wait for it to finish or choose another output"


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch (or a single process): the one that locks and publishes."""
    return int(os.environ.get("RANK", "0")) == 0


def check_not_an_input(out: Path, inputs: Iterable[Path], label: str = "") -> None:
    """Refuse an output that is one of the command's input files or directories, or contains one.

    Publishing such an output would replace or delete that input, whatever ``--overwrite`` says.
    """
    out_r = Path(out).resolve()
    for src in inputs:
        src_r = Path(src).resolve()
        if out_r == src_r:
            raise MoorizeError(f"{label}{out} is one of this command's inputs; writing it would destroy it: "
                               "choose an output elsewhere")
        if out_r in src_r.parents:
            raise MoorizeError(f"{label}{out} contains this command's input {src}; writing it would delete that "
                               "input: choose an output elsewhere")


def check_out_dir(out_dir: Path, overwrite: bool, protect: Iterable[Path] = (), inputs: Iterable[Path] = ()
                  ) -> None:
    """Refuse an OUT_DIR that is, contains or lies inside a protected source, is or contains an input
    (data, adapter), or is non-empty without ``overwrite``."""
    check_not_an_input(out_dir, inputs, "OUT_DIR ")
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


def publish(tmp: Path, out_dir: Path, overwrite: bool = True) -> None:
    """Move the finished directory into place; an existing OUT_DIR is replaced only now.

    Without ``overwrite``, an OUT_DIR that something else filled while this run worked is
    refused rather than replaced (the run's own output is then removed by the caller).
    """
    if not overwrite and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MoorizeError(f"{out_dir} appeared while this run was writing it; not replaced "
                           "(pass --overwrite to replace it)")
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
def atomic_output_dir(out_dir: Path, overwrite: bool, protect: Iterable[Path] = (), inputs: Iterable[Path] = ()
                      ) -> Iterator[Path]:
    """Yield an empty hidden directory; publish it as ``out_dir`` on success, delete it on any failure.

    ``protect``: source directories OUT_DIR may not be, contain or lie inside; ``inputs``: other
    inputs (files or directories) OUT_DIR may not be or contain. OUT_DIR is locked throughout.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite, protect, inputs)
    with output_lock(out_dir):
        yield from _write_dir(out_dir, overwrite)


def _write_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    tmp = partial_dir(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)  # left over by an interrupted run
    try:
        tmp.mkdir()
        yield tmp
        publish(tmp, out_dir, overwrite)
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
    check_not_an_input(dest, protect)
    if dest.exists() and (dest.is_dir() or not overwrite):
        raise MoorizeError(f"{dest} exists" + ("" if dest.is_dir() else "; pass --overwrite to replace it"))
    for src in protect:
        if Path(src).resolve() in dest.resolve().parents:
            raise MoorizeError(f"{dest} would be written inside the source {src}; choose a path elsewhere")
    check_parent_writable(dest)
    with output_lock(dest):
        yield from _write_file(dest, overwrite)


def _write_file(dest: Path, overwrite: bool) -> Iterator[Path]:
    tmp = partial_dir(dest)
    try:
        yield tmp
        if not overwrite and dest.exists():
            raise MoorizeError(f"{dest} appeared while this run was writing it; not replaced "
                               "(pass --overwrite to replace it)")
        os.replace(tmp, dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise_for_os_error(e, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
