"""A run's ``checkpoint.pt``: what it holds, how it is written, read, checked and restored (docs/security.md).

A checkpoint holds only tensors and plain values (dicts, lists, numbers, strings, ``None``) plus a format marker
(:data:`RUN_FORMAT`, :data:`RUN_FORMAT_VERSION`), so every reader loads it with ``torch.load(weights_only=True)``,
which executes nothing. Runs written before the marker (format version 1) hold the same plain values and load the
same way. A file that needs more (a pickle with other objects), lacks a field, holds a field of the wrong kind,
is of another format (e.g. a teacher checkpoint) or of a newer version is a :class:`RunCheckpointError` naming the
file, what is wrong and what to do -- and a resume stops there, before anything in the run folder is written.

:class:`Checkpointer` is the trainer's side: it builds the state from the run's modules (:class:`RunModules`),
writes it atomically, reads and checks it for a resume and restores it.
"""
from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dune_cache import CheckpointError, load_state_dict_strict, weights_only_refusal

from ..errors import RunCheckpointError

log = logging.getLogger(__name__)

RUN_FORMAT = "dune-student-run"
RUN_FORMAT_VERSION = 2  # 1: runs written before the marker (same fields, no "format" key)
CONVERT_RUN = "dune-student convert-run"
# field -> the type it must have: what every reader needs (eval, export, show, route, probe)
RUN_FIELDS: dict[str, type | tuple[type, ...]] = {
    "config": dict, "step": int, "teachers": list, "resolution": int, "dims": dict, "grids": dict,
    "provenance": dict, "student": dict, "heads": dict, "standardizer": dict}
# and what a resume needs besides
RESUME_FIELDS: dict[str, type | tuple[type, ...]] = {
    "optimizer": dict, "scheduler": dict, "torch_rng": torch.Tensor, "cuda_rng": list}
RUN_KEYS = tuple(RUN_FIELDS)  # what a training checkpoint (RUN/checkpoint.pt) holds, among others


# ---------------------------------------------------------------------------------------
# Reading and checking
# ---------------------------------------------------------------------------------------
def read_run_checkpoint(path: Path, resume: bool = False) -> dict:
    """The checked contents of a run checkpoint, loaded with ``weights_only=True`` (nothing in it runs); with
    ``resume`` also the fields a resume needs. Anything else is a :class:`RunCheckpointError` saying what the file
    holds instead and what to do (:func:`load_plain`, :func:`check_run`)."""
    ckpt = load_plain(Path(path))
    check_run(ckpt, Path(path), resume)
    return ckpt


def load_plain(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; a file it refuses or cannot read is a one-line
    :class:`RunCheckpointError` (``FileNotFoundError`` passes through)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        names, reason = weights_only_refusal(exc)
        if not names:
            raise RunCheckpointError(f"{path} is not a training checkpoint: torch.load cannot read it ({reason}); "
                                     "use the run's own checkpoint.pt (or train again)") from None
        raise RunCheckpointError(
            f"{path} holds objects of type {', '.join(names)}, which no run checkpoint holds: it was not loaded "
            "(loading it would run code from the file). dune-student writes runs that load without running code, so "
            "the file was made or changed by something else; if you trust it, keep its plain contents with "
            f"`{CONVERT_RUN} {path} {path.with_name(path.stem + '.converted.pt')} --trust-this-file`") from None
    except Exception as exc:  # noqa: BLE001 - whatever torch.load makes of a file that is not a checkpoint
        raise RunCheckpointError(f"{path} is not a training checkpoint: torch.load cannot read it "
                                 f"({type(exc).__name__}: {one_line(exc)}); it is truncated, damaged or of another "
                                 "format: use the run's own checkpoint.pt (or train again)") from None


def one_line(exc: Exception) -> str:
    """The first non-empty line of ``exc``'s message."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def check_run(ckpt: Any, path: Path, resume: bool = False) -> None:
    """A :class:`RunCheckpointError` unless ``ckpt`` is a run checkpoint this version reads: a dict of another
    format or a newer version, fields missing (each named) or of the wrong type (each named with what it holds)."""
    if not isinstance(ckpt, dict):
        raise RunCheckpointError(f"{path} is not a training checkpoint (RUN/checkpoint.pt of `dune-student train`): "
                                 f"it holds a {type(ckpt).__name__}")
    check_format(ckpt, path)
    fields = {**RUN_FIELDS, **(RESUME_FIELDS if resume else {})}
    missing = [key for key in fields if key not in ckpt]
    if "format" not in ckpt and {"config", "step"} <= set(missing):  # nothing of a run: another kind of file
        raise RunCheckpointError(f"{path} is not a training checkpoint (RUN/checkpoint.pt of `dune-student train`): "
                                 f"it holds {held(ckpt)}, without {', '.join(missing)}")
    if missing:
        raise RunCheckpointError(f"{path}: this run checkpoint lacks {', '.join(missing)} (it was cut down or edited); "
                                 "use the run's own checkpoint.pt, or train again into a new --out")
    wrong = [f"{key} is a {type(ckpt[key]).__name__}, not a {type_names(kind)}" for key, kind in fields.items()
             if not is_kind(ckpt[key], kind)]
    if resume and not wrong:
        wrong = rng_problems(ckpt)
    if wrong:
        raise RunCheckpointError(f"{path}: this run checkpoint holds fields of the wrong kind ({'; '.join(wrong)}): "
                                 "it was edited or damaged; use the run's own checkpoint.pt, or train again")


def is_kind(value: Any, kind: type | tuple[type, ...]) -> bool:
    """``isinstance(value, kind)``, a bool not counting as an int."""
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def check_format(ckpt: dict, path: Path) -> None:
    """Refuse another format's marker, or a newer version of this one."""
    marker, version = ckpt.get("format", RUN_FORMAT), ckpt.get("format_version", 1)
    if marker != RUN_FORMAT:
        raise RunCheckpointError(f"{path} is not a training checkpoint: its format is {marker!r}, not {RUN_FORMAT!r}")
    if not isinstance(version, int) or version > RUN_FORMAT_VERSION:
        raise RunCheckpointError(f"{path} was written by a newer dune-student (run format version {version}; this one "
                                 f"reads up to {RUN_FORMAT_VERSION}): upgrade dune-distill to use it")


def held(ckpt: dict) -> str:
    """``a dict with keys a, b, ...`` (the first 12)."""
    return f"a dict with keys {', '.join(map(str, list(ckpt)[:12]))}"


def type_names(kind: type | tuple[type, ...]) -> str:
    """``dict``, ``dict or NoneType``."""
    return " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))


def rng_problems(ckpt: dict) -> list[str]:
    """What makes the RNG states of ``ckpt`` impossible to restore (checked before a resume writes anything)."""
    expected = torch.get_rng_state()
    problems = []
    rng = ckpt["torch_rng"]
    if rng.dtype != torch.uint8 or rng.shape != expected.shape:
        problems.append(f"torch_rng is a {rng.dtype} tensor of shape {tuple(rng.shape)}, not uint8 "
                        f"{tuple(expected.shape)}")
    if not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in ckpt["cuda_rng"]):
        problems.append("cuda_rng is not a list of uint8 tensors")
    return problems


def convert_run(source: Path, out: Path, trusted: bool) -> tuple[list[dict], list[dict]]:
    """``dune-student convert-run``: the plain contents (:func:`dune_cache.plain_copy`) of a run checkpoint that
    ``weights_only`` refuses, written to ``out`` if they make a run checkpoint. ``source`` is loaded with full
    unpickling, so only with ``trusted`` (the user vouches for it). Returns what was dropped and converted."""
    from dune_cache import plain_copy

    source, out = Path(source), Path(out)
    if not trusted:
        raise RunCheckpointError(f"convert-run loads {source} with full unpickling, which runs any code the file "
                                 "holds: only do it for a file you trust. "
                                 "To go on, run it again with --trust-this-file: "
                                 f"`{CONVERT_RUN} {source} {out} --trust-this-file`")
    if out.resolve() == source.resolve():
        raise RunCheckpointError(f"OUT {out} is the source file; choose another name")
    try:
        obj = torch.load(source, map_location="cpu", weights_only=False)  # the user vouched for it
    except Exception as exc:  # noqa: BLE001 - whatever the file is, say so in one line
        raise RunCheckpointError(f"{source}: torch.load cannot read it ({type(exc).__name__}: {one_line(exc)})") \
            from None
    plain, dropped, converted = plain_copy(obj)
    check_run(plain, source)
    Checkpointer(out).write(plain)
    return dropped, converted


# ---------------------------------------------------------------------------------------
# The trainer's side
# ---------------------------------------------------------------------------------------
@dataclass
class RunModules:
    """What a checkpoint saves and restores of a run besides plain values (``sak``: SAK's level statistics, or
    ``None``)."""

    student: nn.Module
    heads: nn.Module
    standardizer: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sak: nn.Module | None = None


class Checkpointer:
    """Writes and reads one run folder's checkpoint file (``path``)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def state(self, modules: RunModules, values: dict) -> dict:
        """The checkpoint: the format marker, ``values`` (config, step, teachers, provenance, counters...), every
        module's state and the RNG states."""
        return {
            "format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, **values,
            "student": modules.student.state_dict(), "heads": modules.heads.state_dict(),
            "standardizer": modules.standardizer.state_dict(), "optimizer": modules.optimizer.state_dict(),
            "sak_objective": modules.sak.state_dict() if modules.sak is not None else None,
            "scheduler": modules.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def write(self, state: dict) -> None:
        """``torch.save(state)`` to ``path.tmp``, flushed to disk, then renamed over ``path`` (``os.replace``): a
        crash, a signal or a full disk leaves the old checkpoint or the new one, never a mix."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, self.path)

    def read_for_resume(self) -> dict | None:
        """The checked checkpoint to resume (``None``: none yet); nothing is written."""
        return read_run_checkpoint(self.path, resume=True) if self.path.exists() else None

    def restore(self, ckpt: dict, modules: RunModules) -> None:
        """Load every module's state (a mismatch is a :class:`RunCheckpointError` naming the file and part)."""
        try:
            for name, module in (("student", modules.student), ("heads", modules.heads),
                                 ("standardizer", modules.standardizer), ("sak_objective", modules.sak)):
                if module is not None:  # SAK runs: the config check guarantees the checkpoint has its statistics
                    load_state_dict_strict(module, ckpt.get(name) or {}, f"{self.path} ({name})")
            modules.optimizer.load_state_dict(ckpt["optimizer"])
            modules.scheduler.load_state_dict(ckpt["scheduler"])
        except (CheckpointError, ValueError, KeyError, TypeError) as exc:
            raise RunCheckpointError(f"{self.path}: cannot restore the run from it ({one_line(exc)}); use the run's "
                                     "own checkpoint.pt, or train again into a new --out") from None

    @staticmethod
    def restore_rng(ckpt: dict) -> None:
        """Set the RNG states the checkpoint saved (checked by :func:`read_run_checkpoint` with ``resume``)."""
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt["cuda_rng"]:
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
