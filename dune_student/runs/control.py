"""When a training run writes checkpoints, which checkpoint it may resume, and how it stops early (how a
checkpoint is written and read: :mod:`dune_student.runs.checkpoint`).

* :class:`CheckpointSchedule`: every ``checkpoint_every`` steps, at the last step, and with
  ``checkpoint_minutes`` once that much wall time has passed since the last checkpoint.
* :func:`config_changes`, :func:`cache_changes`: what refuses a resume (another configuration, another cache).
* :class:`StopSignals`: SIGINT (Ctrl-C) and SIGTERM (a scheduler's notice) are recorded instead of killing
  the process, so the trainer finishes the step it is in, checkpoints that step and stops with
  :class:`dune_cache.utils.interrupt.Interrupted`, as ``dune-cache extract`` does. A step is never cut in half;
  loading the next batch in the trainer's process, where nothing is in flight, is abandoned at once. A second
  signal stops the run at once, but for a checkpoint being written, which is finished first.
* DataLoader workers ignore both signals (:func:`ignore_signals_in_worker`; a terminal's Ctrl-C reaches the
  whole process group) and are shut down by the trainer (:func:`shut_down_workers`), without the wait for
  dying workers that ``KeyboardInterrupt`` used to cause.
"""
from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from typing import Any, Callable, Iterator, TypeVar

from dune_cache import CacheReader, Interrupted

log = logging.getLogger(__name__)
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)
T = TypeVar("T")


class CheckpointSchedule:
    """Whether a checkpoint is due after a step: every ``every`` steps, at step ``last``, and when ``minutes`` > 0
    once that much time (``clock``, seconds) has passed since the last checkpoint (or since the start)."""

    def __init__(self, every: int, minutes: float, last: int, clock: Callable[[], float] = time.monotonic):
        self.every, self.seconds, self.last, self.clock = every, minutes * 60, last, clock
        self.saved_at = clock()

    def due(self, step: int) -> bool:
        timed_out = self.seconds > 0 and self.clock() - self.saved_at >= self.seconds
        return step % self.every == 0 or step == self.last or timed_out

    def saved(self) -> None:
        """A checkpoint was just written: the wall-time interval starts again."""
        self.saved_at = self.clock()


# ---------------------------------------------------------------------------------------
# Resume: what a checkpoint and the run resuming it must share
# ---------------------------------------------------------------------------------------
RESUME_FIELDS = (("images", "manifest_sha256"), ("images", "count"), ("checkpoint", "sha256"))
# config fields a resumed run may change, as they do not change what its steps compute (data.skip_damaged only
# decides whether damaged targets stop the run or are left out)
RESUMABLE_CHANGES = {"progress", "log_every", "checkpoint_every", "checkpoint_minutes", "eval_every",
                     "data.skip_damaged"}


def dotted_fields(config: dict, prefix: str = "") -> dict:
    """Every leaf of a config dict (``config_to_dict``) under its dotted path, e.g. ``{"data.batch_size": 128}``."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(dotted_fields(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Fields added after checkpoints were first written -> the value that does what runs did before the field existed;
# a checkpoint without the field compares as having it (so resuming one asks for that value, not a silent change).
ADDED_FIELDS = {"augment.photometric_on": "loader", "data.image_source": "auto", "data.image_decode": "loader",
                "data.jpeg_draft": "double", "heads.sak_reduction": 4, "heads.sak_scale_init": 0.0,
                "heads.sak_levels": [],
                "heads.router_pooling": "token", "heads.router_noisy_gating": True, "loss.cos_weight": None,
                "loss.smooth_l1_weight": None, "loss.cosine_over": "auto"}


# Where an input stage runs (``auto`` | ``loader`` | ``device``; ``auto``: the device when training on CUDA): two
# settings that resolve alike on this run's device are no change (a default that became ``auto`` resumes as before).
PLACEMENT_FIELDS = {"data.image_decode", "augment.photometric_on"}


def placed(value: object, on_cuda: bool) -> object:
    """A placement setting as it resolves (``auto`` -> ``device`` on CUDA, else ``loader``); other values as given."""
    return ("device" if on_cuda else "loader") if value == "auto" else value


def config_changes(saved: dict, ours: dict, on_cuda: bool = False) -> list[str]:
    """How the config of a run (``config_to_dict``) differs from the one of its checkpoint (``saved``), one line per
    field but :data:`RESUMABLE_CHANGES`; fields of :data:`ADDED_FIELDS` a checkpoint lacks have their former value,
    :data:`PLACEMENT_FIELDS` compare as they resolve on this run's device (``on_cuda``)."""
    theirs, ours = {**ADDED_FIELDS, **dotted_fields(saved)}, dotted_fields(ours)
    same = lambda k: (json.dumps(ours.get(k)) == json.dumps(theirs.get(k))  # noqa: E731
                      or (k in PLACEMENT_FIELDS and placed(ours.get(k), on_cuda) == placed(theirs.get(k), on_cuda)))
    diffs = [f"{k}: checkpoint has {theirs.get(k)!r}, this run has {ours.get(k)!r}"
             for k in sorted((set(ours) | set(theirs)) - RESUMABLE_CHANGES - {"steps"}) if not same(k)]
    if saved["steps"] != ours["steps"]:
        diffs.append(f"steps: checkpoint has {saved['steps']}, this run has {ours['steps']} "
                     "(the learning-rate schedule depends on it)")
    return diffs


def cache_changes(saved: dict, reader: CacheReader) -> list[str]:
    """How the cache ``reader`` reads differs from the one a checkpoint (``saved``: its ``teachers`` and
    per-teacher ``provenance``) was trained on: teacher groups, image manifest, teacher checkpoint or geometry.
    More or fewer done images of the same manifest are not a difference (data.allow_partial)."""
    if list(saved["teachers"]) != list(reader.teachers):
        return [f"teacher groups: the checkpoint was trained on {saved['teachers']}, the cache has {reader.teachers}"]
    changes = []
    for t in reader.teachers:
        old, new = saved["provenance"][t], reader.provenance[t]
        geometry = [("geometry", k) for k in sorted(set(old["geometry"]) | set(new["geometry"]))]
        for section, key in [*RESUME_FIELDS, *geometry]:
            if section in old:  # checkpoints of earlier versions did not keep the images section
                before, now = old[section].get(key), new[section].get(key)
                if json.dumps(before) != json.dumps(now):
                    changes.append(f"teacher {t}: {section}.{key}: the checkpoint was trained on {before!r}, "
                                   f"the cache has {now!r}")
    return changes


# ---------------------------------------------------------------------------------------
# Stopping on a signal
# ---------------------------------------------------------------------------------------
class _Abandon(BaseException):
    """Raised by the signal handler inside :meth:`StopSignals.wait` (a BaseException: library code that catches
    ``Exception`` while the trainer waits lets it through)."""


def stopped_again(signum: int) -> Interrupted:
    """What a second signal raises: the run stops at once."""
    return Interrupted(f"{signal.Signals(signum).name} again: stopped at once; the run directory keeps its last "
                       "checkpoint", signum)


class StopSignals:
    """Context manager: the first SIGINT/SIGTERM is recorded in ``received`` (its number; ``None``: none yet), for
    the trainer to stop after the current step; a second one raises :func:`stopped_again` at once, except inside
    :meth:`shielded` (a checkpoint being written), right after which it does. Outside the main thread (where
    Python installs no signal handlers) nothing is installed and ``received`` stays ``None``."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._waiting = self._shielded = False
        self._again: int | None = None  # a second signal received inside shielded()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in INTERRUPT_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
            log.warning("%s received: stopping with a checkpoint after the current step (send it again to stop at "
                        "once)", signal.Signals(signum).name)
            if self._waiting:
                raise _Abandon
        elif self._shielded:
            self._again = signum
        else:
            raise stopped_again(signum)

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """A block a second signal does not cut short (it stops the run right after the block instead)."""
        self._shielded = True
        try:
            yield
        finally:
            self._shielded = False
        if self._again is not None:
            raise stopped_again(self._again)

    def wait(self, fetch: Callable[[], T], cut_short: bool) -> T | None:
        """``fetch()``, or ``None`` when a signal came before it or, with ``cut_short``, during it (ending it at once:
        only where nothing else takes part in it, e.g. not a transfer from a DataLoader worker process)."""
        try:
            try:
                self._waiting = cut_short
                return None if self.received is not None else fetch()
            finally:
                self._waiting = False
        except _Abandon:  # also when raised in the finally clause above, before the flag was cleared
            self._waiting = False
            return None


def ignore_signals_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker ignores SIGINT and SIGTERM; the trainer decides when it stops."""
    for signum in INTERRUPT_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def shut_down_workers(batches: Iterator) -> None:
    """Stop the worker processes of a DataLoader iterator now, as its garbage collection would later (the
    single-process iterator has none)."""
    shut_down = getattr(batches, "_shutdown_workers", None)  # torch's multi-process iterator
    if shut_down is not None:
        shut_down()
