"""Product quantisation (PQ) of real patch tokens against the ``lowrank`` ``basis=int8`` frontier (issue 12).

A measurement, not an encoding: nothing here is built into ``dune_cache``. From the repository root::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 python tools/bench_pq.py \\
        --calib /tmp/enc/calib-448.zarr --eval /tmp/enc/eval-448.zarr --json docs/results/bench_pq_448.json

Standard PQ: the patch tokens of one teacher group (``dinov2_vits14``, D = 384) are centred on the calibration
mean (variant ``centred``; ``standardised`` also divides each channel by its calibration standard deviation;
``rotated`` multiplies the centred tokens by one seeded random orthogonal matrix, OPQ without the optimisation),
split into ``m`` contiguous sub-vectors of ``D/m`` channels, and each sub-vector replaced by the index (uint8) of
the nearest of 256 centroids of its sub-space. The codebooks are fitted by k-means (numpy, Lloyd's iterations
from seeded random tokens, all sub-spaces at once) on the calibration cache's patch tokens (every done image,
subsampled to ``--fit-tokens``) and applied to the eval cache's images, which they were not fitted on.

Bytes per image: as the frontier of ``tools/bench_encodings.py`` counts them -- the codes ``(h, w, m)`` uint8 and
the CLS token as float16 (``lowrank`` keeps CLS the same way, ``cls_scheme = "none"``) written one chunk per
image with the default storage's compressors (blosc-zstd 5 + crc32c), zarr.json excluded; ratio to raw float16
``(1 + h·w)·D·2``. Also reported: the raw codes (``m·h·w + 2·D`` bytes) and numcodecs ``Zstd(level=3)`` of each
image's code array. The codebooks (``256·D`` float32 per variant and m, 384 KiB, plus mean/scale/rotation) are
calibration arrays paid once per group, not per image, and are left out as the frontier leaves out its own.

Fidelity: ``fidelity`` of ``tools/bench_encodings.py`` (token cosine mean / 0.1% quantile / minimum and relative
L2 of the decoded patch tokens against the float16 ones), imported, not copied. CPU: ``time.process_time`` with
one thread: the fit once, the assignment (encode) and the codebook lookup (decode) per eval image.

Each row is compared with the ``lowrank:…,basis=int8`` points on DINOv2-S at 448 px: ranks 24/32/48/64 from
``docs/results/bench_encodings_frontier_448.json`` and ranks 4–16, 56, 60 from
``docs/results/bench_lowrank_extra_ranks_448.json`` (``--frontier``): p0.1 at the PQ row's ratio interpolated
linearly in ratio between the two neighbouring points (none outside their range), and every measured DINOv2-S
frontier row (all encodings of that JSON, and the extra ranks) with both a higher ratio and a higher p0.1
(``dominated_by``): a PQ row wins a place on the frontier only if that list is empty.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encodings import fidelity, stored_bytes  # noqa: E402

from dune_cache.format.layout import part_compressors  # noqa: E402
from dune_cache.format.constants import STATUS_DONE  # noqa: E402
from dune_cache.format.store import TeacherStore
from dune_cache.config import StorageConfig

CENTROIDS = 256
def done_features(cache: Path, teacher: str) -> dict[str, np.ndarray]:
    """Float16 ``cls`` ``(n, D)`` and ``patch`` ``(n, h, w, D)`` of every done image (as the frontier reads them)."""
    store = TeacherStore.open(str(cache), teacher)
    done = np.flatnonzero(store.read_status() == STATUS_DONE)
    return {kind: store.read_features(kind, done).astype(np.float16) for kind in ("cls", "patch")}


class Transform:
    """The map applied before splitting: ``(x - mean) / scale @ rotation`` and its inverse."""

    def __init__(self, variant: str, x: np.ndarray, seed: int):
        dim = x.shape[-1]
        self.variant, self.mean = variant, x.mean(0)
        self.scale = x.std(0) if variant == "standardised" else np.ones(dim, np.float32)
        self.scale = np.where(self.scale > 0, self.scale, 1).astype(np.float32)
        self.rotation = None
        if variant == "rotated":
            q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
            self.rotation = (q * np.sign(np.diag(r))).astype(np.float32)  # Haar-distributed orthogonal

    def forward(self, x: np.ndarray) -> np.ndarray:
        y = (x.astype(np.float32) - self.mean) / self.scale
        return y @ self.rotation if self.rotation is not None else y

    def inverse(self, y: np.ndarray) -> np.ndarray:
        if self.rotation is not None:
            y = y @ self.rotation.T
        return y * self.scale + self.mean


def split(y: np.ndarray, m: int) -> np.ndarray:
    """``(N, D)`` -> ``(m, N, D/m)`` contiguous sub-vectors."""
    n, dim = y.shape
    return np.ascontiguousarray(y.reshape(n, m, dim // m).transpose(1, 0, 2))


def assign(sub: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid of each sub-vector: ``sub`` ``(m, N, d)``, ``centroids`` ``(m, K, d)`` -> ``(N, m)`` uint8
    (the largest ``x·c - |c|²/2``: one ``(N, d + 1) @ (d + 1, K)`` product per sub-space)."""
    m, n, _ = sub.shape
    lifted = np.concatenate([sub, np.ones((m, n, 1), np.float32)], -1)
    scores = np.concatenate([centroids.transpose(0, 2, 1), -0.5 * (centroids ** 2).sum(-1)[:, None, :]], 1,
                            dtype=np.float32)
    out, codes = np.empty((n, centroids.shape[1]), np.float32), np.empty((n, m), np.uint8)
    for j in range(m):
        np.dot(lifted[j], scores[j], out=out)
        codes[:, j] = out.argmax(1)
    return codes


def fit_codebooks(sub: np.ndarray, iters: int, seed: int) -> tuple[np.ndarray, list[float]]:
    """Lloyd's k-means (``iters`` iterations) in every sub-space at once; ``sub`` ``(m, N, d)`` -> centroids
    ``(m, K, d)`` and the mean squared quantisation error per token (summed over channels) at the end."""
    rng = np.random.default_rng(seed)
    m, n, d = sub.shape
    centroids = sub[:, rng.choice(n, CENTROIDS, replace=False)].copy()
    for _ in range(iters):
        codes = assign(sub, centroids)
        for j in range(m):
            counts = np.bincount(codes[:, j], minlength=CENTROIDS)
            sums = np.stack([np.bincount(codes[:, j], weights=sub[j, :, t], minlength=CENTROIDS) for t in range(d)], 1)
            empty = counts == 0
            centroids[j, ~empty] = sums[~empty] / counts[~empty, None]
            centroids[j, empty] = sub[j, rng.choice(n, int(empty.sum()), replace=False)]
    mse = float(((decode_sub(assign(sub, centroids), centroids) - sub) ** 2).sum(-1).sum(0).mean())
    return centroids, mse


def decode_sub(codes: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """``(N, m)`` codes -> ``(m, N, d)`` sub-vectors."""
    return centroids[np.arange(centroids.shape[0])[:, None], codes.T]


def decode(codes: np.ndarray, centroids: np.ndarray, transform: Transform) -> np.ndarray:
    """``(N, m)`` codes -> ``(N, D)`` float32 tokens."""
    rows = centroids[np.arange(centroids.shape[0])[None, :], codes]  # (N, m, d)
    return transform.inverse(rows.reshape(len(codes), -1))


def cpu(run) -> tuple[float, object]:
    start = time.process_time()
    out = run()
    return time.process_time() - start, out


def store_bytes(codes: np.ndarray, cls: np.ndarray, root: Path) -> float:
    """Bytes per image of the codes ``(n, h, w, m)`` uint8 and CLS ``(n, D)`` float16 written one chunk per image
    with the default storage's compressors (as ``bench_encodings.write_parts`` writes an encoding's parts)."""
    import zarr

    storage = StorageConfig(shard_images=0)
    shutil.rmtree(root, ignore_errors=True)
    group = zarr.open_group(str(root), mode="w")
    for name, values in (("patch", codes), ("cls", cls)):
        array = group.create_array(name, shape=values.shape, chunks=(1, *values.shape[1:]), dtype=values.dtype,
                                   fill_value=0, compressors=part_compressors(storage, str(values.dtype)))
        array[...] = values
    size = stored_bytes(root) / len(codes)
    shutil.rmtree(root, ignore_errors=True)
    return size


def zstd3_bytes(codes: np.ndarray) -> float:
    from numcodecs import Zstd

    codec = Zstd(level=3)
    return float(np.mean([len(codec.encode(np.ascontiguousarray(c))) for c in codes]))


def frontier_points(paths: list[Path], teacher: str) -> tuple[list[dict], list[dict]]:
    """(lowrank basis=int8 points sorted by ratio, every measured row of ``teacher``) of the frontier JSON files
    ``paths`` (``tools/bench_encodings.py frontier --json``), as ``{"encoding", "ratio", "p001"}``."""
    rows = [r for path in paths for r in json.loads(path.read_text())["rows"][teacher]]
    every = [{"encoding": r["encoding"], "ratio": r["ratio_vs_fp16"], "p001": r["cos_p001"]} for r in rows]
    lowrank = [p for p in every if p["encoding"].startswith("lowrank:") and p["encoding"].endswith("basis=int8")]
    return sorted(lowrank, key=lambda p: p["ratio"]), every


def compare(ratio: float, p001: float, curve: list[dict], every: list[dict]) -> dict:
    ratios = [p["ratio"] for p in curve]
    inside = ratios[0] <= ratio <= ratios[-1]
    at = float(np.interp(ratio, ratios, [p["p001"] for p in curve])) if inside else None
    beaten_by = [f"{p['encoding']} ({p['ratio']:.2f}x, {p['p001']:.4f})" for p in every
                 if p["ratio"] >= ratio and p["p001"] >= p001]
    return {"lowrank_int8_p001_at_ratio": at, "beats_lowrank_int8_at_ratio": None if at is None else p001 > at,
            "dominated_by": beaten_by, "on_frontier": not beaten_by}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--eval", type=Path, required=True)
    parser.add_argument("--teacher", default="dinov2_vits14")
    parser.add_argument("--m", type=int, nargs="+", default=[24, 48, 96, 192])
    parser.add_argument("--variants", nargs="+", default=["centred", "standardised", "rotated"],
                        choices=["centred", "standardised", "rotated"])
    parser.add_argument("--fit-tokens", type=int, default=32_000)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frontier", type=Path, nargs="+",
                        default=[Path("docs/results/bench_encodings_frontier_448.json"),
                                 Path("docs/results/bench_lowrank_extra_ranks_448.json")],
                        help="frontier JSON files (tools/bench_encodings.py frontier --json) to compare against")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/bench_pq"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    start_cpu, start_wall = time.process_time(), time.time()

    calib = done_features(args.calib, args.teacher)["patch"]
    x = done_features(args.eval, args.teacher)
    n, h, w, dim = x["patch"].shape
    fit = calib.reshape(-1, dim).astype(np.float32)
    if len(fit) > args.fit_tokens:
        fit = fit[np.sort(np.random.default_rng(args.seed).choice(len(fit), args.fit_tokens, replace=False))]
    tokens = x["patch"].reshape(-1, dim)
    raw = (1 + h * w) * dim * 2
    megabytes = x["patch"].size * 2 / 1e6
    curve, every = frontier_points(args.frontier, args.teacher)
    print(f"calibration: {len(calib)} images, {len(fit)} fit tokens; eval: {n} images of {h}x{w} tokens, D={dim}",
          flush=True)

    rows = []
    for variant in args.variants:
        transform = Transform(variant, fit, args.seed)
        fit_y = transform.forward(fit)
        for m in args.m:
            fit_seconds, (centroids, mse) = cpu(lambda: fit_codebooks(split(fit_y, m), args.iters, args.seed))
            encode_seconds, codes = cpu(lambda: assign(split(transform.forward(tokens), m), centroids))
            decode_seconds, back = cpu(lambda: decode(codes, centroids, transform))
            grid_codes = codes.reshape(n, h, w, m)
            stored = store_bytes(grid_codes, x["cls"], args.scratch / f"{variant}-m{m}")
            zstd = zstd3_bytes(grid_codes) + 2 * dim
            row = {"variant": variant, "m": m, "sub_dim": dim // m,
                   "bytes_per_image": stored, "ratio_vs_fp16": raw / stored,
                   "raw_code_bytes_per_image": m * h * w + 2 * dim, "ratio_raw_codes": raw / (m * h * w + 2 * dim),
                   "zstd3_bytes_per_image": zstd, "ratio_zstd3": raw / zstd,
                   "codebook_bytes": int(centroids.astype(np.float32).nbytes),
                   **fidelity(x["patch"], back.reshape(x["patch"].shape)),
                   "calib_mse_per_token": mse,
                   "fit_cpu_s": fit_seconds, "encode_cpu_s_per_image": encode_seconds / n,
                   "decode_cpu_s_per_image": decode_seconds / n,
                   "encode_mb_s": megabytes / encode_seconds, "decode_mb_s": megabytes / decode_seconds}
            row.update(compare(row["ratio_vs_fp16"], row["cos_p001"], curve, every))
            rows.append(row)
            print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    print("\n| variant | m | bytes/image (stored) | ratio vs fp16 | raw codes / zstd-3 ratio | token cos mean / p0.1 / "
          "min | rel. L2 | lowrank int8 p0.1 at that ratio | on frontier | fit CPU-s "
          "| encode / decode CPU-ms per image |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        at = "—" if r["lowrank_int8_p001_at_ratio"] is None else f"{r['lowrank_int8_p001_at_ratio']:.4f}"
        print(f"| {r['variant']} | {r['m']} | {r['bytes_per_image']:.0f} | {r['ratio_vs_fp16']:.2f}x "
              f"| {r['ratio_raw_codes']:.2f}x / {r['ratio_zstd3']:.2f}x "
              f"| {r['cos_mean']:.4f} / {r['cos_p001']:.4f} / {r['cos_min']:.3f} | {r['rel_l2']:.4f} | {at} "
              f"| {'yes' if r['on_frontier'] else 'no'} | {r['fit_cpu_s']:.1f} "
              f"| {1e3 * r['encode_cpu_s_per_image']:.1f} / {1e3 * r['decode_cpu_s_per_image']:.2f} |")
    for r in rows:
        if r["dominated_by"]:
            print(f"{r['variant']} m={r['m']}: dominated by {r['dominated_by'][0]}"
                  + (f" and {len(r['dominated_by']) - 1} more" if len(r["dominated_by"]) > 1 else ""))
    total = {"cpu_s": time.process_time() - start_cpu, "wall_s": time.time() - start_wall}
    print(f"total: {total['cpu_s']:.1f} CPU-s, {total['wall_s']:.1f} s wall (this process)")
    if args.json:
        config = {k: str(v) for k, v in vars(args).items()}
        threads = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        args.json.write_text(json.dumps({"config": config, "threads": threads, "total": total,
                                         "calib_images": len(calib), "fit_tokens": len(fit), "eval_images": n,
                                         "grid": [h, w], "dim": dim, "lowrank_int8_curve": curve, "rows": rows},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
