"""``dune-cache extract``: run one teacher over an image manifest into a teacher group of a cache.

Pipeline: DataLoader workers decode and resize images (and cut ``--views K`` random views of each,
dune_cache/images/views.py) -> batched ``inference_mode`` forward of the images and their views (bf16 autocast on
CUDA; with ``--blocks``, the chosen blocks' outputs too, dune_cache/format/levels.py) -> finite / fp16-range check
-> a writer thread stores features and then marks the images done. Work is split in units (one ``status`` chunk, or
one shard, each) that are dealt round-robin over ``torchrun`` ranks and ``--shard i/n`` machines, or run as tasks on
a dask cluster (``--scheduler``), each through :func:`open_extraction` and :func:`extract_units` (:mod:`.run`
chooses); re-running resumes.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import ExtractConfig, StorageConfig
from ..encodings import Encoding, calibration_indices
from ..errors import CacheNotFoundError, EncodingError, NonFiniteFeaturesError
from ..format.constants import ATTR_KEY, FLOAT16_MAX
from ..format.levels import level_name, levels_section
from ..format.store import TeacherStore, open_root
from ..images.manifest import ImageManifest, load_manifest
from ..teachers import Teacher, TeacherSpec, create_teacher
from ..teachers.blocks import resolve_blocks
from ..teachers.geometry import Geometry, resolve_geometry
from ..utils.runtime import default_num_workers, pick_device
from .loading import Batch, ManifestImages, collate_batch
from .provenance import build_provenance
from .transfer import PART, DeviceRows, HostCopy
from .units import pending_indices
from .writer import FeatureWriter

log = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    group: str
    total: int
    processed: int
    failed: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------
# Compute
# ---------------------------------------------------------------------------------------
def teacher_features(teacher: Teacher, pixels: torch.Tensor, device: torch.device, amp: bool,
                     blocks: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """uint8 ``(B, 3, H, W)`` -> float32 features on ``device`` by name: ``cls`` ``(B, D)``, ``patch``
    ``(B, h, w, D)`` and, per block of ``blocks``, ``levels/b{k}/cls`` ``(B, D)``, ``levels/b{k}/patch``."""
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                enabled=amp and device.type == "cuda"):
        pixels = pixels.to(device, non_blocking=True)
        out = teacher(pixels, blocks=blocks) if blocks else teacher(pixels)
    features = {"cls": out.cls.float(), "patch": out.patch.float()}
    for k, (cls, patch) in out.levels.items():
        features.update({level_name(k, "cls"): cls.float(), level_name(k, "patch"): patch.float()})
    return features


def forward_images_and_views(teacher: Teacher, batch: Batch, device: torch.device, amp: bool,
                             blocks: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """One forward of the ``B`` images and their ``K`` views: :func:`teacher_features` with a view axis, e.g.
    cls ``(B, 1 + K, D)``, patch ``(B, 1 + K, h, w, D)``, index 0 the whole image (``K = 0`` without views)."""
    pixels = batch.pixels.unsqueeze(1)
    if batch.views is not None:
        pixels = torch.cat([pixels, batch.views.pixels], dim=1)
    features = teacher_features(teacher, pixels.flatten(0, 1), device, amp, blocks)
    return {name: values.unflatten(0, pixels.shape[:2]) for name, values in features.items()}


def bad_rows(features: dict[str, torch.Tensor], dtype: str) -> torch.Tensor:
    """Bool ``(B,)``: rows with non-finite values in any of ``features`` (name -> ``(B, ..., D)``), or values
    beyond float16's range when storing float16."""
    flat = torch.cat([values.flatten(1) for values in features.values()], dim=1)
    bad = ~torch.isfinite(flat).all(dim=1)
    if dtype == "float16":
        bad |= flat.abs().amax(dim=1) > FLOAT16_MAX
    return bad


def check_rows(features: dict[str, torch.Tensor], indices: np.ndarray, manifest: ImageManifest,
               spec: TeacherSpec, dtype: str) -> None:
    """Refuse (:class:`NonFiniteFeaturesError` naming the images) a batch with :func:`bad_rows`."""
    bad = bad_rows(features, dtype)
    if bad.any():
        ids = [manifest.ids[i] for i in indices[bad.cpu().numpy()]]
        raise NonFiniteFeaturesError(
            f"teacher {spec.name} gave non-finite features or values beyond {dtype} range "
            f"for {len(ids)} image(s): {', '.join(ids[:20])}. Nothing was written for this batch; "
            "earlier batches are kept. Try --dtype float32 or --no-amp.")


def encoded_rows(features: dict[str, torch.Tensor], batch: Batch, store: TeacherStore, teacher: str, dtype: str,
                 manifest: ImageManifest) -> DeviceRows:
    """A batch's features (name -> ``(B, 1 + K, ...)`` on the device) rounded to the storage ``dtype``, encoded with
    the group's encoding and checked for bad rows there, and their copy to the host started (:mod:`.transfer`):
    nothing here waits for the device."""
    stored = getattr(torch, dtype)
    tensors = {"bad": bad_rows(features, dtype)}
    for name, values in features.items():
        for suffix, part in store.encoding_of(name).scheme(name).encode_tensor(values.to(stored)).items():
            tensors[f"{name}{PART}{suffix}"] = part
    views = batch.views
    return DeviceRows(batch.indices, HostCopy(tensors), list(features), None if views is None else views.boxes,
                      None if views is None else views.flips, batch.failures, teacher, dtype, manifest.ids)


def raw_image_bytes(grid: tuple[int, int], dim: int, dtype: str, views: int) -> int:
    """Uncompressed feature bytes of one image: CLS and ``grid`` patch tokens of ``dim`` channels in ``dtype``, for
    the whole image and each of its ``views`` cached views (what sizes the default shard, :func:`auto_shard_images`)."""
    return (grid[0] * grid[1] + 1) * dim * np.dtype(dtype).itemsize * (1 + views)


def warn_if_grids_differ(root: str, name: str, grid: tuple[int, int]) -> None:
    """Warn when teacher groups of cache ``root`` other than ``name`` have another token grid than ``grid``: training
    with ``augment.mode=grid-crop`` (the default) cuts all teachers' targets with one box, so it needs one grid."""
    try:
        groups = open_root(root, mode="r").groups()
    except CacheNotFoundError:  # a new cache
        return
    others = {other: tuple(meta["geometry"]["grid"]) for other, group in groups
              if other != name and (meta := group.attrs.get(ATTR_KEY, {})).get("kind") == "teacher_features"}
    differ = {other: f"{g[0]}x{g[1]}" for other, g in others.items() if g != tuple(grid)}
    if differ:
        log.warning("teacher group %s gets token grid %dx%d, other groups of %s have %s: training with "
                    "augment.mode=grid-crop (the default) needs one grid for all teachers; extract each with the same "
                    "--student-patch/--student-resolution, or train with augment.mode=none", name, *grid, root,
                    ", ".join(f"{other} {g}" for other, g in differ.items()))


def calibrate_encoding(cfg: ExtractConfig, teacher: Teacher, manifest: ImageManifest, geometry: Geometry,
                       device: torch.device, workers: int, blocks: tuple[int, ...] = ()
                       ) -> tuple[Encoding, dict[int, Encoding]]:
    """``cfg.storage.encoding`` calibrated on the teacher's features (stored dtype precision) of
    ``calibration_images`` images spread evenly over the manifest (unreadable ones are skipped), and the same
    encoding calibrated on each of ``blocks``' features, by block."""
    storage, dim = cfg.storage, teacher.spec.embed_dim
    if not storage.encoding.needs_calibration:
        return (Encoding.calibrate(storage.encoding, dim, storage.dtype),
                {k: Encoding.calibrate(storage.encoding, dim, storage.dtype) for k in blocks})
    teacher.to(device)
    indices = calibration_indices(len(manifest), storage.encoding.calibration_images)
    loader = DataLoader(ManifestImages(manifest, indices, geometry), batch_size=cfg.batch_size, num_workers=workers,
                        collate_fn=collate_batch)
    gathered: dict[str, list[np.ndarray]] = {}
    for batch in tqdm(loader, desc=f"calibrate {storage.encoding.name}", unit="batch", disable=not cfg.progress,
                      dynamic_ncols=True):
        if len(batch.indices):
            features = teacher_features(teacher, batch.pixels, device, cfg.amp, blocks)
            check_rows(features, batch.indices, manifest, teacher.spec, storage.dtype)
            for name, values in features.items():
                gathered.setdefault(name, []).append(values.to(getattr(torch, storage.dtype)).float().cpu().numpy())
    if not gathered:
        raise EncodingError(f"none of the {len(indices)} calibration images of {cfg.images} could be read")
    log.info("calibrating %s on %d images", storage.encoding, sum(map(len, gathered["cls"])))
    samples = {name: np.concatenate(values) for name, values in gathered.items()}

    def calibrated(prefix: str) -> Encoding:
        return Encoding.calibrate(storage.encoding, dim, storage.dtype,
                                  {kind: samples[prefix + kind] for kind in ("cls", "patch")})

    return calibrated(""), {k: calibrated(level_name(k, "")) for k in blocks}


@dataclass
class Extraction:
    """An extraction ready to run units: its config, image manifest, teacher (moved to ``device`` when it runs),
    chosen blocks, geometry and the opened teacher group ``store`` (named ``name``) with the decoding ``workers``,
    started by the multiprocessing start method ``loader_context`` (``None``: the process's default)."""

    cfg: ExtractConfig
    manifest: ImageManifest
    teacher: Teacher
    blocks: tuple[int, ...]
    geometry: Geometry
    name: str
    store: TeacherStore
    device: torch.device
    workers: int
    loader_context: str | None = None


def open_extraction(cfg: ExtractConfig, creator: bool) -> Extraction:
    """Load the manifest and teacher of ``cfg`` and open its teacher group: the ``creator`` creates (or with
    ``--overwrite`` replaces) it, calibrating a lossy encoding first; any other process waits for the creator's
    provenance (:meth:`TeacherStore.open_or_create`). A group made with other settings is refused."""
    cfg.check()
    manifest = load_manifest(cfg.images)
    teacher = create_teacher(cfg.teacher, cfg.checkpoint)
    spec = teacher.spec
    blocks = resolve_blocks(cfg.blocks, teacher.depth, spec.name, teacher.no_blocks_reason, teacher.named_blocks)
    geometry = resolve_geometry(spec, cfg.resolution, cfg.student_patch, cfg.student_resolution, cfg.resize)
    name = cfg.name or spec.name.replace(":", "-").replace("/", "-").replace("@", "-")
    existing = None if cfg.overwrite else TeacherStore.open_if_complete(cfg.out, name, mode="r")
    storage = cfg.storage.resolved(len(manifest), raw_image_bytes(geometry.grid, spec.embed_dim, cfg.storage.dtype,
                                                                  cfg.views),
                                   existing and StorageConfig.from_json(existing.provenance["storage"]))
    provenance = build_provenance(spec, cfg.checkpoint, manifest, str(Path(cfg.images).resolve()), geometry,
                                  storage, cfg.view_sampling.to_json(cfg.views) if cfg.views else None,
                                  levels_section(blocks, teacher.level_description()), teacher)
    device = pick_device(cfg.device)
    workers = default_num_workers(device) if cfg.num_workers is None else cfg.num_workers
    new_group = creator and existing is None
    if new_group:
        warn_if_grids_differ(cfg.out, name, geometry.grid)
    # a new group's encoding is calibrated here; an existing group keeps its stored calibration
    encoding, level_encodings = (calibrate_encoding(cfg, teacher, manifest, geometry, device, workers, blocks)
                                 if new_group else (None, None))
    store = TeacherStore.open_or_create(cfg.out, name, provenance, manifest, geometry.grid, spec.embed_dim,
                                        storage, overwrite=cfg.overwrite, views=cfg.views, encoding=encoding,
                                        creator=creator, level_encodings=level_encodings)
    return Extraction(cfg, manifest, teacher, blocks, geometry, name, store, device, workers)


def extract_units(extraction: Extraction, units: list[int], where: str) -> ExtractResult:
    """Extract the pending images (and with ``--retry-failed`` the failed ones) of work ``units``, which this
    process alone writes, into the opened group; ``where`` names them in the log and progress bar (``slot 0/1``,
    ``unit 7``). Units complete when it returns; a sharded unit still incomplete on an error or Ctrl-C is not
    written (:mod:`.writer`)."""
    cfg, manifest, teacher, store, device = (extraction.cfg, extraction.manifest, extraction.teacher,
                                             extraction.store, extraction.device)
    spec, name, workers = teacher.spec, extraction.name, extraction.workers
    status, records, stored = store.read_unit_state(units)  # never another process's units: they may be mid-write
    todo = pending_indices(status, units, store.images_per_unit, cfg.retry_failed)
    log.info("extract %s -> %s/%s: %d images (+%d views each), %d to do in %s, %dx%d on %s, encoding %s",
             spec.name, cfg.out, name, len(manifest), cfg.views, len(todo), where,
             *extraction.geometry.resolution, device, store.encoding)
    teacher.to(device)
    start = time.perf_counter()
    processed, skipped = 0, []
    writer = FeatureWriter(store, status, records, manifest, cfg.writer_threads, stored=stored, todo=todo)
    images = ManifestImages(manifest, todo, extraction.geometry, cfg.views, cfg.view_sampling)
    loader = DataLoader(images, batch_size=cfg.batch_size,
                        num_workers=workers, collate_fn=collate_batch, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None, persistent_workers=False,
                        multiprocessing_context=extraction.loader_context if workers else None)
    bar = tqdm(total=len(todo), unit="img", desc=f"{name} [{where}]", disable=not cfg.progress,
               dynamic_ncols=True)
    try:
        for batch in loader:
            if len(batch.indices):
                features = forward_images_and_views(teacher, batch, device, cfg.amp, extraction.blocks)
                writer.submit_rows(encoded_rows(features, batch, store, spec.name, cfg.storage.dtype, manifest))
            else:
                writer.submit(batch.indices, None, None, None, batch.failures)
            processed += len(batch.indices)
            skipped += batch.failures
            bar.update(len(batch.indices) + len(batch.failures))
            bar.set_postfix(failed=len(skipped), refresh=False)
    finally:
        bar.close()
        writer.close()  # everything submitted is committed, also on error or Ctrl-C
    seconds = time.perf_counter() - start
    for _, reason, message in skipped:
        log.warning("skipped (%s): %s", reason, message)
    return ExtractResult(group=name, total=len(manifest), processed=processed, failed=len(skipped), seconds=seconds)
