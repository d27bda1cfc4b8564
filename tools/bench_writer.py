"""The extraction write path alone (no teacher forward): encode + compress + write ViT-L-at-448-shaped features.

    python tools/bench_writer.py                                   # every encoding, checksum on/off,
                                                                   # 1 and 2 writer threads
    python tools/bench_writer.py --encodings none --threads 1 2 4 --codecs blosc-zstd:5 zstd:3 blosc-lz4:5
    python tools/bench_writer.py --gpu-rate 700                    # cores per H100 at 700 extracted images/s

Features: real DINOv2 ViT-S/14 patch and CLS features (offline checkpoint, ``--checkpoint auto``) of
``--source-images`` images spread over ``--images`` at 448x448 (32x32 tokens x 384 channels), computed once and
kept under ``--feature-cache``, made ViT-L-shaped (1024 channels) by :func:`vit_l_like`: an orthonormal map of the
384 real channels onto 1024 (the 384-dimensional structure of real tokens kept, as in a wider ViT whose features
are low-rank), plus isotropic noise at 10% of a typical channel's std (so no channel is an exact combination of
others) and :data:`MASSIVE_CHANNELS` "massive activation" channels at 50x a typical channel's std (ViT features
have a few such channels: Darcet et al., "Vision Transformers Need Registers", ICLR 2024). Images are cycled to make
``--count`` images per measurement.

Each measurement writes ``--count`` images in batches of ``--batch`` through the real writer of ``dune-cache
extract`` (:class:`dune_cache.extract.writer.FeatureWriter`: encode, Zarr writes, then the unit's failure records and
status chunk) into a fresh teacher group made by :meth:`TeacherStore.create` (not timed; calibrated encodings are
calibrated on the features of the source images). Measurements alternate within each round; medians. CPU-seconds
are the whole process's (every thread: writer, its pool, zarr's codec threads), so they hold on a loaded machine;
wall img/s is reported too. Input MB: the float16 features (CLS + patch) handed to the writer.

``--encode-on device`` (what ``dune-cache extract`` does: the encoding runs on the extraction device before the copy
to the host) encodes each batch with :meth:`Scheme.encode_tensor` first, timed apart (here on this machine's CPU, a
stand-in for the GPU: not a GPU figure), then hands the writer the encoded parts: the CPU ms per image are then the
host's share alone (compression, checksums, writes, status). ``--encode-on host`` hands it float features to encode
on the host, as the writer did before.

Cores per H100 = (H100 extraction images/s, ViT-L at 448) x (CPU-s per image): the rate is read from
``docs/results/cost_model.json`` (``extraction_images_per_s_per_h100``, ``dinov2_vitl14_reg4`` at 448: an estimate
from FLOPs at an assumed utilisation, not a measurement) unless ``--gpu-rate`` is given.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from dune_cache.config import EncodingConfig, StorageConfig
from dune_cache.encodings import Encoding, calibration_indices
from dune_cache.extract.provenance import build_provenance
from dune_cache.extract.writer import FeatureWriter
from dune_cache.format.constants import STATUS_PENDING
from dune_cache.format.store import TeacherStore
from dune_cache.images.decode import load_pixels
from dune_cache.images.manifest import ImageManifest, load_manifest
from dune_cache.offline.catalogue import AUTO, resolve_checkpoint_option
from dune_cache.teachers import create_teacher
from dune_cache.teachers.geometry import Geometry, parse_size
from dune_cache.teachers.spec import TeacherSpec

DIM = 1024  # ViT-L
MASSIVE_CHANNELS = 4
MASSIVE_SCALE = 50.0  # x a typical channel's std
NOISE = 0.1  # isotropic noise std, x a typical channel's std
COST_MODEL = Path("docs/results/cost_model.json")
RATE_KEY = "extraction_images_per_s_per_h100"
RATE_TEACHER, RATE_RESOLUTION = "dinov2_vitl14_reg4", "448"  # the cost model's ViT-L at 448


@dataclass(frozen=True)
class Setting:
    """One measured configuration of the writer."""

    encoding: str
    codec: str
    level: int
    checksum: bool
    threads: int
    encode_on: str = "device"

    @property
    def label(self) -> str:
        return (f"{self.encoding} | {self.codec}:{self.level} | {'on' if self.checksum else 'off'} | "
                f"{self.threads} | {self.encode_on}")


def real_features(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """float32 cls ``(n, 384)`` and patch ``(n, 32, 32, 384)`` of the teacher on ``--source-images`` images spread
    over ``--images`` (cached in ``--feature-cache`` by teacher, resolution and image list)."""
    manifest = load_manifest(args.images)
    picked = calibration_indices(len(manifest), args.source_images)
    key = hashlib.sha256(f"{args.teacher}|{args.resolution}|{manifest.sha256}|{picked.tolist()}".encode()).hexdigest()
    path = args.feature_cache / f"{args.teacher}_{args.resolution}_{key[:16]}.npz"
    if path.exists():
        with np.load(path) as saved:
            return saved["cls"], saved["patch"]
    teacher = create_teacher(args.teacher, resolve_checkpoint_option(args.teacher, args.checkpoint))
    size = parse_size(args.resolution)
    cls, patch = [], []
    with torch.inference_mode():
        for i in picked:
            out = teacher(torch.from_numpy(load_pixels(manifest.path(int(i)), size, "squash"))[None])
            cls.append(out.cls.float().numpy())
            patch.append(out.patch.float().numpy())
    args.feature_cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, cls=np.concatenate(cls), patch=np.concatenate(patch))
    return np.concatenate(cls), np.concatenate(patch)


def vit_l_like(cls: np.ndarray, patch: np.ndarray, dim: int = DIM, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Real ``(..., d)`` features -> float16 ``(..., dim)``: an orthonormal map ``d -> dim`` (scaled to keep a
    channel's std), isotropic noise and :data:`MASSIVE_CHANNELS` massive-activation channels (module docstring)."""
    rng = np.random.default_rng(seed)
    d = cls.shape[-1]
    basis, _ = np.linalg.qr(rng.standard_normal((dim, d)))  # (dim, d), orthonormal columns
    basis = (basis * np.sqrt(dim / d)).astype(np.float32)
    typical = float(np.median(patch.reshape(-1, d).std(axis=0)))
    channels = rng.choice(dim, MASSIVE_CHANNELS, replace=False)
    signs = rng.choice([-1.0, 1.0], MASSIVE_CHANNELS).astype(np.float32)

    def widen(x: np.ndarray) -> np.ndarray:
        y = x @ basis.T + rng.normal(0.0, NOISE * typical, (*x.shape[:-1], dim)).astype(np.float32)
        y[..., channels] = signs * MASSIVE_SCALE * typical * (1 + 0.1 * y[..., channels] / typical)
        return y.astype(np.float16)

    return widen(cls), widen(patch)


def synthetic_manifest(count: int) -> ImageManifest:
    return ImageManifest(ids=tuple(f"img{i:08d}.jpg" for i in range(count)), tags=("",) * count, base=None)


def create_store(root: str, setting: Setting, encoding: Encoding, count: int, grid: tuple[int, int]) -> TeacherStore:
    """A fresh teacher group laid out as extraction lays it out."""
    storage = StorageConfig(codec=setting.codec, level=setting.level, checksum=setting.checksum, shard_images=0,
                            encoding=encoding.config)
    spec = TeacherSpec(name="vitl_like", arch="synthetic", patch_size=14, embed_dim=DIM)
    manifest = synthetic_manifest(count)
    geometry = Geometry(resolution=(grid[0] * 14, grid[1] * 14), grid=grid, patch_size=14)
    provenance = build_provenance(spec, None, manifest, "synthetic", geometry, storage)
    return TeacherStore.create(root, spec.name, provenance, manifest, grid, DIM, storage, encoding=encoding)


def calibrated(name: str, cls: np.ndarray, patch: np.ndarray) -> Encoding:
    config = EncodingConfig.parse(name)
    samples = {"cls": cls.astype(np.float32), "patch": patch.astype(np.float32)}
    return Encoding.calibrate(config, DIM, "float16", samples if config.needs_calibration else None)


def encoded(store: TeacherStore, name: str, values: np.ndarray) -> dict[str, np.ndarray]:
    """The parts extraction would copy from its device for ``values`` of feature array ``name``."""
    parts = store.encoding_of(name).scheme(name).encode_tensor(torch.from_numpy(values))
    return {suffix: part.numpy() for suffix, part in parts.items()}


def write_all(store: TeacherStore, cls: np.ndarray, patch: np.ndarray, count: int, batch: int,
              threads: int, encode_on: str) -> tuple[float, float, float]:
    """(wall s, process CPU s, encode CPU s) to write ``count`` images (cycling ``cls``/``patch``) through
    :class:`FeatureWriter`; with ``encode_on == "device"`` the batches are encoded before (the third figure) and the
    writer gets their parts."""
    manifest = synthetic_manifest(count)
    status = np.full(count, STATUS_PENDING, dtype=np.uint8)
    batches, encode_cpu = [], 0.0
    for lo in range(0, count, batch):
        rows = np.arange(lo, min(lo + batch, count))
        source = rows % len(cls)
        c, p = np.ascontiguousarray(cls[source]), np.ascontiguousarray(patch[source])
        if encode_on == "device":
            start = time.process_time()
            c, p = encoded(store, "cls", c), encoded(store, "patch", p)
            encode_cpu += time.process_time() - start
        batches.append((rows, c, p))
    wall, cpu = time.perf_counter(), time.process_time()
    writer = FeatureWriter(store, status, [], manifest, threads=threads)
    for rows, c, p in batches:
        writer.submit(rows, c, p, None, [])
    writer.close()
    return time.perf_counter() - wall, time.process_time() - cpu, encode_cpu


def gpu_rate(args: argparse.Namespace) -> tuple[float | None, str]:
    """(H100 extraction images/s for ViT-L at 448, where it came from)."""
    if args.gpu_rate is not None:
        return args.gpu_rate, "--gpu-rate"
    rates = json.loads(COST_MODEL.read_text()).get(RATE_KEY, {}) if COST_MODEL.exists() else {}
    value = rates.get(RATE_TEACHER, {}).get(RATE_RESOLUTION)
    if value is not None:
        return float(value), f"{COST_MODEL} {RATE_KEY}.{RATE_TEACHER}.{RATE_RESOLUTION}"
    return None, f"not known yet ({COST_MODEL} has no {RATE_KEY}.{RATE_TEACHER}.{RATE_RESOLUTION}; pass --gpu-rate)"


def parse_codec(text: str) -> tuple[str, int]:
    codec, _, level = text.partition(":")
    return codec, int(level or StorageConfig.level)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="dinov2_vits14")
    parser.add_argument("--checkpoint", type=Path, default=Path(AUTO))
    parser.add_argument("--images", type=Path, default=Path("demo/train"), help="source images (default: the demo's)")
    parser.add_argument("--source-images", type=int, default=32, help="real images whose features are cycled")
    parser.add_argument("--resolution", default="448")
    parser.add_argument("--feature-cache", type=Path, default=Path.home() / ".cache" / "dune_cache" / "bench_writer")
    parser.add_argument("--count", type=int, default=64, help="images per measurement")
    parser.add_argument("--batch", type=int, default=16, help="images per writer batch (extraction's --batch-size)")
    parser.add_argument("--encodings", nargs="+", default=["none", "bitround", "int8-channel", "int8-token", "pca"])
    parser.add_argument("--codecs", nargs="+", default=[f"{StorageConfig.codec}:{StorageConfig.level}"],
                        help="CODEC:LEVEL (default: the storage default)")
    parser.add_argument("--checksum", nargs="+", choices=["on", "off"], default=["on", "off"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="writer threads (--writer-threads)")
    parser.add_argument("--encode-on", nargs="+", choices=["device", "host"], default=["device"],
                        help="device: encoded before the writer, as extraction does (timed apart); host: by the writer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpu-rate", type=float, default=None,
                        help=f"H100 extraction images/s (ViT-L at 448); default: {COST_MODEL} {RATE_KEY}")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    source_cls, source_patch = real_features(args)
    cls, patch = vit_l_like(source_cls, source_patch)
    grid = patch.shape[1:3]
    mb_per_image = (cls[0].nbytes + patch[0].nbytes) / 1e6
    print(f"features: {len(cls)} real {args.teacher} images at {args.resolution} -> cls {cls.shape[1:]}, "
          f"patch {patch.shape[1:]} float16, {mb_per_image:.2f} MB per image; load average {os.getloadavg()}")
    encodings = {name: calibrated(name, cls, patch) for name in args.encodings}
    settings = [Setting(name, *parse_codec(codec), checksum == "on", threads, where)
                for name in args.encodings for codec in args.codecs for checksum in args.checksum
                for threads in args.threads for where in args.encode_on]
    work = Path(tempfile.mkdtemp(prefix="bench_writer_"))
    samples: dict[Setting, list[tuple[float, float, float]]] = {s: [] for s in settings}
    stored: dict[Setting, int] = {}
    loads = [os.getloadavg()[0]]
    try:
        for r in range(args.rounds):
            for k, setting in enumerate(settings):
                root = str(work / f"{r}_{k}.zarr")
                store = create_store(root, setting, encodings[setting.encoding], args.count, grid)
                samples[setting].append(write_all(store, cls, patch, args.count, args.batch, setting.threads,
                                                  setting.encode_on))
                stored[setting] = store.nbytes_stored()
                shutil.rmtree(root)
            loads.append(os.getloadavg()[0])
            print(f"round {r} done, load average {loads[-1]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rate, rate_source = gpu_rate(args)
    rows = []
    for setting in settings:
        wall = statistics.median(w for w, _, _ in samples[setting])
        cpu = statistics.median(c for _, c, _ in samples[setting]) / args.count
        encode = statistics.median(e for _, _, e in samples[setting]) / args.count
        rows.append({**setting.__dict__, "cpu_s_per_image": cpu, "encode_cpu_s_per_image": encode,
                     "mb_per_cpu_s": mb_per_image / cpu,
                     "images_per_s_per_core": 1 / cpu, "wall_images_per_s": args.count / wall,
                     "ratio_vs_fp16": args.count * mb_per_image * 1e6 / stored[setting],
                     "cores_per_h100": rate * cpu if rate else None})
    print(f"\n{args.count} images per measurement, batch {args.batch}, {args.rounds} rounds (medians); "
          f"{os.cpu_count()} cores, load average {min(loads):.2f}-{max(loads):.2f}; H100 rate: "
          f"{rate if rate else '?'} img/s ({rate_source})")
    print("| encoding | codec | checksum | writer threads | encoded on | host CPU ms/image | encode CPU ms/image "
          "(this CPU) | MB per CPU-s | images/s per core | wall images/s | ratio vs fp16 | host cores per H100 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cores = f"{row['cores_per_h100']:.1f}" if row["cores_per_h100"] else "?"
        encode = f"{1e3 * row['encode_cpu_s_per_image']:.1f}" if row["encode_on"] == "device" else "(in host)"
        print(f"| {row['encoding']} | {row['codec']}:{row['level']} | {'on' if row['checksum'] else 'off'} | "
              f"{row['threads']} | {row['encode_on']} | {1e3 * row['cpu_s_per_image']:.1f} | {encode} | "
              f"{row['mb_per_cpu_s']:.0f} | "
              f"{row['images_per_s_per_core']:.0f} | {row['wall_images_per_s']:.0f} | {row['ratio_vs_fp16']:.2f}x | "
              f"{cores} |")
    if args.json:
        machine = {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                   "load_average": [min(loads), max(loads)], "zarr": zarr.__version__}
        args.json.write_text(json.dumps({"machine": machine, "count": args.count, "batch": args.batch,
                                         "rounds": args.rounds, "mb_per_image": mb_per_image,
                                         "h100_images_per_s": rate, "h100_rate_source": rate_source,
                                         "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
