"""Errors split by whose fault they are.

``MoorizeError`` is everything a user can get wrong (input, options, environment): the CLI
prints it as one line and exits 2 (``OutOfSpaceError``: 3). ``MoorizeBug`` is a broken
invariant inside moorize: the CLI prints one line asking for a bug report and exits 1, as
for any other unexpected exception; ``--debug`` shows the traceback.
"""


class MoorizeError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class OutOfSpaceError(MoorizeError):
    """The destination filled up; partial output has been removed."""

    exit_code = 3


class MoorizeBug(RuntimeError):
    """An internal invariant does not hold: never the user's fault, always worth a bug report."""

    exit_code = 1
