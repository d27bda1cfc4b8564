"""``dune-cache repair``: re-extract exactly the images ``dune-cache verify`` finds damaged.

Per teacher group:

1. **Find**: :func:`inspect.verify_teacher` names the damaged images (chunks that do not decode or
   hold invalid values; a failed status without failure record, or the reverse).
2. **Widen**: an object holding several images (a shard with ``--shard-images``, a ``views/boxes``
   unit chunk) is rewritten in part only if its other images still decode; if they do not, all of
   its images are repaired.
3. **Check the inputs**: the re-extraction's provenance (teacher, geometry, storage and views from
   the group's provenance; checkpoint and images from where the provenance says they were read,
   unless overridden) must equal the group's, checkpoint sha256 and manifest sha256 included.
   Otherwise nothing is written.
4. **Reset**, per work unit: the images' status back to pending, their feature chunks rewritten to
   the fill value (objects wholly covered are deleted), their failure records dropped.
5. **Re-extract**: the ordinary resume of :func:`extract.run_extraction`, which computes every
   pending image -- in a complete group exactly the reset ones.

Run it while no extraction writes to the group: both rewrite status chunks.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from tqdm.auto import tqdm
from zarr.core.sync import sync

from ..config import ExtractConfig, StorageConfig, ViewSampling
from ..errors import RepairError
from ..extract.run import run_extraction
from ..extract.provenance import build_provenance
from ..format.constants import STATUS_DONE, STATUS_FAILED, STATUS_PENDING
from ..format.levels import levels_section
from ..format.provenance import provenance_differences
from ..format.root import select_teachers
from ..format.rows import contiguous_runs
from ..format.store import TeacherStore
from ..images.manifest import ImageManifest, confined_path, load_manifest
from ..teachers import TeacherSpec, create_teacher
from ..teachers.base import read_checkpoint
from ..teachers.geometry import resolve_geometry
from ..teachers.registry import get_spec
from .verify import VerifyReport, checked_arrays, verify_teacher


@dataclass
class RepairConfig:
    """Everything ``dune-cache repair`` does; each field is one CLI flag."""

    cache: str
    teacher: str | None = None  # teacher group; None: every group of the cache
    checkpoint: Path | None = None  # default: the path recorded in provenance (source.checkpoint)
    images: Path | None = None  # default: the image source recorded in provenance (source.images)
    dry_run: bool = False
    batch_size: int = 32
    num_workers: int | None = None
    device: str = "auto"
    amp: bool = True
    progress: bool = True


@dataclass
class GroupRepair:
    """What repair finds in (and, unless a dry run, does to) one teacher group."""

    group: str
    report: VerifyReport  # verify's findings; report.damaged: image -> problems
    images: list[int]  # reset and re-extracted: the damaged images, widened to whole undecodable objects
    ids: list[str]  # image ids of ``images``
    extraction: ExtractConfig | None  # the resume that re-extracts them; None when there is nothing to do
    done: int = 0  # of ``images``, done after the repair
    failed: list[str] = field(default_factory=list)  # ids of ``images`` failed after the repair (unusable files)


# ---------------------------------------------------------------------------------------
# What to re-extract
# ---------------------------------------------------------------------------------------
def object_span(array: zarr.Array) -> int:
    """Images per stored object along the image axis: the shard's, else the chunk's."""
    return int((array.shards or array.chunks)[0])


def decodes(array: zarr.Array, rows: list[int]) -> bool:
    """Whether ``rows`` of ``array`` read back (a partial rewrite of their object must decode them)."""
    try:
        array.oindex[np.asarray(rows, dtype=np.int64)]
    except Exception:  # noqa: BLE001 - any decode failure (checksum, codec, truncation) means "no"
        return False
    return True


def widen_to_objects(store: TeacherStore, damaged: list[int]) -> list[int]:
    """Sorted ``damaged`` images plus every image sharing an object with one of them whose other images do not
    decode (such an object can only be rewritten whole)."""
    wanted = set(damaged)
    for array in checked_arrays(store).values():
        span = object_span(array)
        if span == 1:
            continue
        for lo in sorted({i - i % span for i in damaged}):
            members = range(lo, min(lo + span, store.count))
            kept = [i for i in members if i not in wanted]
            if kept and not decodes(array, kept):
                wanted.update(members)
    return sorted(wanted)


# ---------------------------------------------------------------------------------------
# How to re-extract: the group's own settings
# ---------------------------------------------------------------------------------------
def recorded_input(cfg_value: Path | None, provenance: dict, key: str, flag: str, group: str) -> Path:
    """``cfg_value``, else the path provenance ``source.<key>`` recorded; an error naming ``flag`` if neither."""
    if cfg_value is not None:
        return Path(cfg_value)
    recorded = provenance.get("source", {}).get(key)
    if not recorded:
        raise RepairError(f"{group}: the provenance does not record the {key} path; pass {flag}")
    return Path(recorded)


def extraction_config(cfg: RepairConfig, store: TeacherStore, group: str) -> ExtractConfig:
    """The extraction that recomputes ``group``'s pending images with the settings it was made with."""
    meta = store.provenance
    if meta["checkpoint"]["sha256"] == "random-weights":
        raise RepairError(f"{group}: extracted with random weights, so its features cannot be computed again; "
                          "re-extract it with --overwrite")
    checkpoint = recorded_input(cfg.checkpoint, meta, "checkpoint", "--checkpoint", group)
    if not checkpoint.exists():  # a file, or a Hugging Face folder
        raise RepairError(f"{group}: checkpoint {checkpoint} not found; pass --checkpoint "
                          f"(the group was made from {meta['checkpoint']['file']})")
    geometry = meta["geometry"]
    size = "{}x{}".format(*geometry["resolution"])
    student = geometry.get("student_patch") is not None
    views = meta.get("views")
    sampling = ViewSampling(**{k: tuple(v) if isinstance(v, list) else v for k, v in (views or {}).items()
                               if k != "count"})
    return ExtractConfig(
        teacher=meta["teacher"]["name"], images=recorded_input(cfg.images, meta, "images", "--images", group),
        out=cfg.cache, checkpoint=checkpoint, name=group, resolution=None if student else size,
        student_patch=geometry["student_patch"] if student else None,
        student_resolution="{}x{}".format(*geometry["student_resolution"]) if student else None,
        resize=geometry["resize"], batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=cfg.device,
        amp=cfg.amp, storage=StorageConfig.from_json(meta["storage"]), views=views["count"] if views else 0,
        view_sampling=sampling, blocks=store.blocks, progress=cfg.progress)


def teacher_spec(name: str, checkpoint: Path) -> TeacherSpec:
    """A registered teacher's spec; a prefix teacher (``timm:...``) has one only once built."""
    try:
        return get_spec(name)
    except KeyError:
        return create_teacher(name, checkpoint).spec


def check_confined(manifest: ImageManifest, images: Path, group: str) -> None:
    """A :class:`RepairError` when an image list named by the group's provenance (not by the user) names a file
    outside its folder: a cache's provenance does not choose which files of this machine repair reads."""
    base = manifest.base or Path(images).parent
    outside = [image_id for image_id in manifest.ids if confined_path(base, image_id) is None]
    if outside:
        raise RepairError(f"{group}: the image list its provenance names ({images}) lists {len(outside)} image(s) "
                          f"outside its folder (e.g. {outside[0]!r}: absolute, or with '..'), so nothing was changed; "
                          "repair reads such paths only from a list you give: pass --images")


def check_inputs(store: TeacherStore, extraction: ExtractConfig, group: str, images_from_provenance: bool) -> None:
    """Refuse (writing nothing) when the re-extraction would not reproduce the group: another checkpoint
    (sha256), another image list (manifest sha256), settings that no longer resolve to the recorded ones, or a
    checkpoint the safe loader refuses (it pickles objects beyond weights: docs/security.md), or
    ``images_from_provenance`` naming files outside their folder (:func:`check_confined`)."""
    spec = teacher_spec(extraction.teacher, extraction.checkpoint)
    geometry = resolve_geometry(spec, extraction.resolution, extraction.student_patch,
                                extraction.student_resolution, extraction.resize)
    manifest = load_manifest(extraction.images)
    if images_from_provenance:
        check_confined(manifest, extraction.images, group)
    views = extraction.view_sampling.to_json(extraction.views) if extraction.views else None
    levels = levels_section(tuple(extraction.blocks), (store.provenance.get("levels") or {}).get("tokens", ""))
    requested = build_provenance(spec, extraction.checkpoint, manifest, str(extraction.images), geometry,
                                 extraction.storage, views, levels)
    diffs = provenance_differences(store.provenance, requested)
    if diffs:
        raise RepairError(
            f"{extraction.out}/{group}: re-extracting with checkpoint {extraction.checkpoint} and images "
            f"{extraction.images} would not reproduce this group, so nothing was changed (give the original "
            "files with --checkpoint / --images):\n  " + "\n  ".join(diffs))
    read_checkpoint(extraction.checkpoint)  # loads safely or refuses (CheckpointError) before anything is reset


# ---------------------------------------------------------------------------------------
# Plan and apply
# ---------------------------------------------------------------------------------------
def plan_group(cfg: RepairConfig, group: str) -> GroupRepair:
    """Verify ``group`` and work out (without writing) what a repair re-extracts and with which settings."""
    store = TeacherStore.open(cfg.cache, group, mode="r")
    with tqdm(total=store.count, unit="img", desc=f"verify {group}", disable=not cfg.progress) as bar:
        report = verify_teacher(store, progress=bar.update)
    if report.inconsistent:
        raise RepairError(f"{cfg.cache}/{group}: repair re-extracts damaged images, but this group does not agree "
                          "with its own provenance:\n  " + "\n  ".join(report.inconsistent))
    if not report.damaged:
        return GroupRepair(group=group, report=report, images=[], ids=[], extraction=None)
    images = widen_to_objects(store, sorted(report.damaged))
    extraction = extraction_config(cfg, store, group)
    check_inputs(store, extraction, group, images_from_provenance=cfg.images is None)
    ids = store.manifest().ids
    return GroupRepair(group=group, report=report, images=images, ids=[ids[i] for i in images],
                       extraction=extraction)


def delete_object(array: zarr.Array, index: int) -> None:
    """Delete the stored object(s) ``index`` along the image axis (every chunk or shard of that row of the grid):
    the rows then read as the fill value, and rewriting them needs no read of the old bytes."""
    grid = [math.ceil(size / span) for size, span in zip(array.shape, array.shards or array.chunks)]
    for rest in itertools.product(*(range(n) for n in grid[1:])):
        sync((array.store_path / array.metadata.encode_chunk_key((index, *rest))).delete())


def clear_rows(store: TeacherStore, images: list[int]) -> None:
    """Stored rows of sorted ``images`` back to the fill value: objects holding only such images are deleted,
    the others rewritten in part (their remaining images decode, see :func:`widen_to_objects`)."""
    chosen = set(images)
    for array in checked_arrays(store).values():
        span = object_span(array)
        for lo in sorted({i - i % span for i in images}):
            members = range(lo, min(lo + span, store.count))
            if all(i in chosen for i in members):
                delete_object(array, lo // span)
                continue
            for start, stop, _ in contiguous_runs(np.array([i for i in members if i in chosen], dtype=np.int64)):
                array[start:stop] = array.fill_value


def reset_images(store: TeacherStore, images: list[int]) -> None:
    """Mark sorted ``images`` pending (status first, so that nothing claims data being removed), clear their
    stored rows and drop their failure records, unit by unit."""
    per = store.images_per_unit
    units = sorted({i // per for i in images})
    status = store.read_status()
    stored = store.read_failures(units, stale=True)
    status[images] = STATUS_PENDING
    for unit in units:  # the status first (records of images no longer failed are removed after it)
        of_unit = [r for r in stored if r["index"] // per == unit]
        store.commit_unit(unit, status, [r for r in of_unit if status[r["index"]] == STATUS_FAILED], of_unit)
    clear_rows(store, images)


def apply_repair(cfg: RepairConfig, plan: GroupRepair) -> None:
    """Reset the plan's images and resume the extraction, which recomputes them; record the outcome in ``plan``."""
    store = TeacherStore.open(cfg.cache, plan.group, mode="a")
    reset_images(store, plan.images)
    run_extraction(plan.extraction)
    status = store.read_status()[plan.images]
    plan.done = int((status == STATUS_DONE).sum())
    plan.failed = [image_id for image_id, s in zip(plan.ids, status) if s == STATUS_FAILED]


def repair_cache(cfg: RepairConfig) -> list[GroupRepair]:
    """Plan every group first (any refusal happens before anything is written), then repair each (unless
    ``cfg.dry_run``)."""
    groups = select_teachers(cfg.cache, [cfg.teacher] if cfg.teacher is not None else None, RepairError)
    plans = [plan_group(cfg, group) for group in groups]
    if not cfg.dry_run:
        for plan in plans:
            if plan.images:
                apply_repair(cfg, plan)
    return plans


def summary_lines(plan: GroupRepair, dry_run: bool) -> list[str]:
    """Printable report of one group's repair: each image re-extracted and why, then the outcome."""
    if not plan.images:
        return [f"[{plan.group}] nothing to repair ({plan.report.checked} images checked)"]
    widened = len(plan.images) - len(plan.report.damaged)
    lines = [f"[{plan.group}] {len(plan.report.damaged)} damaged images"
             + (f", {widened} more sharing their undecodable objects" if widened else "")]
    lines += [f"  - image {index} ({image_id}): "
              + "; ".join(plan.report.damaged.get(index, ["shares an object that does not decode"]))
              for index, image_id in zip(plan.images, plan.ids)]
    if plan.report.pending:
        lines.append(f"  {plan.report.pending} other images are pending: the re-extraction computes them too")
    if dry_run:
        lines.append(f"  dry run: would re-extract {len(plan.images)} images; nothing was written")
    else:
        lines.append(f"  repaired: {plan.done} of {len(plan.images)} images re-extracted"
                     + (f"; failed again (unusable image files): {', '.join(plan.failed)}" if plan.failed else ""))
    return lines
