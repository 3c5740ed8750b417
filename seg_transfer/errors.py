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
