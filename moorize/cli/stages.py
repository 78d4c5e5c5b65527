"""Stage lines for long commands: the library's INFO progress messages, shown without ``-v``.

An export runs for minutes in a few long steps (load, trace, write, validate); the
exporter logs each one at INFO. While a command runs, this shows those messages as
``export: …`` lines on stderr, in a bar on a terminal, without turning on every other
logger's INFO output.
"""

from __future__ import annotations

import contextlib
import logging
import sys


class _StageLines(logging.Handler):
    def __init__(self, label: str, bar):
        super().__init__(logging.INFO)
        self.label, self.bar = label, bar

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{self.label}: {record.getMessage()}"
        if self.bar is not None:
            self.bar.set_description_str(text, refresh=False)
            self.bar.update(1)
        else:
            print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def stage_lines(logger_name: str, label: str):
    """Show ``logger_name``'s INFO messages as stage lines for the block (a bar on a terminal)."""
    logger = logging.getLogger(logger_name)
    if logger.isEnabledFor(logging.INFO):  # -v already prints them
        yield
        return
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(desc=label, unit=" stages", file=sys.stderr, leave=False, dynamic_ncols=True,
                   bar_format="{desc} [{elapsed}]")
    handler = _StageLines(label, bar)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        if bar is not None:
            bar.close()
