"""The base class of errors a user can act on.

The CLI prints such an error as one line and exits 2 (no traceback): the message
itself must say what went wrong and what to do about it. Anything else that
escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class MemstreamError(Exception):
    """An error whose message tells the user what to do; the CLI prints it alone."""
