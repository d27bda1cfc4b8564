"""Reader throughput per backend, and randomness quality of the block + buffer shuffle.

    python tools/bench_reader.py [--cache DIR] [--images 2000] [--grid 16] [--dim 1024] [--batch 256]
    python tools/bench_reader.py [--cache DIR] ... --encodings none bitround int8-channel int8-token pca:rank=D/4
    python tools/bench_reader.py --real-caches e2e/encodings
    python tools/bench_reader.py --shuffle-quality [--n 100000] [--batch 256]
    python tools/bench_reader.py --damage-check [--cache DIR] ...

Damage check (``--damage-check``): the CPU the reader's check for damaged targets costs (a lost chunk decodes to
NaN; ``dune_cache.read.reader.unwritten_rows`` looks at one value per image), read side by side with the check
switched off and with a scan of every value instead, on the fastest backend per output dtype. Reported as GB
per CPU-second and the check's share of the reader's CPU.

Reader: random batches (indices drawn without replacement, unsorted) from a cache with realistic
sizes: one teacher group of synthetic ViT-like float16 features (log-normal channel scales, a few
large-magnitude channels), stored exactly as `dune-cache extract` stores them (TeacherStore,
blosc-zstd level 5, one image per chunk). The baseline is plain zarr-python ``oindex`` on the same
arrays (the docs/cache-format.md recipe, float16 out); each ``CacheReader`` backend returns the
full ``TargetBatch``, as float32 tensors (the default) or float16 (``dtype=torch.float16``).
Decoded bytes count the stored float16 CLS + patch values.
Rounds alternate between methods (a noisy machine hits all alike); medians are reported, as wall
GB/s, wall GB/s per core, and GB per CPU-second (all threads of the process). Page cache warm.

Encodings (``--encodings SPEC ...``, ``EncodingConfig.parse`` syntax; ``D`` in ``rank=D/4`` is the
feature dimension): the synthetic cache is recompressed (``dune_cache.commands.recompress``) into each encoding,
once, under ``<cache>.encodings/`` (reused by later runs), and ``CacheReader(backend="auto")`` is timed
on each with float32 and float16 out, and with ``decode=False`` (the stored parts, as DataLoader workers
read them when the decode runs on the GPU), beside plain zarr-python oindex on the float16 cache.
``none`` (the source cache) is always measured. Decoded bytes are still the float16 size of the
targets delivered, whatever the encoding stores. ``--real-caches DIR`` measures ``DIR/<encoding>/train.zarr``
as they are (``none``: ``DIR/none/train.zarr`` or else ``DIR/../train.zarr``), all their teachers.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import dune_cache.read.reader as reader_module

import numpy as np
import torch
import zarr

from dune_cache.encodings import EncodingConfig, encoding_summary
from dune_cache.extract.provenance import build_provenance
from dune_cache.teachers.geometry import Geometry
from dune_cache.images.manifest import ImageManifest
from dune_cache.format.root import teacher_names
from dune_cache.read.backends import BACKENDS, backend_installed
from dune_cache.read.reader import CacheReader
from dune_cache.commands.recompress import RecompressConfig, recompress
from dune_cache.read.shuffle import block_shuffled_order
from dune_cache.format.constants import STATUS_DONE
from dune_cache.format.store import TeacherStore
from dune_cache.config import StorageConfig
from dune_cache.teachers.spec import TeacherSpec

TEACHER = "synthetic_vit"


# ---------------------------------------------------------------------------------------
# Reader throughput
# ---------------------------------------------------------------------------------------
def synthetic_features(rng: np.random.Generator, count: int, grid: int, dim: int,
                       scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ViT-like float16 features: cls ``(count, dim)``, patch ``(count, grid, grid, dim)``."""
    patch = (rng.standard_normal((count, grid, grid, dim), dtype=np.float32) * scale).astype(np.float16)
    return patch.mean(axis=(1, 2)), patch


def build_cache(root: str, images: int, grid: int, dim: int, seed: int = 0) -> None:
    """A complete one-teacher cache at ``root`` laid out as extraction lays it out."""
    spec = TeacherSpec(name=TEACHER, arch="synthetic", patch_size=14, embed_dim=dim)
    manifest = ImageManifest(ids=tuple(f"img{i:08d}.jpg" for i in range(images)), tags=("",) * images, base=None)
    geometry = Geometry(resolution=(grid * 14, grid * 14), grid=(grid, grid), patch_size=14)
    storage = StorageConfig(shard_images=0)
    provenance = build_provenance(spec, None, manifest, "synthetic", geometry, storage)
    store = TeacherStore.create(root, TEACHER, provenance, manifest, (grid, grid), dim, storage)
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.normal(0.0, 1.0, dim)).astype(np.float32)
    scale[:4] = 50.0  # "massive activation" channels
    status = np.full(images, STATUS_DONE, dtype=np.uint8)
    for unit in range(store.num_units):
        lo, hi = unit * store.images_per_unit, min((unit + 1) * store.images_per_unit, images)
        cls, patch = synthetic_features(rng, hi - lo, grid, dim, scale)
        store.write_rows(np.arange(lo, hi), cls, patch)
        store.write_unit_status(unit, status)


def warm_page_cache(root: str) -> None:
    for path in Path(root).rglob("*"):
        if path.is_file():
            path.read_bytes()


def plain_zarr_reader(root: str, teachers: tuple[str, ...] = (TEACHER,)) -> Callable[[np.ndarray], object]:
    arrays = [zarr.open_array(store=f"{root}/{teacher}/{kind}", mode="r") for teacher in teachers
              for kind in ("cls", "patch")]
    return lambda rows: [array.oindex[rows] for array in arrays]


def time_batches(read: Callable[[np.ndarray], object], batches: list[np.ndarray]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all threads) to read ``batches``."""
    wall, cpu = time.perf_counter(), time.process_time()
    for rows in batches:
        read(rows)
    return time.perf_counter() - wall, time.process_time() - cpu


def synthetic_cache(args: argparse.Namespace) -> str:
    """``args.cache`` (or a temporary folder) holding the synthetic cache, built once, read once to warm the page
    cache."""
    root = args.cache or str(Path(tempfile.mkdtemp(prefix="bench_reader_")) / "cache.zarr")
    if not Path(root, TEACHER).exists():
        print(f"building {args.images} x {args.grid}x{args.grid}x{args.dim} float16 cache at {root} ...")
        build_cache(root, args.images, args.grid, args.dim)
    warm_page_cache(root)
    return root


def bench_reader(args: argparse.Namespace) -> None:
    root = synthetic_cache(args)
    methods: dict[str, Callable[[np.ndarray], object]] = {"zarr-python oindex (baseline)": plain_zarr_reader(root)}
    for backend in BACKENDS:
        if not backend_installed(backend):
            print(f"backend {backend} not installed")
            continue
        for dtype in (torch.float32, torch.float16):
            reader = CacheReader(root, [TEACHER], backend=backend, dtype=dtype)
            methods[f"CacheReader {backend}, {str(dtype).removeprefix('torch.')} out"] = reader.read
    images = zarr.open_array(store=f"{root}/{TEACHER}/patch", mode="r").shape[0]
    per_sample = (args.dim + args.grid * args.grid * args.dim) * 2
    rng = np.random.default_rng(1)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    for name, read in methods.items():  # warm-up (opens, thread pools)
        read(rng.choice(images, args.batch, replace=False))
    for _ in range(args.rounds):
        batches = [rng.choice(images, args.batch, replace=False) for _ in range(args.batches)]
        for name, read in methods.items():
            results[name].append(time_batches(read, batches))
    cores = len(os.sched_getaffinity(0))
    total = per_sample * args.batch * args.batches / 1e9
    base = None
    print(f"\n{cores} cores, batch {args.batch}, {args.batches} batches x {args.rounds} rounds, "
          f"{per_sample / 2**20:.2f} MiB decoded per sample\n")
    print("| method | GB/s | GB/s per core | GB per CPU-s | vs baseline |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        gbps = statistics.median(total / wall for wall, _ in runs)
        per_cpu = statistics.median(total / cpu for _, cpu in runs)
        base = base or gbps
        print(f"| {name} | {gbps:.2f} | {gbps / cores:.2f} | {per_cpu:.2f} | {gbps / base:.1f}x |")


# ---------------------------------------------------------------------------------------
# What the check for damaged targets costs
# ---------------------------------------------------------------------------------------
def no_check(values: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(values), dtype=torch.bool)


def every_value(values: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(values.flatten(1)).all(dim=1)


DAMAGE_CHECKS = {"off": no_check, "one value per image (shipped)": reader_module.unwritten_rows,
                 "every value": every_value}


def with_check(read: Callable[[np.ndarray], object], check: Callable) -> Callable[[np.ndarray], object]:
    """``read`` with ``dune_cache.read.reader.unwritten_rows`` swapped for ``check`` while it runs."""
    def checked(rows: np.ndarray) -> object:
        shipped, reader_module.unwritten_rows = reader_module.unwritten_rows, check
        try:
            return read(rows)
        finally:
            reader_module.unwritten_rows = shipped
    return checked


def bench_damage_check(args: argparse.Namespace) -> None:
    root = synthetic_cache(args)
    methods: dict[tuple[str, str], Callable[[np.ndarray], object]] = {}
    for dtype in (torch.float32, torch.float16):
        backend = reader_module.resolve_backend("auto", dtype)
        reader = CacheReader(root, [TEACHER], backend=backend, dtype=dtype)
        for check_name, check in DAMAGE_CHECKS.items():
            methods[f"{backend}, {str(dtype).removeprefix('torch.')} out", check_name] = with_check(reader.read, check)
    images = zarr.open_array(store=f"{root}/{TEACHER}/patch", mode="r").shape[0]
    total = (args.dim + args.grid * args.grid * args.dim) * 2 * args.batch * args.batches / 1e9
    rng = np.random.default_rng(1)
    cpu: dict[tuple[str, str], list[float]] = {key: [] for key in methods}
    for read in methods.values():
        read(rng.choice(images, args.batch, replace=False))
    for _ in range(args.rounds):
        batches = [rng.choice(images, args.batch, replace=False) for _ in range(args.batches)]
        for key, read in methods.items():
            cpu[key].append(time_batches(read, batches)[1])
    print(f"\nbatch {args.batch}, {args.batches} batches x {args.rounds} rounds, page cache warm; CPU-seconds of all "
          "threads, medians\n")
    print("| reader | check | GB per CPU-s | CPU vs check off |")
    print("|---|---|---|---|")
    for (reader_name, check_name), runs in cpu.items():
        ratio = statistics.median(run / off for run, off in zip(runs, cpu[reader_name, "off"]))  # round by round
        print(f"| {reader_name} | {check_name} | {total / statistics.median(runs):.2f} | {100 * (ratio - 1):+.1f}% |")


# ---------------------------------------------------------------------------------------
# Reader throughput per encoding
# ---------------------------------------------------------------------------------------
def resolve_spec(text: str, dim: int) -> str:
    """``text`` with ``D`` (``rank=D``, ``rank=D/4``) replaced by ``dim`` (``D/4`` kept as a note)."""
    resolved = re.sub(r"=D(?:/(\d+))?\b", lambda m: f"={dim // int(m.group(1) or 1)}", text)
    return resolved if resolved == text else f"{resolved} ({text.partition(':')[2]})"


def encoded_cache(root: str, config: EncodingConfig) -> str:
    """``root`` recompressed into ``config``, kept at ``<root>.encodings/<config>.zarr`` (made once: written
    to a temporary folder, renamed when complete)."""
    if config.name == "none":
        return root
    out = Path(f"{root.rstrip('/')}.encodings") / (re.sub(r"[^A-Za-z0-9.-]+", "_", str(config)) + ".zarr")
    if not out.exists():
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        recompress(RecompressConfig(cache=root, out=str(partial), encoding=config, progress=False))
        partial.rename(out)
        print(f"recompressed into {config} in {time.perf_counter() - start:.0f} s: {out}")
    return str(out)


def real_caches(folder: str) -> dict[str, str]:
    """``{encoding folder name: cache root}`` of ``folder/<name>/train.zarr``; ``none`` first."""
    base = Path(folder)
    found = {p.parent.name: str(p) for p in sorted(base.glob("*/train.zarr"))}
    if "none" not in found and (base.parent / "train.zarr").exists():
        found["none"] = str(base.parent / "train.zarr")
    if "none" not in found:
        raise SystemExit(f"{folder}: no none/train.zarr nor ../train.zarr to compare with")
    return {"none": found.pop("none"), **found}


def stored_bytes(root: str) -> int:
    """Stored bytes of every teacher group of ``root`` (features, encoding parts, calibration arrays)."""
    return sum(TeacherStore.open(root, name, mode="r").nbytes_stored() for name in teacher_names(root))


def bench_encoded(title: str, caches: dict[str, str], args: argparse.Namespace) -> None:
    """Time ``CacheReader(backend="auto")`` on each of ``caches`` (``{label: root}``, ``none`` first) beside
    plain zarr-python oindex on the ``none`` one, rounds alternating, and print a markdown table."""
    for root in caches.values():
        warm_page_cache(root)
    reference = CacheReader(caches["none"])
    teachers = tuple(reference.teachers)
    per_sample = sum(2 * reference.dims[t] * (1 + int(np.prod(reference.grids[t]))) for t in teachers)
    images = len(reference)
    batch = min(args.batch, images)
    sizes = {label: stored_bytes(root) for label, root in caches.items()}
    print(f"\n{title}: {images} images, teachers {', '.join(teachers)}, "
          f"{per_sample / 2**20:.3f} MiB of float16 targets per sample")
    for label, root in caches.items():
        reader = CacheReader(root)
        print(f"  {label}: {sizes[label] / 1e6:.1f} MB stored ({sizes['none'] / sizes[label]:.2f}x smaller than none); "
              + "; ".join(f"{t}: {encoding_summary(reader.provenance[t]['storage'].get('encoding'))}"
                          for t in reader.teachers))
    # (label, out, method): out is "fp32", "fp16" or "fp16 parts" (read(decode=False))
    methods: list[tuple[str, str, str, Callable[[np.ndarray], object]]] = [
        ("none", "fp16", "zarr-python oindex", plain_zarr_reader(caches["none"], teachers))]
    for label, root in caches.items():
        for out, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            reader = CacheReader(root, teachers, backend="auto", dtype=dtype)
            methods.append((label, out, f"CacheReader auto ({reader.backend})", reader.read))
        reader = CacheReader(root, teachers, backend="auto", dtype=torch.float16)
        if not all(reader.encodings[t].passthrough for t in teachers):
            methods.append((label, "fp16 parts", f"CacheReader auto ({reader.backend}), decode=False",
                            lambda rows, read=reader.read: read(rows, decode=False)))
    rng = np.random.default_rng(1)
    results: list[list[tuple[float, float]]] = [[] for _ in methods]
    for *_, read in methods:  # warm-up (opens, thread pools, calibration arrays)
        read(rng.choice(images, batch, replace=False))
    for _ in range(args.rounds):
        batches = [rng.choice(images, batch, replace=False) for _ in range(args.batches)]
        for runs, (*_, read) in zip(results, methods):
            runs.append(time_batches(read, batches))
    total = per_sample * batch * args.batches / 1e9
    medians = [(statistics.median(total / wall for wall, _ in runs), statistics.median(total / cpu for _, cpu in runs))
               for runs in results]
    base = medians[0][0]
    of_none = {out: medians[i] for i, (label, out, method, _) in enumerate(methods)
               if label == "none" and method.startswith("CacheReader")}
    of_none["fp16 parts"] = of_none["fp16"]
    cores = len(os.sched_getaffinity(0))
    print(f"\n{cores} cores, load average {os.getloadavg()[0]:.1f} at the end, batch {batch}, "
          f"{args.batches} batches x {args.rounds} rounds, medians\n")
    print("| encoding | stored (÷ none) | out | method | GB/s | GB per CPU-s | cores for 4 GB/s | vs none GB/s "
          "| vs none GB/CPU-s | vs zarr-python GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (label, out, method, _), (gbps, per_cpu) in zip(methods, medians):
        none_gbps, none_cpu = of_none[out] if method.startswith("CacheReader") else (gbps, per_cpu)
        print(f"| {label} | {sizes[label] / 1e6:.0f} MB ({sizes['none'] / sizes[label]:.2f}x) | {out} | {method} "
              f"| {gbps:.2f} | {per_cpu:.2f} | {4 / per_cpu:.1f} | {gbps / none_gbps:.2f}x | {per_cpu / none_cpu:.2f}x "
              f"| {gbps / base:.1f}x |")


def bench_encodings(args: argparse.Namespace) -> None:
    if args.encodings:
        root = args.cache or str(Path(tempfile.mkdtemp(prefix="bench_reader_")) / "cache.zarr")
        if not Path(root, TEACHER).exists():
            print(f"building {args.images} x {args.grid}x{args.grid}x{args.dim} float16 cache at {root} ...")
            build_cache(root, args.images, args.grid, args.dim)
        dim = zarr.open_array(store=f"{root}/{TEACHER}/patch", mode="r").shape[-1]
        specs = ["none"] + [spec for spec in args.encodings if spec != "none"]
        labels = [resolve_spec(spec, dim) for spec in specs]
        caches = {label: encoded_cache(root, EncodingConfig.parse(label.partition(" ")[0])) for label in labels}
        bench_encoded(f"synthetic cache {root}", caches, args)
    if args.real_caches:
        bench_encoded(f"real caches {args.real_caches}", real_caches(args.real_caches), args)


# ---------------------------------------------------------------------------------------
# Shuffle quality
# ---------------------------------------------------------------------------------------
def mean_distinct(labels: np.ndarray) -> float:
    """Mean number of distinct values per row of ``labels`` ``(rows, batch)``."""
    ordered = np.sort(labels, axis=1)
    return float((1 + (np.diff(ordered, axis=1) != 0).sum(axis=1)).mean())


def shuffle_quality(order: np.ndarray, block: int, batch: int, classes: int) -> dict[str, float]:
    """Statistics of a permutation ``order`` ``(n,)`` of storage indices."""
    n = len(order)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    usable = n // batch * batch
    batches = order[:usable].reshape(-1, batch)
    return {
        "spearman": float(np.corrcoef(np.arange(n), position)[0, 1]),
        "jump": float(np.abs(np.diff(order)).mean() / (n / 3)),
        "blocks": mean_distinct(batches // block),
        "classes": mean_distinct(batches * classes // n),
    }


def bench_shuffle(args: argparse.Namespace) -> None:
    n, batch, classes, block = args.n, args.batch, 1000, args.block
    print(f"n={n}, batch {batch}, storage sorted by class ({classes} classes); "
          f"distinct blocks counted in units of {block}\n")
    print("| order | block | buffer | Spearman ρ(position, index) | mean |Δindex| / (n/3) "
          f"| distinct {block}-blocks per batch | distinct classes per batch |")
    print("|---|---|---|---|---|---|---|")
    rows = [("full permutation", 1, n)] + [("block + buffer", b, s) for b in (args.block, 4 * args.block)
                                           for s in (1024, 8192, 65536) if s < n]
    for label, b, s in rows:
        q = shuffle_quality(block_shuffled_order(n, b, s, seed=0, epoch=0), block, batch, classes)
        print(f"| {label} | {b} | {s} | {q['spearman']:+.4f} | {q['jump']:.3f} | {q['blocks']:.1f} "
              f"| {q['classes']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", help="Reuse (or build once at) this cache root.")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=4, help="Batches per round.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--encodings", nargs="+", metavar="SPEC",
                        help="Encodings (NAME[:key=value,...]; D = feature dim, e.g. pca:rank=D/4) to recompress "
                             "the cache into and read side by side with none.")
    parser.add_argument("--real-caches", metavar="DIR",
                        help="Read DIR/<encoding>/train.zarr side by side (none: DIR/none or DIR/../train.zarr).")
    parser.add_argument("--shuffle-quality", action="store_true", help="Measure the shuffle instead of the reader.")
    parser.add_argument("--damage-check", action="store_true", help="Measure the reader's check for damaged targets.")
    parser.add_argument("--n", type=int, default=100_000, help="Samples for --shuffle-quality.")
    parser.add_argument("--block", type=int, default=64, help="Block size for --shuffle-quality.")
    args = parser.parse_args()
    if args.shuffle_quality:
        bench_shuffle(args)
    elif args.damage_check:
        bench_damage_check(args)
    elif args.encodings or args.real_caches:
        bench_encodings(args)
    else:
        bench_reader(args)


if __name__ == "__main__":
    main()
