"""The provenance a teacher group records at creation (docs/cache-format.md, "Provenance"): teacher, checkpoint
(file, sha256, bytes), images, geometry, storage, software versions, optional views and levels sections.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import torch

from .. import __version__
from ..config import StorageConfig
from ..images.manifest import ImageManifest
from ..teachers import Teacher, TeacherSpec
from ..teachers.checkpoint_files import checkpoint_section
from ..teachers.geometry import Geometry
from ..utils.hashing import file_sha256
from ..utils.redaction import redact_url as redact


def build_provenance(spec: TeacherSpec, checkpoint: Path | None, manifest: ImageManifest, source: str,
                     geometry: Geometry, storage: StorageConfig, views: dict | None = None,
                     levels: dict | None = None, teacher: Teacher | None = None) -> dict:
    """The teacher group's ``dune_cache`` attributes (docs/cache-format.md); ``views``: the views section
    (:meth:`ViewSampling.to_json`) of a group with cached views, ``levels``: the levels section
    (:func:`levels.levels_section`) of a group with intermediate blocks, else ``None`` (no section);
    ``teacher``: the loaded teacher, whose checkpoint format and weights digest the checkpoint section then records
    (:func:`checkpoint_provenance`)."""
    import timm
    import zarr

    provenance = {
        "format_version": 1,
        "kind": "teacher_features",
        "teacher": spec.to_json(),
        "checkpoint": checkpoint_provenance(checkpoint, teacher),
        "images": {"count": len(manifest), "manifest_sha256": manifest.sha256},
        "geometry": geometry.to_json(),
        "storage": storage.to_json(),
        "arrays": {"cls": "cls", "patch": "patch", "status": "status", "manifest": "manifest",
                   "failures": "failures"},
        "software": {"dune_cache": __version__, "torch": torch.__version__, "timm": timm.__version__,
                     "zarr": zarr.__version__},
        "source": {"images": redact(source),
                   "checkpoint": redact(str(checkpoint.resolve())) if checkpoint is not None else None},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if views is not None:
        provenance["views"] = views
        provenance["arrays"]["views"] = "views"
    if levels is not None:
        provenance["levels"] = levels
        provenance["arrays"]["levels"] = "levels"
    return provenance


def checkpoint_provenance(checkpoint: Path | None, teacher: Teacher | None = None) -> dict:
    """The provenance ``checkpoint`` section: the file (or Hugging Face folder) read, the sha256 of every file, and
    with ``teacher`` (loaded from ``checkpoint``) its ``format`` and ``weights_sha256`` (:func:`checkpoint_section`)."""
    weights = teacher.checkpoint_identity() if teacher is not None and checkpoint is not None else None
    return checkpoint_section(checkpoint, file_sha256, weights)
