"""The one base class of errors meant for the user.

A :class:`UserError` carries a complete one-line message naming the file, option or case it concerns;
the CLI prints it as ``error: <message>`` and exits with code 2. Anything else that escapes a command is
an internal error (one line with the log path; ``-v`` shows the traceback). Subclasses also derive from
the builtin that fits (``ValueError`` for bad input, ``RuntimeError`` for a failed step), so library
callers can catch either. This module imports nothing, so the CLI can use it before heavy imports.
"""
from __future__ import annotations


class UserError(Exception):
    """An error whose message tells the user what to fix (one line, exit code 2 from the CLI)."""


def one_line(exc: BaseException, *, path: object = None, limit: int = 160, root_cause: bool = False) -> str:
    """``Type: first line of the message`` (just the type for an empty message), at most ``limit`` characters
    (cut with "..."). ``root_cause`` reports the innermost ``__cause__`` instead (wrappers such as MONAI's
    "applying transform ..." hide the reader's error there); ``path`` in the message becomes its name (the
    report line around it names the file already)."""
    if root_cause:
        while exc.__cause__ is not None:
            exc = exc.__cause__
    text = str(exc).strip()
    if path is not None:
        text = text.replace(str(path), getattr(path, "name", str(path)))
    message = text.splitlines()[0].strip() if text else ""
    line = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
