"""Stopping long jobs cleanly: SIGTERM is handled like Ctrl-C (SIGINT), and a full disk is named in one paragraph.

Both CLIs (``dune-cache extract``, ``dune-student train``) run their work inside :func:`signals_interrupt`, keep
what they finished when it raises :class:`Interrupted`, and exit with ``128 + signal number`` (130 for Ctrl-C,
143 for SIGTERM), the shells' convention.
"""
from __future__ import annotations

import contextlib
import errno
import signal
import threading
from typing import Iterator

from .location import StoreError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class Interrupted(KeyboardInterrupt):
    """The job was stopped by SIGINT or SIGTERM (``signum``); what it finished is kept."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class DiskFullError(StoreError):
    """A write was refused for lack of space or quota; what was written before is kept."""


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """While the block runs (in the main thread), SIGTERM raises :class:`Interrupted` as Ctrl-C raises
    ``KeyboardInterrupt``; the previous handler comes back afterwards. Elsewhere it does nothing (Python
    delivers signals to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        raise Interrupted("terminated (SIGTERM)", signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def disk_full_cause(exc: BaseException | None) -> OSError | None:
    """The ``ENOSPC``/``EDQUOT`` error in ``exc``'s chain of causes, if any (writer threads re-raise it wrapped)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full_message(cause: OSError, where: str, kept: str, resume: str) -> str:
    """One paragraph: which path ran out of space, what was ``kept``, and how to ``resume``."""
    path = cause.filename or where
    quota = " (disk quota exceeded)" if cause.errno == errno.EDQUOT else ""
    return (f"no space left on the device writing {path}{quota}. {kept} Free some space (or use another location), "
            f"then {resume}.")
