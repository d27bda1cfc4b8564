"""Feature encodings on real caches: size, speed, token fidelity and what they do to a distilled student.

    python tools/bench_encodings.py --work e2e --steps 150 --json encodings_report.json
    python tools/bench_encodings.py --work e2e --steps 20 --encodings none int8-token    # smoke run

Needs the caches of ``tools/e2e_cached_vs_live.py`` (``<work>/train.zarr``, ``<work>/heldout.zarr`` with
the real DINOv2 ViT-S/14 and MobileNetV2 groups, and the ``<work>/train``, ``<work>/heldout`` image
folders). For each encoding (``NAME[:key=value,...]``, as ``dune-cache recompress --encoding``):

- the train cache is recompressed into ``<work>/encodings/<encoding>/train.zarr`` (``none``: the fp16
  cache itself; runs of the bench replace what an earlier one left there) and ``dune-cache info``'s bytes per image and ratio to raw float16 are read;
- encode and decode MB/s per core (MB of float16 features; one thread: numpy/BLAS and torch limited to
  one thread in a fresh process) on the first 64 train images;
- token cosine similarity on the held-out cache's images, encoded with the train cache's calibration:
  mean and 0.1% quantile over tokens, over all channels and over the non-outlier channels (those the
  ``int8-token`` calibration of the train cache does not flag as massive);
- a student trained on the recompressed cache (same seed, steps, images and settings as the one trained on
  the fp16 cache; ``dune_student.train`` as ``tools/e2e_cached_vs_live.py`` runs it) evaluated against the
  fp16 held-out cache: fidelity and its ratio to the fp16-trained student's.

Prints a markdown table and the encodings meeting the target (>= 3x smaller than raw float16, student
fidelity within 0.5% of the fp16-trained student's for every teacher), and writes JSON with ``--json``.
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

from dune_cache.encodings import Encoding, EncodingConfig
from dune_cache.inspect import cache_info
from dune_cache.recompress import RecompressConfig, recompress
from dune_cache.store import STATUS_DONE, TeacherStore
from dune_student.config import load_config
from dune_student.evaluate import evaluate
from dune_student.train import train

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
    lines = ["| encoding | teacher | KiB/image | ratio vs fp16 | encode MB/s | decode MB/s | token cos mean / p0.1 (all) "
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
