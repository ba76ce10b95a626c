"""Errors a person can act on.

A `UserError` is a deterministic mistake in what was asked (a declaration, a path, a model
folder, a launch): retrying cannot fix it, so tasks never retry it, and the CLI shows it as one
line (cause + fix) with a non-zero exit and no traceback. Anything else is a crash: retried
where a retry can help, and shown with its full traceback in the log file.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user must fix; its message is one line naming the cause and the fix."""


def one_line(err: BaseException) -> str:
    """The first line of an error's message (the cause + fix line), never the engine's traceback."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
