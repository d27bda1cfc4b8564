"""Feature encodings on real caches: the size/fidelity frontier, speed per core, and what they do to a student.

Frontier (feature level, no training; the bench of issue 12)::

    OMP_NUM_THREADS=1 python tools/bench_encodings.py frontier --calib calib-448.zarr --eval eval-448.zarr \
        --teachers dinov2_vits14 mobilenet_v2 --json docs/results/bench_encodings_frontier_448.json

Each encoding (``NAME[:key=value,...]`` as ``--encoding``) is calibrated on the ``--calib`` cache (its
``calibration_images`` done images spread evenly, as extraction does) and measured on every done image of the
``--eval`` cache (other images: a global basis is judged on images it was not fitted on):

- bytes per image of CLS + patch tokens as a store holds them (each part written, one chunk per image, with the
  default storage's compressors: blosc-zstd 5 + crc32c), their ratio to raw float16, and the calibration arrays'
  bytes (once per group);
- patch-token fidelity: cosine of each token with its decoded self (mean, 0.1% quantile, minimum) and relative L2;
- CPU per core (run it with ``OMP_NUM_THREADS=1``; torch is limited to one thread): encode MB/s (numpy, the
  writer's work) and decode MB/s (torch), MB of float16 patch tokens; and the training path with
  ``decode=False``: samples per CPU-second that read and decompress their stored parts (random batches of 32
  images through the reader's backend, ``--backend``, tensorstore by default), which is the DataLoader worker's share
  once decoding runs on the training device.

Student (needs the caches of ``tools/e2e_cached_vs_live.py``)::

    python tools/bench_encodings.py student --work e2e --steps 150 --json encodings_report.json

- the train cache is recompressed into ``<work>/encodings/<encoding>/train.zarr`` (``none``: the fp16
  cache itself) and ``dune-cache info``'s bytes per image and ratio to raw float16 are read;
- encode and decode MB/s per core on the first 64 train images; token cosine on the held-out cache's images;
- a student trained on the recompressed cache (same seed, steps, images and settings as the one trained on
  the fp16 cache) evaluated against the fp16 held-out cache: fidelity and its ratio to the fp16-trained one's.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from dune_cache.read.backends import BACKEND_FACTORIES
from dune_cache.encodings import Encoding, EncodingConfig, calibration_indices
from dune_cache.encodings.base import token_cosines as cosine_per_token
from dune_cache.commands.info import cache_info
from dune_cache.format.layout import part_compressors
from dune_cache.commands.recompress import RecompressConfig, recompress
from dune_cache.format.constants import STATUS_DONE
from dune_cache.format.store import TeacherStore
from dune_cache.config import StorageConfig
from dune_student.config import load_config
from dune_student.evaluation.fidelity import evaluate
from dune_student.training.trainer import train

DEFAULT_ENCODINGS = ["none", "bitround", "int8-channel", "int8-token", "pca", "pca:variance=0.95"]
SPEED_IMAGES = 64
TARGET_RATIO, TARGET_FIDELITY = 3.0, 0.995


def slug(encoding: str) -> str:
    return encoding.replace(":", "_").replace(",", "_").replace("=", "")


def encoded_cache(args: argparse.Namespace, encoding: str) -> Path:
    """The train cache stored with ``encoding`` (recompressed afresh; ``none``: the fp16 cache itself)."""
    if encoding == "none":
        return args.work / "train.zarr"
    out = args.work / "encodings" / slug(encoding) / "train.zarr"
    recompress(RecompressConfig(cache=str(args.work / "train.zarr"), out=str(out), teachers=args.teachers,
                                encoding=EncodingConfig.parse(encoding), overwrite=True,
                                progress=args.progress == "true"))
    return out


def features(cache: Path, teacher: str, images: int | None = None) -> dict[str, np.ndarray]:
    """Decoded float32 ``cls`` ``(n, D)`` and ``patch`` ``(n, h, w, D)`` of the first ``images`` done images."""
    store = TeacherStore.open(str(cache), teacher)
    done = np.flatnonzero(store.read_status() == STATUS_DONE)[:images]
    return {kind: store.read_features(kind, done) for kind in ("cls", "patch")}


def best_seconds(run, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def speed(source: str, cache: str, teacher: str) -> dict[str, float]:
    """Encode/decode MB/s (float16 MB) of the group's encoding on one core; runs in a fresh process."""
    import torch

    torch.set_num_threads(1)
    encoding = TeacherStore.open(cache, teacher).encoding
    x = features(Path(source), teacher, SPEED_IMAGES)["patch"]
    megabytes = x.size * 2 / 1e6
    parts = encoding.encode("patch", x)
    tensors = {k: torch.from_numpy(v) for k, v in parts.items()}
    return {"encode_mb_s": megabytes / best_seconds(lambda: encoding.encode("patch", x)),
            "decode_mb_s": megabytes / best_seconds(lambda: encoding.decode("patch", tensors, "cpu"))}


def one_core_speed(source: Path, cache: Path, teacher: str) -> dict[str, float]:
    """:func:`speed` in a spawned process whose BLAS and OpenMP pools have one thread."""
    limits = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    saved = {name: os.environ.get(name) for name in limits}
    os.environ.update(limits)
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(speed, str(source), str(cache), teacher).result()
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def massive_channels(args: argparse.Namespace, teacher: str) -> np.ndarray:
    """Channels the ``int8-token`` calibration of the train cache flags as massive activations."""
    x = features(args.work / "train.zarr", teacher)
    pick = np.unique(np.linspace(0, len(x["patch"]) - 1, 64).round().astype(int))
    encoding = Encoding.calibrate(EncodingConfig(name="int8-token"), x["patch"].shape[-1], "float16",
                                  {kind: values[pick] for kind, values in x.items()})
    return encoding.schemes["patch"].arrays["outlier_channels"]


def token_cosines(encoding: Encoding, heldout: np.ndarray, normal: np.ndarray) -> dict[str, float]:
    """Cosine of held-out patch tokens ``(n, h, w, D)`` with their encoded-decoded selves: mean and 0.1%
    quantile, over all channels and over the ``normal`` ones."""
    back = encoding.decode_numpy("patch", encoding.encode("patch", heldout)).reshape(-1, heldout.shape[-1])
    x = heldout.reshape(-1, heldout.shape[-1]).astype(np.float64)
    out = {}
    for label, channels in (("all", slice(None)), ("normal", normal)):
        a, b = x[:, channels], back[:, channels]
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        out[f"cos_{label}_mean"], out[f"cos_{label}_p001"] = float(cos.mean()), float(np.quantile(cos, 0.001))
    return out


def student(args: argparse.Namespace, cache: Path, encoding: str) -> dict:
    """Train on ``cache`` and evaluate on the fp16 held-out cache (settings of tools/e2e_cached_vs_live.py)."""
    out = args.work / "encodings" / slug(encoding) / f"run_{args.steps}"
    overrides = [f"data.cache={cache}", f"data.images={args.work / 'train'}", f"out={out}", f"steps={args.steps}",
                 f"student.arch={args.arch}", f"student.patch_size={args.patch}", f"student.img_size={args.resolution}",
                 f"data.resolution={args.resolution}", f"data.batch_size={args.batch_size}",
                 f"optim.base_lr={args.base_lr}", f"seed={args.seed}", f"checkpoint_every={args.steps}",
                 "log_every=10", f"progress={args.progress}"]
    shutil.rmtree(out, ignore_errors=True)  # the bench's own scratch run: always trained afresh
    train(load_config(None, overrides))
    return evaluate(out / "checkpoint.pt", str(args.work / "heldout.zarr"), str(args.work / "heldout"), batch_size=32)


def measure(args: argparse.Namespace, encoding: str, normal: dict[str, np.ndarray],
            heldout: dict[str, np.ndarray]) -> dict:
    cache = encoded_cache(args, encoding)
    info = cache_info(str(cache))
    row = {"encoding": encoding, "cache": str(cache), "teachers": {}}
    for teacher in args.teachers:
        stored = TeacherStore.open(str(cache), teacher).encoding
        row["teachers"][teacher] = {
            "bytes_per_image": info[teacher]["bytes_per_image"], "ratio_vs_fp16": info[teacher]["compression_ratio"],
            "encoding": info[teacher]["encoding"],
            **one_core_speed(args.work / "train.zarr", cache, teacher),
            **token_cosines(stored, heldout[teacher], normal[teacher])}
    row["fidelity"] = student(args, cache, encoding)
    return row


def table(rows: list[dict], teachers: list[str]) -> str:
    """Markdown: one line per encoding and teacher; fidelity as value (ratio to the fp16-trained student)."""
    base = next(r for r in rows if r["encoding"] == "none")["fidelity"]
    lines = ["| encoding | teacher | KiB/image | ratio vs fp16 | encode MB/s | decode MB/s "
             "| token cos mean / p0.1 (all) "
             "| token cos mean / p0.1 (normal ch.) | student patch fidelity | student CLS fidelity |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for t in teachers:
            m, f = r["teachers"][t], r["fidelity"][t]
            fid = {k: "—" if f[k] is None else f"{f[k]:.4f} ({f[k] / base[t][k]:.4f})" for k in ("patch", "cls")}
            lines.append(f"| {r['encoding']} | {t} | {m['bytes_per_image'] / 1024:.1f} | {m['ratio_vs_fp16']:.2f}x "
                         f"| {m['encode_mb_s']:.0f} | {m['decode_mb_s']:.0f} "
                         f"| {m['cos_all_mean']:.5f} / {m['cos_all_p001']:.4f} "
                         f"| {m['cos_normal_mean']:.5f} / {m['cos_normal_p001']:.4f} | {fid['patch']} | {fid['cls']} |")
    return "\n".join(lines)


def meets_target(row: dict, base: dict, teachers: list[str]) -> bool:
    """>= 3x smaller than raw float16 and every fidelity within 0.5% of the fp16-trained student's."""
    small = all(row["teachers"][t]["ratio_vs_fp16"] >= TARGET_RATIO for t in teachers)
    close = all(row["fidelity"][t][k] / base[t][k] >= TARGET_FIDELITY for t in teachers for k in ("patch", "cls")
                if base[t][k] is not None)
    return small and close


# ---------------------------------------------------------------------------------------
# Frontier: size, fidelity and CPU per core on real features (issue 12)
# ---------------------------------------------------------------------------------------
FRONTIER_ENCODINGS = ["none", "bitround", "int8-channel", "int8-token", "pca:variance=0.95", "pca:variance=0.97",
                      "pca-int8:rank=64", "pca-int8:rank=128", "pca-int8:variance=0.99",
                      "lowrank:image_rank=8", "lowrank:image_rank=16", "lowrank:image_rank=24",
                      "lowrank:image_rank=32", "lowrank:image_rank=48", "lowrank:image_rank=64",
                      *(f"lowrank:image_rank={k},basis=int8" for k in (24, 32, 48, 64))]
READ_BATCH, READ_BATCHES = 32, 8  # random batches timed for the training-path cost


def calibrated(config: EncodingConfig, calib: TeacherStore) -> Encoding:
    """``config`` calibrated on ``calibration_images`` done images of ``calib`` spread evenly (as extraction)."""
    if not config.needs_calibration:
        return Encoding.calibrate(config, calib.dim, "float16")
    done = np.flatnonzero(calib.read_status() == STATUS_DONE)
    rows = done[calibration_indices(len(done), config.calibration_images)]
    return Encoding.calibrate(config, calib.dim, "float16", {k: calib.read_features(k, rows) for k in ("cls", "patch")})


def write_parts(group, encoding: Encoding, kind: str, parts: dict[str, np.ndarray], grid: tuple[int, ...]) -> list:
    """Each part of ``kind`` written as the store lays it out (one chunk per image, the default storage's
    compressors); returns the arrays."""
    storage = StorageConfig(shard_images=0)
    arrays = []
    for part in encoding.parts(kind):
        values = parts[part.suffix]
        array = group.create_array(kind + part.suffix, shape=values.shape, chunks=part.stored_shape((1,), grid),
                                   dtype=part.dtype, fill_value=part.fill,
                                   compressors=part_compressors(storage, part.dtype))
        array[...] = values
        arrays.append(array)
    return arrays


def stored_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and f.name != "zarr.json")


def read_cost(arrays: list, n: int, backend: str) -> float:
    """Samples per CPU-second (the whole process: the backend's threads count) that read and decompress every
    part of random batches of :data:`READ_BATCH` single images through the reader's ``backend``, as a
    DataLoader worker does with ``decode=False`` (cached in RAM: the page cache holds the freshly written
    chunks, so this is the CPU, not the disk)."""
    io = BACKEND_FACTORIES[backend]()
    handles = [io.open(str(array.store.root / array.path), None) for array in arrays]
    batches = np.random.default_rng(0).integers(0, n, (READ_BATCHES, READ_BATCH))
    io.read([(h, (batches[0],)) for h in handles])  # open files and warm the caches once
    start = time.process_time()
    for rows in batches:
        io.read([(h, (rows,)) for h in handles])
    return READ_BATCHES * READ_BATCH / (time.process_time() - start)


def cpu_seconds(run, repeats: int = 3) -> float:
    """Least CPU-seconds of ``repeats`` runs of ``run()``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return best


def fidelity(x: np.ndarray, back: np.ndarray) -> dict[str, float]:
    """Token cosine mean / 0.1% quantile / minimum and relative L2 of decoded ``back`` against ``x``."""
    cos = cosine_per_token(x, back)
    x64 = x.astype(np.float64)
    return {"cos_mean": float(cos.mean()), "cos_p001": float(np.quantile(cos, 0.001)), "cos_min": float(cos.min()),
            "rel_l2": float(np.linalg.norm(back - x64) / np.linalg.norm(x64))}


def frontier_row(text: str, calib: TeacherStore, x: dict[str, np.ndarray], scratch: Path, backend: str) -> dict:
    """Every frontier measurement of encoding ``text`` on eval features ``x`` (``cls`` ``(n, D)``, ``patch``
    ``(n, h, w, D)`` float16)."""
    import torch
    import zarr

    encoding = calibrated(EncodingConfig.parse(text), calib)
    n, grid = len(x["patch"]), x["patch"].shape[1:3]
    parts = {kind: encoding.encode(kind, x[kind]) for kind in ("cls", "patch")}
    root = scratch / slug(text)
    shutil.rmtree(root, ignore_errors=True)
    group = zarr.open_group(str(root), mode="w")
    arrays = [a for kind in ("cls", "patch") for a in write_parts(group, encoding, kind, parts[kind],
                                                                   grid if kind == "patch" else ())]
    image_bytes = stored_bytes(root) / n
    raw = (x["cls"].size + x["patch"].size) * 2 / n
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in parts["patch"].items()}
    megabytes = x["patch"].size * 2 / 1e6
    back = encoding.decode("patch", tensors, "cpu").numpy()
    calibration = sum(v.nbytes for v in encoding.arrays().values())
    return {"encoding": text, "bytes_per_image": image_bytes, "ratio_vs_fp16": raw / image_bytes,
            "calibration_bytes": calibration, "calibration": encoding.to_json()["kinds"]["patch"],
            **fidelity(x["patch"], back),
            "encode_mb_s": megabytes / cpu_seconds(lambda: encoding.encode("patch", x["patch"])),
            "decode_mb_s": megabytes / cpu_seconds(lambda: encoding.decode("patch", tensors, "cpu")),
            "read_parts_per_cpu_s": read_cost(arrays, n, backend)}


def frontier_table(rows: dict[str, list[dict]]) -> str:
    lines = ["| teacher | encoding | KiB/image | ratio vs fp16 | token cos mean / p0.1 / min | rel. L2 | encode MB/s "
             "| decode MB/s | `decode=False` reads / CPU-s |", "|---|---|---|---|---|---|---|---|---|"]
    for teacher, measured in rows.items():
        for r in measured:
            lines.append(f"| {teacher} | {r['encoding']} | {r['bytes_per_image'] / 1024:.1f} "
                         f"| {r['ratio_vs_fp16']:.2f}x "
                         f"| {r['cos_mean']:.4f} / {r['cos_p001']:.4f} / {r['cos_min']:.3f} | {r['rel_l2']:.4f} "
                         f"| {r['encode_mb_s']:.0f} | {r['decode_mb_s']:.0f} | {r['read_parts_per_cpu_s']:.0f} |")
    return "\n".join(lines)


def frontier(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    rows: dict[str, list[dict]] = {}
    for teacher in args.teachers:
        calib, held = TeacherStore.open(str(args.calib), teacher), TeacherStore.open(str(args.eval), teacher)
        done = np.flatnonzero(held.read_status() == STATUS_DONE)
        x = {kind: held.read_features(kind, done).astype(np.float16) for kind in ("cls", "patch")}
        rows[teacher] = []
        for text in args.encodings:
            rows[teacher].append(frontier_row(text, calib, x, args.scratch / teacher, args.backend))
            logging.info("%s %s: %s", teacher, text, {k: v for k, v in rows[teacher][-1].items() if k != "calibration"})
        shutil.rmtree(args.scratch / teacher, ignore_errors=True)
    print(frontier_table(rows))
    if args.json:
        config = {k: str(v) for k, v in vars(args).items() if k != "run"}
        threads = {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        args.json.write_text(json.dumps({"config": config, "threads": threads, "rows": rows}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    front = modes.add_parser("frontier", help="size / fidelity / CPU of each encoding on real features")
    front.add_argument("--calib", type=Path, required=True, help="cache whose images calibrate the encodings")
    front.add_argument("--eval", type=Path, required=True, help="cache whose images are measured")
    front.add_argument("--teachers", nargs="+", default=["dinov2_vits14"])
    front.add_argument("--encodings", nargs="+", default=FRONTIER_ENCODINGS)
    front.add_argument("--scratch", type=Path, default=Path("/tmp/bench_encodings"))
    front.add_argument("--backend", default="tensorstore", help="reader backend of the decode=False read cost")
    front.add_argument("--json", type=Path)
    front.set_defaults(run=frontier)
    parser_student = modes.add_parser("student", help="students trained on recompressed caches (e2e caches)")
    add_student_arguments(parser_student)
    parser_student.set_defaults(run=student_mode)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.run(args)


def add_student_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", type=Path, default=Path("e2e"))
    parser.add_argument("--teachers", nargs="+", default=["dinov2_vits14", "mobilenet_v2"])
    parser.add_argument("--encodings", nargs="+", default=DEFAULT_ENCODINGS)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--arch", default="vit_tiny")
    parser.add_argument("--patch", type=int, default=14)
    parser.add_argument("--resolution", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--base-lr", type=float, default=0.002)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", default="false")
    parser.add_argument("--json", type=Path)


def student_mode(args: argparse.Namespace) -> None:
    encodings = ["none", *[e for e in args.encodings if e != "none"]]  # the fp16 baseline is always run
    normal = {t: np.setdiff1d(np.arange(TeacherStore.open(str(args.work / "train.zarr"), t).dim),
                              massive_channels(args, t)) for t in args.teachers}
    heldout = {t: features(args.work / "heldout.zarr", t)["patch"] for t in args.teachers}
    rows = [measure(args, encoding, normal, heldout) for encoding in encodings]
    base = rows[0]["fidelity"]
    report = {"config": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
              "meets_target": [r["encoding"] for r in rows[1:] if meets_target(r, base, args.teachers)]}
    print(table(rows, args.teachers))
    print(f"\n>= {TARGET_RATIO:g}x smaller and student fidelity within {100 * (1 - TARGET_FIDELITY):.1f}% of fp16: "
          f"{', '.join(report['meets_target']) or 'none'}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
