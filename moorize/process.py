"""What moorize does to a process it owns (the ``moorize`` command line): give freed tensors back.

Everything moorize asks of the C allocator lives here: the mmap threshold below, and
``heap_trimmer`` for long multi-threaded runs (conversion).

glibc serves a large allocation with its own mmap and unmaps it on free, until the first such
free: then it raises its mmap threshold to that size (up to 32 MiB) and serves later tensors of
that size from its heap, which it rarely returns. A training step with gradient checkpointing
frees and reallocates every block's activations, so the resident size grows by the activations
of every block although only one block's are alive: SmolLM2-135M, batch 1 × 512, peaks at
2.41 GiB instead of 1.64 GiB (``benchmarks/scale.py``). Fixing the threshold keeps every tensor
of 128 KiB or more in its own mapping, so peak resident memory follows the live tensors.

The price is fresh pages for every large tensor: a CPU training step of SmolLM2 took 1.4-1.6× as long
for 0.64-0.75× the peak (benchmarks/README.md, "Freed activations stayed resident"). Conversion, export, loading
and serving allocate large tensors a few times and barely notice, so every command fixes the
threshold except ``moorize train``, which does only under ``--gradient-checkpointing`` (the flag
by which a user chooses memory over compute) or when ``MOORIZE_MMAP_THRESHOLD`` is set.

``MOORIZE_MMAP_THRESHOLD`` sets the threshold in bytes (0 leaves glibc's adaptive default);
a ``MALLOC_MMAP_THRESHOLD_`` already in the environment is glibc's own setting and is kept.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

DEFAULT_MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, kept instead of adapted upwards
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def return_freed_memory(threshold: int | None = None) -> bool:
    """Fix glibc's mmap threshold so freed large blocks go back to the OS; True when it was applied.

    A no-op (False) off Linux, with another C library (musl has no mallopt), with
    ``MOORIZE_MMAP_THRESHOLD=0``, or when the user set ``MALLOC_MMAP_THRESHOLD_`` themselves."""
    if threshold is None:
        raw = os.environ.get("MOORIZE_MMAP_THRESHOLD", "")
        try:
            threshold = int(raw) if raw.strip() else DEFAULT_MMAP_THRESHOLD
        except ValueError:
            threshold = DEFAULT_MMAP_THRESHOLD
    if threshold <= 0 or not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, min(threshold, 2**31 - 1)))


def return_freed_memory_for_training(memory_first: bool) -> bool:
    """``moorize train``'s policy: fix the threshold when the user chose memory over compute
    (``memory_first``) or set ``MOORIZE_MMAP_THRESHOLD``; else keep glibc's faster adaptive one."""
    if memory_first or os.environ.get("MOORIZE_MMAP_THRESHOLD", "").strip():
        return return_freed_memory()
    return False


def heap_trimmer() -> Callable[[], object]:
    """A function that hands memory freed by worker threads back to the OS (glibc's ``malloc_trim``).

    glibc keeps what worker threads free in per-thread arenas; trimming after each work item of a
    long conversion keeps resident memory flat. A no-op with another C library."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)
