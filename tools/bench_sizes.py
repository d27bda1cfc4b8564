"""How long `dune-cache info` takes to size a cache on S3: one LIST per 1000 objects against one request per object.

    python tools/bench_sizes.py [--images 2000] [--grid 4] [--dim 64] [--rounds 3]

One synthetic teacher group (tools/bench_reader.py's ``build_cache``: one chunk object per image and feature
array, as ``dune-cache extract`` stores them without ``--shard-images``) is written into a folder that
``rclone serve s3`` serves on loopback. Each round times, side by side on the same bucket:

- ``zarr per object``: zarr's ``Array.nbytes_stored()`` over the feature arrays (how ``info`` sized a
  group before: one HEAD request per object)
- ``listing``: ``TeacherStore.nbytes_stored()`` (a recursive listing with sizes, ``location.object_sizes``)
- ``info``: the whole ``cache_info`` of the cache (provenance, status, counts and sizes)

and checks that both sizes agree. Medians over rounds. Loopback S3 has almost no latency, so the per-object
cost measured here is a lower bound of a real object store's (tens of ms per request there).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_reader import TEACHER, build_cache  # noqa: E402
from conftest import s3_env, serve_s3  # noqa: E402  (the test suite's rclone S3 server)

from dune_cache.commands.info import cache_info  # noqa: E402
from dune_cache.format.store import TeacherStore  # noqa: E402

BUCKET = "bench"


def per_object_bytes(store: TeacherStore) -> int:
    """Stored bytes of the feature arrays summed by zarr, one size request per object."""
    return sum(array.nbytes_stored() for name in ("cls", "patch") for array in store.stored_arrays(name).values())


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def bench(args: argparse.Namespace, served: Path) -> dict[str, list[float]]:
    local = served / BUCKET / "cache.zarr"
    print(f"building {args.images} x {args.grid}x{args.grid}x{args.dim} float16 cache at {local} ...")
    build_cache(str(local), args.images, args.grid, args.dim)
    objects = sum(len(files) for _, _, files in os.walk(local / TEACHER))
    print(f"{objects} objects in the teacher group")
    url = f"s3://{BUCKET}/cache.zarr"
    results: dict[str, list[float]] = {"zarr per object": [], "listing": [], "info": []}
    with serve_s3(served) as endpoint:
        os.environ.update(s3_env(endpoint))
        for _ in range(args.rounds):
            store = TeacherStore.open(url, TEACHER)
            seconds, old = timed(lambda: per_object_bytes(store))
            results["zarr per object"].append(seconds)
            seconds, new = timed(store.nbytes_stored)
            results["listing"].append(seconds)
            if old != new:
                raise AssertionError(f"sizes differ: {old} per object, {new} from the listing")
            results["info"].append(timed(lambda: cache_info(url))[0])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_sizes_") as scratch:
        results = bench(args, Path(scratch))
    base = statistics.median(results["zarr per object"])
    print(f"\n{'method':<18} {'median s':>9} {'vs per object':>14}")
    for name, seconds in results.items():
        median = statistics.median(seconds)
        print(f"{name:<18} {median:>9.3f} {base / median:>13.1f}x")


if __name__ == "__main__":
    main()
