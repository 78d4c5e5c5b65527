"""The run directory: the output's inputs protected, the hidden ``.<output>.moorize-partial`` made or resumed,
what a failed run leaves, and the data's digests that a resumed run must match."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

from ..errors import MoorizeError
from ..io.outdir import check_not_an_input, check_out_dir, is_main_process, partial_dir, raise_for_os_error
from .checkpoints import _checkpoint_dirs
from .divergence import TrainingDiverged

log = logging.getLogger(__name__)

def as_paths(value) -> list[Path]:
    if value is None:
        return []
    return [Path(value)] if isinstance(value, (str, os.PathLike)) else [Path(v) for v in value]

def check_run_paths(output: Path, factored_dir: Path, inputs: list[Path], resume: bool, overwrite: bool) -> None:
    """Refuse, before touching anything, an output whose writing would destroy one of the run's inputs.

    Holds whatever the flags (``--overwrite``, ``--resume``): the output and its hidden run directory
    may not be, contain or lie inside the factored base, nor be or contain a data file.
    """
    if not resume:
        check_out_dir(output, overwrite, protect=[factored_dir], inputs=inputs)
    check_not_an_input(output, [factored_dir, *inputs], "OUT_DIR ")
    check_not_an_input(partial_dir(output), inputs, "the run directory ")

def prepare_run_dir(output: Path, resume: bool, overwrite: bool) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume from); called with the output locked."""
    run = partial_dir(output)
    if resume:
        if (output / "adapter_config.json").is_file() and not run.exists():
            raise MoorizeError(f"{output} is a finished run: nothing to resume")
        found = _checkpoint_dirs(run)
        if not found:
            raise MoorizeError(f"no checkpoint to resume in {run} (save them with --save-every N)")
        return run, found[-1]
    if run.exists():
        if _checkpoint_dirs(run) and not overwrite:
            raise MoorizeError(f"an interrupted run left checkpoints in {run}: pass --resume to continue it "
                               "or --overwrite to start over")
        if is_main_process():
            shutil.rmtree(run)
    return run, None

def file_digests(paths: list[Path]) -> list[str]:
    """sha256 of each file's contents: a resumed run must see the same data, wherever it now lives."""
    out = []
    for path in paths:
        h = hashlib.sha256()
        try:
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as e:
            raise MoorizeError(f"cannot read {path}: {e.strerror}") from None
        out.append(h.hexdigest())
    return out

@contextlib.contextmanager
def run_directory_guard(run: Path, output: Path) -> Iterator[None]:
    """What a failed run leaves: nothing after a full disk or a divergence; after anything else, its
    checkpoints when it has some (``--resume`` continues from them), else nothing."""
    try:
        yield
    except BaseException as e:
        out_of_space = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        keep = _checkpoint_dirs(run) and not out_of_space and not isinstance(e, TrainingDiverged)
        if is_main_process():
            if keep:
                log.warning("the run stopped; its checkpoints are kept in %s: --resume continues it", run)
            else:
                shutil.rmtree(run, ignore_errors=True)
        if isinstance(e, OSError):
            raise_for_os_error(e, output)
        raise
