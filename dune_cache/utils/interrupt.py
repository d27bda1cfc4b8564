"""Stopping long jobs cleanly: SIGTERM is handled like Ctrl-C (SIGINT), and a full disk is named in one paragraph.

``dune-cache extract`` runs inside :func:`signals_interrupt` (a signal stops it at once; the batches already
computed are flushed), ``dune-student train`` records the signal and stops after the step in flight
(``dune_student.runs.control.StopSignals``); both raise :class:`Interrupted` keeping what they finished, and the
CLIs exit with ``128 + signal number`` (130 for Ctrl-C, 143 for SIGTERM), the shells' convention.
"""
from __future__ import annotations

import contextlib
import errno
import signal
import threading
from typing import Iterator

from ..errors import DiskFullError, Interrupted

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


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


def disk_full_error(exc: BaseException, where: str, kept: str, resume: str) -> DiskFullError | None:
    """When ``exc`` comes from a full disk (:func:`disk_full_cause`), the error to report instead: one paragraph
    naming the path that ran out of space (``where`` if the error names none), what was ``kept`` and how to
    ``resume``; else ``None``."""
    cause = disk_full_cause(exc)
    if cause is None:
        return None
    quota = " (disk quota exceeded)" if cause.errno == errno.EDQUOT else ""
    return DiskFullError(f"no space left on the device writing {cause.filename or where}{quota}. {kept} Free some "
                         f"space (or use another location), then {resume}.")
