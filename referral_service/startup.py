"""The error every start-up step raises when the service cannot start: its message is the one
line the operator reads (no traceback); the command exits 1."""

from __future__ import annotations


class StartupError(RuntimeError):
    """The service cannot start as configured; the message says why."""
