"""Training batches: student pixels (augmented) and cached targets cropped alike, in a resumable order.

Sample order: epochs of :func:`dune_cache.read.shuffle.block_shuffled_order` laid end to end, so the
batch of step ``s`` is a pure function of ``(seed, s)`` — resuming at step ``s`` replays exactly.
Each sample's augmentation draws from a generator seeded by ``(seed, step, position)``, so results
do not depend on the number of DataLoader workers. With ``grid-crop`` the crop *size* (in grid cells)
is drawn once per step and shared by the batch, while each sample draws its own position and flip:
targets of a batch then share one grid and stay one tensor. With ``views`` each sample draws one of its
K cached views from the same per-sample generator — a function of ``(seed, position)``, i.e. of the
seed, the epoch and the sample — and the student sees that view's crop of the image.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dune_cache import (
    FULL_IMAGE,
    CacheReader,
    EncodedBatch,
    ImageDecodeError,
    ReaderError,
    block_shuffled_order,
    check_image_header,
    decode_size,
    load_manifest,
    open_rgb,
    pin_fields,
)

from ..config import AugmentConfig, DataConfig
from ..errors import DataError
from .augment import (
    GridCrop,
    PhotometricParams,
    apply_photometric_uint8,
    crop_pixels,
    crop_tokens,
    crop_view_pixels,
    draft_size,
    full_grid_crop,
    sample_grid_crop,
    sample_photometric_params,
)


@dataclass
class TrainBatch:
    """One (per-rank) batch.

    pixels: ``(B, 3, S, S)`` uint8 student input (photometric augmentation applied);
    clean_pixels: ``(B, 3, S, S)`` uint8 the same crops before photometric augmentation (live teachers);
    cls: teacher -> ``(B, D_t)``; patch: teacher -> ``(B, h, w, D_t)`` cropped targets;
    mask: ``(B, T)`` bool teacher has a target; tags: dataset tag per sample;
    views: ``(B,)`` the cached view each sample shows (``-1``: the whole image, every mode but ``views``);
    encoded: when targets are decoded on the training device, the cropped stored targets (``cls``/``patch``
    are then empty until the trainer decodes them with ``CacheReader.decode``).
    damaged: ``(B, T)`` bool targets dropped as damaged (``data.skip_damaged``; mask False there), ``None``
    until decoded.
    images: with ``data.image_decode=device``, the encoded images still to decode and crop on the training device
    (``pixels``/``clean_pixels`` are then empty until :func:`finish_pixels`).
    photometric: with photometric augmentation on the device, the draws still to apply there (``pixels`` is then
    ``clean_pixels`` until :func:`finish_pixels`).
    level_cls: teacher -> block -> ``(B, D_t)``; level_patch: teacher -> block -> ``(B, h, w, D_t)`` cropped like
    ``patch``: the intermediate blocks the cache stores, read for SAK heads (through a reader with ``levels=True``).
    samples: ``(B,)`` int64, ``indices`` as a tensor, for indexing tables kept on the training device.

    :meth:`pin_memory` (called by a DataLoader with ``pin_memory=True``) pins every tensor, also those of
    ``encoded`` and ``images``, so that the trainer's non-blocking copies to the device overlap with compute.
    """

    step: int
    indices: np.ndarray
    samples: torch.Tensor
    pixels: torch.Tensor
    clean_pixels: torch.Tensor
    cls: dict[str, torch.Tensor]
    patch: dict[str, torch.Tensor]
    mask: torch.Tensor
    tags: list[str]
    crops: list[GridCrop]
    views: np.ndarray
    encoded: EncodedBatch | None = None
    damaged: torch.Tensor | None = None
    images: EncodedImages | None = None
    photometric: PhotometricParams | None = None
    level_cls: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    level_patch: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)

    def pin_memory(self) -> "TrainBatch":
        """This batch with every tensor pinned (the DataLoader's pinning hook)."""
        return pin_fields(self)


@dataclass
class EncodedImages:
    """Whole images of a batch as their files' bytes, with the crop each sample shows.

    data: ``B`` 1-D uint8 tensors (the files); crops: the grid crop of each; grid: ``(h, w)`` token grid the crops
    are in; size: the student's ``(H_s, W_s)``; names: what each image is (for errors).
    """

    data: list[torch.Tensor]
    crops: list[GridCrop]
    grid: tuple[int, int]
    size: tuple[int, int]
    names: list[str]

    def pin_memory(self) -> "EncodedImages":
        """These images with their bytes pinned (the DataLoader's pinning hook)."""
        return pin_fields(self)


JPEG_MAGIC = b"\xff\xd8\xff"


def decode_crops(images: EncodedImages, device: torch.device | str) -> torch.Tensor:
    """uint8 ``(B, 3, H_s, W_s)`` on ``device``: each image decoded by torchvision (JPEGs batched on ``device``:
    nvJPEG on CUDA; other formats on the CPU), upright per EXIF, then cut and resized by :func:`crop_pixels`. Each
    file's header is checked first (:func:`dune_cache.check_image_header`): an image declaring more than
    ``MAX_IMAGE_PIXELS`` pixels (the bytes may come from a cache's image copy) is a :class:`DataError`, never
    decoded."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    for data, name in zip(images.data, images.names):  # the header first: no decoder allocates for a bomb
        try:
            check_image_header(data.numpy().tobytes(), name)
        except ImageDecodeError as exc:
            raise DataError(f"data.image_decode=device: training image {exc}") from None
    jpeg = [k for k, d in enumerate(images.data) if bytes(d[:3].tolist()) == JPEG_MAGIC]
    decoded: dict[int, torch.Tensor] = {}
    try:
        if jpeg:
            pixels = decode_jpeg([images.data[k] for k in jpeg], mode=ImageReadMode.RGB, device=device,
                                 apply_exif_orientation=True)
            decoded.update(zip(jpeg, pixels))
        for k in set(range(len(images.data))) - set(jpeg):
            decoded[k] = decode_image(images.data[k], mode=ImageReadMode.RGB, apply_exif_orientation=True).to(device)
    except RuntimeError as exc:
        raise DataError(f"data.image_decode=device: torchvision cannot decode an image of the batch "
                        f"({', '.join(images.names[:4])}...): {exc}; set data.image_decode=loader") from exc
    return torch.stack([crop_pixels(decoded[k], crop, images.grid, images.size)
                        for k, crop in enumerate(images.crops)])


def finish_pixels(batch: TrainBatch, device: torch.device | str) -> None:
    """On the training device: decode and crop the images left encoded (``batch.images``) and apply the photometric
    draws left to apply (``batch.photometric``), filling ``clean_pixels`` and ``pixels`` there; a batch made whole in
    the loader is left as it is."""
    if batch.images is not None:
        batch.clean_pixels = batch.pixels = decode_crops(batch.images, device)
    if batch.photometric is not None:
        batch.clean_pixels = batch.clean_pixels.to(device, non_blocking=True)
        batch.pixels = apply_photometric_uint8(batch.clean_pixels, batch.photometric, sync_free=True)
    batch.images = batch.photometric = None


# Independent random streams of a step (see step_generator).
SAMPLE_STREAM, PHOTOMETRIC_STREAM, TEACHER_DROP_STREAM, CROP_SIZE_STREAM = range(4)


def step_generator(seed: int, step: int, stream: int, index: int = 0,
                   device: torch.device | str = "cpu") -> torch.Generator:
    """Independent, reproducible generator on ``device`` for ``stream`` (and sample ``index``) of one step: seeding
    it is a host operation, so draws on a GPU generator need no transfer (on the CPU they are the same numbers)."""
    mixed = np.random.SeedSequence([seed, step, stream, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(mixed) & ((1 << 63) - 1))


def batch_positions(step: int, batch_size: int, rank: int, world: int) -> np.ndarray:
    """Global sample positions of ``rank``'s share of the global batch of ``step``."""
    per_rank = batch_size // world
    start = step * batch_size + rank * per_rank
    return np.arange(start, start + per_rank, dtype=np.int64)


class EpochOrder:
    """Maps global sample positions to sample indices through per-epoch block-shuffled orders."""

    def __init__(self, n: int, block: int, buffer: int, seed: int):
        self.n, self.block, self.buffer, self.seed = n, block, buffer, seed
        self._cache: dict[int, np.ndarray] = {}

    def epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            self._cache = {epoch: block_shuffled_order(self.n, self.block, self.buffer, self.seed, epoch)}
        return self._cache[epoch]

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        return np.array([self.epoch_order(int(p) // self.n)[int(p) % self.n] for p in positions], dtype=np.int64)


def place_crop(size: tuple[int, int], grid: tuple[int, int], augment: AugmentConfig,
               generator: torch.Generator) -> GridCrop:
    """A crop of ``size`` cells at a uniformly random position of ``grid``, flipped with ``augment.flip_p``
    (grid-crop; the whole grid, no draws, otherwise)."""
    if augment.mode != "grid-crop":
        return full_grid_crop(grid)
    y0 = int(torch.randint(0, grid[0] - size[0] + 1, (1,), generator=generator))
    x0 = int(torch.randint(0, grid[1] - size[1] + 1, (1,), generator=generator))
    flip = bool(torch.rand((), generator=generator) < augment.flip_p)
    return GridCrop(y0=y0, x0=x0, h=size[0], w=size[1], flip=flip)


def pick_view(num_views: int, augment: AugmentConfig, generator: torch.Generator) -> int:
    """``views`` mode: one of the K cached views, uniformly; otherwise the whole image (no draws)."""
    if augment.mode != "views":
        return FULL_IMAGE
    return int(torch.randint(num_views, (1,), generator=generator))


def common_grid(reader: CacheReader) -> tuple[int, int]:
    """The token grid all teachers share (grid-crop cuts every teacher's targets with one box)."""
    grids = set(reader.grids.values())
    if len(grids) != 1:
        raise DataError(f"augment.mode grid-crop needs all teachers on one token grid (extract them with "
                        f"--student-patch/--student-resolution); the cache has {reader.grids}")
    return grids.pop()


def views_per_image(reader: CacheReader) -> int:
    """K of the cache's views (``augment.mode=views`` needs every teacher extracted with the same ``--views``)."""
    try:
        return reader.views_per_image()
    except ReaderError as exc:
        raise DataError(f"augment.mode=views: {exc}") from exc


class ImagePaths(Sequence[Path]):
    """``paths[i]``: the image file of cache sample ``i``, its id under ``base`` (absolute ids as they are), made
    on access: a million samples hold their id strings only, no ``Path`` objects (docs/scale.md)."""

    def __init__(self, base: Path | None, ids: Sequence[str]):
        self.base, self.ids = base, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Path:  # type: ignore[override]
        path = Path(self.ids[index])
        return path if path.is_absolute() or self.base is None else self.base / path


def image_paths(reader: CacheReader, images: str) -> ImagePaths:
    """Path of every cache sample, from the image directory/list the run is given."""
    manifest = load_manifest(images)
    listed = set(manifest.ids)
    missing = [i for i in reader.image_ids if i not in listed]
    if missing:
        raise DataError(f"data.images {images}: {len(missing)} cached image ids are not in it "
                        f"(e.g. {', '.join(missing[:5])}); give the image set the cache was extracted from")
    return ImagePaths(manifest.base, reader.image_ids)


@dataclass(frozen=True)
class InputPlan:
    """Where each input stage runs, resolved by the trainer from the config and the device.

    read_targets: read cached targets (``False``: the live-teacher baseline computes them);
    decode_targets_on_device: targets leave the loader as stored (e.g. int8 codes) for ``CacheReader.decode``
    on the training device; decode_images_on_device: images leave it as file bytes (:class:`EncodedImages`);
    photometric_on_device: the photometric draws are applied there; images_from_cache: the images come from the
    cache's own copy (``dune-cache add-images``) instead of ``data.images``.
    """

    read_targets: bool = True
    decode_targets_on_device: bool = False
    decode_images_on_device: bool = False
    photometric_on_device: bool = False
    images_from_cache: bool = False


class BatchSource(Dataset):
    """Item ``step`` -> this rank's :class:`TrainBatch` for that step, targets read through ``reader``.

    ``data`` gives the images, batch size, shuffle block and buffer and JPEG draft decode; ``augment`` and ``seed``
    the crops and draws; ``samples`` the sample indices (into ``reader.image_ids``) trained on; ``resolution`` the
    student's input size. The reader is kept as a float16 copy (:meth:`CacheReader.with_options`: half the bytes
    through the loader; the trainer widens them on the device) and pickles to DataLoader workers, which open their
    own handles on first read.
    """

    def __init__(self, reader: CacheReader, data: DataConfig, augment: AugmentConfig, seed: int, samples: np.ndarray,
                 resolution: int, plan: InputPlan = InputPlan(), rank: int = 0, world: int = 1):
        self._reader = reader.with_options(dtype=torch.float16)
        if plan.images_from_cache:  # the cache's own copy of its images (dune-cache add-images)
            try:
                reader.check_image_copy(resolution)
            except ReaderError as exc:
                raise DataError(f"data.image_source: {exc}") from exc
        self.paths: ImagePaths | None = None if plan.images_from_cache else image_paths(reader, data.images)
        self.tags = reader.tags
        self.grid = common_grid(reader) if augment.mode == "grid-crop" else next(iter(reader.grids.values()))
        self.num_views = views_per_image(reader) if augment.mode == "views" else 0
        self.samples = samples
        self.order = EpochOrder(len(samples), data.shuffle_block, data.shuffle_buffer, seed)
        self.batch_size, self.resolution, self.augment, self.seed = data.batch_size, resolution, augment, seed
        self.rank, self.world, self.plan = rank, world, plan
        self.jpeg_draft = data.jpeg_draft  # JPEG decode at a reduced scale in the loader (see student_view)

    def reader(self) -> CacheReader:
        """The (float16) reader the batches' targets come from; any process may read and decode through it."""
        return self._reader

    def __len__(self) -> int:  # steps are unbounded; the trainer decides how many
        return 1 << 62

    def __getitem__(self, step: int) -> TrainBatch:
        positions = batch_positions(step, self.batch_size, self.rank, self.world)
        indices = self.samples[self.order(positions)]
        size = self.crop_size(step_generator(self.seed, step, CROP_SIZE_STREAM))
        crops, views = [], []
        for position in positions:
            generator = step_generator(self.seed, step, SAMPLE_STREAM, int(position))
            crops.append(place_crop(size, self.grid, self.augment, generator))
            views.append(pick_view(self.num_views, self.augment, generator))
        views = np.array(views, dtype=np.int64)
        boxes, flips = self.reader().view_boxes(indices, views) if self.num_views else (None, None)
        files = self.image_files(indices)
        images = None
        if self.plan.decode_images_on_device:
            images = EncodedImages(data=[torch.frombuffer(bytearray(read_bytes(f)), dtype=torch.uint8) for f in files],
                                   crops=crops, grid=self.grid, size=(self.resolution, self.resolution),
                                   names=[self.image_name(int(i)) for i in indices])
            clean_pixels = torch.empty(0, 3, self.resolution, self.resolution, dtype=torch.uint8)  # filled there
        else:
            clean_pixels = torch.stack([self.student_view(file, int(index), crop) if boxes is None
                                        else self.student_cached_view(file, int(index), boxes[k], bool(flips[k]))
                                        for k, (file, index, crop) in enumerate(zip(files, indices, crops))])
        pixels, params = clean_pixels, None
        if self.augment.photometric:  # drawn here either way: the same draws wherever they are applied
            params = sample_photometric_params(len(indices), step_generator(self.seed, step, PHOTOMETRIC_STREAM,
                                                                            self.rank))
            if not (self.plan.photometric_on_device or self.plan.decode_images_on_device):
                pixels, params = apply_photometric_uint8(clean_pixels, params), None
        cls, patch, mask, damaged, encoded, level_cls, level_patch = self.cropped_targets(indices, crops, views)
        return TrainBatch(step=step, indices=indices, samples=torch.from_numpy(indices), pixels=pixels,
                          clean_pixels=clean_pixels, cls=cls,
                          patch=patch, mask=mask, tags=[self.tags[i] for i in indices], crops=crops, views=views,
                          encoded=encoded, damaged=damaged, images=images, photometric=params, level_cls=level_cls,
                          level_patch=level_patch)

    def crop_size(self, generator: torch.Generator) -> tuple[int, int]:
        """This step's crop size in grid cells (the whole grid without grid-crop)."""
        if self.augment.mode != "grid-crop":
            return self.grid
        crop = sample_grid_crop(self.grid, self.augment, generator)
        return crop.h, crop.w

    def image_files(self, indices: np.ndarray) -> list[Path | io.BytesIO]:
        """The image of each sample: its file, or (image copy) its JPEG bytes from the cache, read at once."""
        if self.paths is not None:
            return [self.paths[i] for i in indices]
        try:
            return [io.BytesIO(data) for data in self.reader().image_bytes(indices)]
        except ReaderError as exc:
            raise DataError(f"data.image_source: {exc}") from exc

    def image_name(self, index: int) -> str:
        """Sample ``index``'s image, for messages: its path, or its id in the cache's image copy."""
        return str(self.paths[index]) if self.paths is not None else f"{self.reader().image_ids[index]} (cache copy)"

    def eval_files(self) -> Sequence[Path | io.BytesIO]:
        """Every sample's image as ``load_pixels`` opens it (held-out evaluation)."""
        return self.paths if self.paths is not None else CopiedImages(self.reader())

    def open_image(self, file: Path | io.BytesIO, index: int, draft: tuple[int, int] | None) -> Image.Image:
        """The whole RGB image of sample ``index``, a JPEG DCT-decoded at a reduced scale no smaller than ``draft``
        ``(W, H)`` (``None``: full size)."""
        try:
            return open_rgb(file, draft_size=draft)
        except ImageDecodeError as exc:
            raise DataError(f"training image {self.image_name(index)} became unreadable: {exc}") from exc

    def student_view(self, file: Path | io.BytesIO, index: int, crop: GridCrop) -> torch.Tensor:
        """uint8 ``(3, S, S)``: the crop's pixels of the whole image, resized for the student. JPEGs are decoded at
        a reduced scale per ``data.jpeg_draft``: ``crop`` no smaller than the crop needs (the whole image at which
        the crop's region has the student's size), ``double`` twice the student size, ``off`` full size."""
        size = (self.resolution, self.resolution)
        draft = {"crop": draft_size(crop, self.grid, size), "double": decode_size(size), "off": None}[self.jpeg_draft]
        pixels = torch.from_numpy(np.asarray(self.open_image(file, index, draft), dtype=np.uint8).copy())
        return crop_pixels(pixels.permute(2, 0, 1), crop, self.grid, size)

    def student_cached_view(self, file: Path | io.BytesIO, index: int, box: np.ndarray, flip: bool) -> torch.Tensor:
        """uint8 ``(3, S, S)``: the cached view's box of the whole image, flipped alike, resized for the student;
        decoded as extraction decoded it for the teacher (``dune_cache.images.views.decode_size``), whatever
        ``data.jpeg_draft``, so that both see the same pixels."""
        size = (self.resolution, self.resolution)
        return crop_view_pixels(self.open_image(file, index, decode_size(size)), box, flip, size)

    def cropped_targets(self, indices: np.ndarray, crops: list[GridCrop], views: np.ndarray):
        """``(cls, patch, mask, damaged, None, level_cls, level_patch)`` decoded targets with patch tokens (and the
        levels' patch tokens) cropped, or with ``plan.decode_targets_on_device``
        ``({}, {}, mask, None, EncodedBatch, {}, {})`` whose patch parts are cropped alike."""
        if not self.plan.read_targets:
            return {}, {}, torch.ones(len(indices), 0, dtype=torch.bool), None, None, {}, {}
        targets = self.reader().read(indices, views, decode=not self.plan.decode_targets_on_device)
        if self.plan.decode_targets_on_device:
            # a per-image part (B, rows, C) (lowrank's _basis) is not on the token grid: whole, not cropped
            crop_parts = lambda parts: {suffix: crop_batch(part, crops) if part.dim() == 4 else part  # noqa: E731
                                        for suffix, part in parts.items()}
            patch = {t: crop_parts(parts) for t, parts in targets.patch.items()}
            level_patch = {t: {k: crop_parts(parts) for k, parts in levels.items()}
                           for t, levels in targets.level_patch.items()}
            return {}, {}, targets.mask, None, replace(targets, patch=patch, level_patch=level_patch), {}, {}
        patch = {t: crop_batch(p, crops) for t, p in targets.patch.items()}
        level_patch = {t: {k: crop_batch(p, crops) for k, p in levels.items()}
                       for t, levels in targets.level_patch.items()}
        return targets.cls, patch, targets.mask, targets.damaged, None, targets.level_cls, level_patch


class CopiedImages(Sequence):
    """Sample ``i`` -> its JPEG bytes in the cache's image copy, as a file object (``reader.image_bytes``)."""

    def __init__(self, reader: CacheReader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> io.BytesIO:
        return io.BytesIO(self.reader.image_bytes(np.array([index]))[0])


def read_bytes(file: Path | io.BytesIO) -> bytes:
    """The bytes of an image file (path or file object)."""
    return file.getvalue() if isinstance(file, io.BytesIO) else Path(file).read_bytes()


def crop_batch(tokens: torch.Tensor, crops: list[GridCrop]) -> torch.Tensor:
    """Sample ``k``'s tokens ``(B, h, w, C)`` cut by ``crops[k]`` (all crops of a batch have one size)."""
    return torch.stack([crop_tokens(p, c) for p, c in zip(tokens, crops)])


def batch_loader(source: BatchSource, first_step: int, steps: int, workers: int, pin: bool) -> DataLoader:
    """Batches for steps ``first_step .. steps-1`` in order (one item per step)."""
    # forkserver: workers start from a clean process, since tensorstore/zarrs handles do not survive fork
    return DataLoader(source, sampler=range(first_step, steps), batch_size=None, num_workers=workers,
                      pin_memory=pin, prefetch_factor=2 if workers else None, persistent_workers=False,
                      multiprocessing_context="forkserver" if workers else None)
