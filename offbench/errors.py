"""User errors: mistakes a user can fix (arguments, data, files, a busy run directory).

`offbench` (offbench.cli.main) prints a UserError as one message and exits with status 2, without a
traceback (`offbench --debug ...` or OFFBENCH_DEBUG=1 shows it); every other exception is an internal
error and keeps its traceback. A UserError is a ValueError, so code that checks inputs and catches
ValueError keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix; the message says what is wrong, where, and what to do."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user has to provide or make is not there (also a FileNotFoundError)."""


def first_line(e: BaseException, limit: int = 120) -> str:
    """The first line of an exception's message (at most `limit` characters), or its type's name: the
    reason shown inside a one-line UserError about a damaged file."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
