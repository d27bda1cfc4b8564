"""A cache at ImageNet scale: what N images cost in objects, bookkeeping, start-up and memory.

    python tools/bench_scale.py --images 1280000 --work /tmp/scale [--shard-images auto|0|S] [--json out.json]

Builds (once, reused by later runs) a folder of ``--images`` ImageNet-like ids (``d00000/00000000.png``, 1000 per
folder, symlinks to 8 tiny PNGs) and fills one teacher group of the test suite's tiny teacher (``tiny_test_teacher``:
patch 8, D = 16; 16 px input, a 2x2 grid) for it, so a million images fit on local disk. Features are written by
the extraction's own writer (``dune_cache.extract.writer.FeatureWriter``: features, then each unit's failures and
status) with synthetic float16 values, in batches of ``--batch`` — what ``dune-cache extract`` does per image besides
decoding and the teacher forward: that is the *bookkeeping* measured. Then each command a user runs on the cache
is timed in a fresh interpreter (wall, CPU of the process and its children, peak RSS):

- ``dune-cache info``, ``verify`` (reads every chunk), ``ls`` (catalog of the parent folder);
- resume: the same extraction again on the complete group (lists the image folder, hashes the manifest, reads
  the status, finds nothing to do);
- ``CacheReader`` open and its first random batch of ``--batch`` samples;
- the trainer's index: ``dune_student.data.batches.BatchSource`` set up on the cache (manifest of the image folder
  matched to the cache's ids) and one epoch's block-shuffled order.

Objects and bytes are counted on disk. ``--shard-images auto`` uses the rule of ``dune_cache.config``
(:func:`dune_cache.config.auto_shard_images`).

    python tools/bench_scale.py --s3-requests 4096 --shard-images 0,256,1024

counts the S3 requests instead (every call s3fs makes, by operation) of opening a ``CacheReader`` on ``s3://``, one
training epoch of random batches, ``dune-cache info`` and ``dune-cache verify``, on caches of that many images
served by ``rclone serve s3`` on loopback (the test suite's server), one per ``--shard-images`` value.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
TEACHER = "tiny_test_teacher"   # tests/conftest.py registers it
RESOLUTION = "16"               # 16 px, patch 8: a 2x2 grid of D = 16
SOURCES = 8                     # distinct tiny PNGs the ids link to
PER_FOLDER = 1000               # ids per folder, as ImageNet's class folders (~1300)


def image_tree(root: Path, count: int) -> Path:
    """``root/images`` holding ``count`` ids ``dNNNNN/NNNNNNNN.png`` (symlinks to :data:`SOURCES` tiny PNGs); built
    once."""
    from PIL import Image

    images = root / f"images_{count}"
    if (images / ".complete").exists():
        return images
    shutil.rmtree(images, ignore_errors=True)
    sources = root / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for k in range(SOURCES):
        files.append(sources / f"s{k}.png")
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(files[-1])
    for i in range(count):
        folder = images / f"d{i // PER_FOLDER:05d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True)
        os.symlink(files[i % SOURCES], folder / f"{i:08d}.png")
    (images / ".complete").touch()
    return images


def extract_config(images: Path, out: Path, shard_images: int, batch: int):
    """The ``ExtractConfig`` of the benchmark's group (the resume step runs exactly this)."""
    from dune_cache.config import ExtractConfig
    from dune_cache.config import StorageConfig

    return ExtractConfig(teacher=TEACHER, images=images, out=str(out), random_weights=True, resolution=RESOLUTION,
                         batch_size=batch, num_workers=0, progress=False,
                         storage=StorageConfig(shard_images=shard_images))


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its waited-for children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def fill_group(images: Path, out: Path, shard_images: int, batch: int) -> dict:
    """Create the group and write every image's features through ``FeatureWriter``: wall and CPU seconds of the
    start (listing, manifest hash, creation) and of the writes."""
    import conftest  # noqa: F401  (registers the tiny teacher)
    from dune_cache.extract.writer import FeatureWriter
    from dune_cache.extract.provenance import build_provenance
    from dune_cache.teachers.geometry import resolve_geometry
    from dune_cache.images.manifest import load_manifest
    from dune_cache.teachers import get_spec
    from dune_cache.format.store import TeacherStore

    cfg = extract_config(images, out, shard_images, batch)
    start, cpu = time.perf_counter(), cpu_seconds()
    manifest = load_manifest(images)
    spec = get_spec(TEACHER)
    geometry = resolve_geometry(spec, RESOLUTION)
    provenance = build_provenance(spec, None, manifest, str(images.resolve()), geometry, cfg.storage)
    store = TeacherStore.open_or_create(str(out), TEACHER, provenance, manifest, geometry.grid, spec.embed_dim,
                                        cfg.storage)
    units = list(range(store.num_units))
    status, records, stored = store.read_unit_state(units)
    setup = {"wall_s": time.perf_counter() - start, "cpu_s": cpu_seconds() - cpu}
    rng = np.random.default_rng(0)
    grid_values = rng.normal(size=(batch, *geometry.grid, spec.embed_dim)).astype(np.float16)
    start, cpu = time.perf_counter(), cpu_seconds()
    writer = FeatureWriter(store, status, records, manifest, stored=stored)
    for lo in range(0, len(manifest), batch):
        indices = np.arange(lo, min(lo + batch, len(manifest)))
        patch = grid_values[: len(indices)]
        writer.submit(indices, patch.mean(axis=(1, 2)), patch, None, [])
    writer.close()
    writes = {"wall_s": time.perf_counter() - start, "cpu_s": cpu_seconds() - cpu}
    return {"setup": setup, "writes": writes, "units": len(units)}


def objects_on_disk(root: Path) -> dict:
    """Files and bytes under ``root``."""
    files = size = 0
    for folder, _, names in os.walk(root):
        files += len(names)
        size += sum(os.lstat(os.path.join(folder, name)).st_size for name in names)
    return {"files": files, "bytes": size}


def timed_command(argv: list[str]) -> dict:
    """Run ``argv`` in a fresh process: wall and CPU seconds, its own peak RSS (MiB), exit status, last output line."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as output, tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(argv, stdout=output, stderr=errors, text=True)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own resource usage
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        errors.seek(0)
        lines = output.read().strip().splitlines() or errors.read().strip().splitlines() or [""]
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "exit": process.returncode, "last_line": lines[-1][:200]}


PYTHON_STEP = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r}); sys.path.insert(0, {tools!r})
    import conftest, bench_scale
    from pathlib import Path
    {body}
""")

RESUME = """
from dune_cache.extract.run import run_extraction
result = run_extraction(bench_scale.extract_config(Path({images!r}), Path({out!r}), {shard}, {batch}))
print("processed", result.processed, "of", result.total)
"""

READER = """
import numpy as np
from dune_cache.read.reader import CacheReader
start = time.perf_counter()
reader = CacheReader({out!r}, [{teacher!r}])
opened = time.perf_counter() - start
batch = np.random.default_rng(0).choice(len(reader), {batch}, replace=False)
reader.read(batch)
print(f"samples {{len(reader)}} open {{opened:.2f}} s, first batch {{time.perf_counter() - start - opened:.2f}} s")
"""

TRAINER_INDEX = """
import numpy as np
from dune_student.data.batches import EpochOrder, image_paths
from dune_cache.read.reader import CacheReader
reader = CacheReader({out!r}, [{teacher!r}])
start = time.perf_counter()
paths = image_paths(reader, {images!r})
order = EpochOrder(len(reader), {block}, 65536, 0).epoch_order(0)
print(f"samples {{len(paths)}} image paths + epoch order {{time.perf_counter() - start:.2f}} s")
"""


def python_step(body: str) -> list[str]:
    """argv running ``body`` (with ``bench_scale`` and the test teacher importable) in a fresh interpreter."""
    return [sys.executable, "-c", PYTHON_STEP.format(tests=str(TESTS), tools=str(Path(__file__).parent),
                                                     body=textwrap.indent(textwrap.dedent(body), ""))]


def measure_commands(images: Path, out: Path, shard_images: int, batch: int, block: int) -> dict:
    """Each user-facing command on the filled cache, in a fresh interpreter."""
    cache_cli = str(Path(sys.executable).with_name("dune-cache"))
    fields = {"images": str(images), "out": str(out), "shard": shard_images, "batch": batch, "teacher": TEACHER,
              "block": block}
    return {
        "info": timed_command([cache_cli, "info", str(out)]),
        "verify": timed_command([cache_cli, "verify", str(out)]),
        "ls": timed_command([cache_cli, "ls", str(out.parent)]),
        "resume (nothing to do)": timed_command(python_step(RESUME.format(**fields))),
        "CacheReader open + first batch": timed_command(python_step(READER.format(**fields))),
        "trainer index (image paths + epoch order)": timed_command(python_step(TRAINER_INDEX.format(**fields))),
        "python + imports only (baseline)": timed_command(
            python_step("import dune_cache.read.reader, dune_student.data.batches")),
    }


S3_BUCKET = "bucket"


def count_s3_calls() -> dict[str, int]:
    """Patch s3fs so that every S3 API call it makes is counted by operation; returns the live counter."""
    import s3fs

    counts: dict[str, int] = {}
    call = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        name = method if isinstance(method, str) else getattr(method, "__name__", str(method))
        counts[name] = counts.get(name, 0) + 1
        return await call(self, method, *args, **kwargs)

    s3fs.S3FileSystem._call_s3 = counted
    return counts


def s3_requests(count: int, shards: list[int], work: Path, batch: int) -> dict:
    """Requests per operation of reader open, one epoch, ``info`` and ``verify`` on ``s3://`` caches of ``count``
    images, one per shard setting."""
    from conftest import s3_env, serve_s3

    from dune_cache.commands.info import cache_info
    from dune_cache.commands.verify import verify_cache
    from dune_cache.read.reader import CacheReader

    images = image_tree(work, count)
    served = work / f"served_{count}"
    shutil.rmtree(served, ignore_errors=True)
    for shard in shards:
        fill_group(images, served / S3_BUCKET / f"shard{shard}.zarr", shard, batch)
    counts, results = count_s3_calls(), {}
    with serve_s3(served) as endpoint:
        os.environ.update(s3_env(endpoint))
        for shard in shards:
            url, steps = f"s3://{S3_BUCKET}/shard{shard}.zarr", {}

            def counted(step: str, run) -> None:
                counts.clear()
                run()
                steps[step] = dict(sorted(counts.items()))

            reader: list = []
            counted("CacheReader open", lambda: reader.append(CacheReader(url, [TEACHER], backend="zarr")))
            order = np.random.default_rng(0).permutation(count)
            counted("one epoch of random batches", lambda: [reader[0].read(order[lo:lo + batch])
                                                           for lo in range(0, count, batch)])
            counted("dune-cache info", lambda: cache_info(url))
            counted("dune-cache verify", lambda: verify_cache(url))
            results[f"shard_images={shard}"] = steps
    return {"images": count, "batch": batch, "requests": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_280_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_scale"))
    parser.add_argument("--shard-images", default="auto",
                        help="auto, 0 (one object per image) or images per shard; with --s3-requests a comma list")
    parser.add_argument("--batch", type=int, default=256, help="extraction batch and first reader batch")
    parser.add_argument("--keep", action="store_true", help="keep the cache (the image folder is always kept)")
    parser.add_argument("--reuse", action="store_true",
                        help="time the commands on the cache a --keep run left (no fill: its figures are null)")
    parser.add_argument("--s3-requests", type=int, metavar="N", help="count S3 requests on caches of N images instead")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from dune_cache.config import auto_shard_images
    from dune_cache.extract.pipeline import raw_image_bytes

    if args.s3_requests:
        result = s3_requests(args.s3_requests, [int(s) for s in args.shard_images.split(",")], args.work, args.batch)
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return

    tiny_image_bytes = raw_image_bytes((2, 2), 16, "float16", 0)
    shard = auto_shard_images(args.images, tiny_image_bytes) if args.shard_images == "auto" else int(args.shard_images)
    start = time.perf_counter()
    images = image_tree(args.work, args.images)
    tree_s = time.perf_counter() - start
    out = args.work / f"caches_{args.images}_{shard}" / "cache.zarr"
    fill = None
    if not args.reuse:
        shutil.rmtree(out.parent, ignore_errors=True)
        out.parent.mkdir(parents=True)
        print(f"{args.images} images, shard_images {shard}: filling {out} ...", flush=True)
        fill = fill_group(images, out, shard, args.batch)
    result = {
        "images": args.images, "shard_images": shard, "batch": args.batch, "image_tree_s": round(tree_s, 1),
        "fill": fill,
        "bookkeeping_cpu_us_per_image": fill and round(1e6 * fill["writes"]["cpu_s"] / args.images, 1),
        "objects": objects_on_disk(out),
        "commands": measure_commands(images, out, shard, args.batch, max(shard, 64)),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "load_avg": os.getloadavg()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if not (args.keep or args.reuse):
        shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
