"""Entry point of ``dune-cache extract``: :func:`run_extraction` runs this process's ``--shard``/torchrun slot of the
work units (:func:`extract_features`) or, with ``--scheduler``, every unit as a task on a dask cluster
(:mod:`.cluster`), both through :mod:`.pipeline`, and turns Ctrl-C, SIGTERM and a full disk into errors that say
what was kept and how to resume.
"""
from __future__ import annotations

import signal

from ..config import ExtractConfig
from ..errors import Interrupted
from ..utils.interrupt import disk_full_error, signals_interrupt
from .pipeline import ExtractResult, extract_units, open_extraction
from .units import my_units, worker_slot


def run_extraction(cfg: ExtractConfig) -> ExtractResult:
    """Extract (or resume extracting) ``cfg.teacher`` features for ``cfg.images`` into ``cfg.out``: this process's
    ``--shard``/torchrun slot of the work units, or with ``cfg.scheduler`` every unit as a task on a dask cluster
    (:mod:`.cluster`). Ctrl-C and SIGTERM stop it within a batch or two with :class:`Interrupted`, a full disk with
    :class:`DiskFullError`: both keep every finished image, and running the same command again resumes."""
    kept = f"Every image finished before is kept in {cfg.out}."
    if cfg.scheduler is not None:  # units as tasks on a dask cluster; dask is imported only then
        from .cluster import extract_on_cluster as extract
    else:
        extract = extract_features
    try:
        with signals_interrupt():
            return extract(cfg)
    except KeyboardInterrupt as exc:
        raise Interrupted(f"extraction interrupted ({str(exc) or 'Ctrl-C'}). {kept} Re-run the same command to resume.",
                          getattr(exc, "signum", signal.SIGINT)) from exc
    except Exception as exc:
        full = disk_full_error(exc, cfg.out, kept, "re-run the same command to resume")
        if full is None:
            raise
        raise full from exc


def extract_features(cfg: ExtractConfig) -> ExtractResult:
    """:func:`run_extraction` without the handling of interruptions and full disks: this process's slot of the
    ``--shard``/torchrun work units."""
    slot, slots = worker_slot(cfg.shard)
    extraction = open_extraction(cfg, creator=slot == 0)  # only slot 0 creates (or replaces) the group (store.py)
    return extract_units(extraction, my_units(extraction.store.num_units, slot, slots), f"slot {slot}/{slots}")
