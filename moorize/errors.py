"""One exception type for everything a user can get wrong.

The CLI prints ``MoorizeError`` as a single line and exits non-zero; any other
exception is a bug and keeps its traceback.
"""


class MoorizeError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class OutOfSpaceError(MoorizeError):
    """The destination filled up; partial output has been removed."""

    exit_code = 3
