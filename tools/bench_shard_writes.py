"""Bytes written per byte stored by the extraction's writer in sharded groups, per batch size, side by side.

zarr-python rewrites a whole shard on every partial write of it, so a writer that stores each batch as it comes
writes a shard of ``S`` images ``S / batch`` times over (and on object storage uploads it that often). The writer
gathers each unit (one shard) before writing it once (:class:`dune_cache.extract.writer.FeatureWriter` with the run's
``todo``). This runs both on the same synthetic features: ``--images`` images of ViT-like float16 features (a
``--grid`` grid of ``--dim`` channels) into groups of ``--shard-images`` per shard, through the real
``TeacherStore``/``FeatureWriter``, and counts the bytes the process wrote (``wchar`` of ``/proc/self/io``, every
thread, metadata, failure records and status included) against the bytes the group holds on disk afterwards.

    python tools/bench_shard_writes.py --batches 1 16 64 --codecs none zstd:1 --out docs/results/bench_shard_writes.json
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from dune_cache.config import EncodingConfig, StorageConfig
from dune_cache.extract.provenance import build_provenance
from dune_cache.extract.writer import FeatureWriter
from dune_cache.format.store import TeacherStore
from dune_cache.images.manifest import ImageManifest
from dune_cache.teachers.geometry import Geometry
from dune_cache.teachers.spec import TeacherSpec


def written_bytes() -> int:
    """Bytes this process has written through write() so far (``wchar`` of ``/proc/self/io``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar line (Linux only)")


def stored_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_group(root: Path, features: np.ndarray, cls: np.ndarray, batch: int, storage: StorageConfig,
                gathered: bool) -> dict:
    """One group written batch by batch; bytes written and stored, seconds."""
    n, h, w, dim = features.shape
    spec = TeacherSpec(name="bench", arch="synthetic", patch_size=14, embed_dim=dim)
    manifest = ImageManifest(ids=tuple(f"img{i:06d}.jpg" for i in range(n)), tags=("",) * n, base=None)
    geometry = Geometry(resolution=(h * 14, w * 14), grid=(h, w), patch_size=14)
    provenance = build_provenance(spec, None, manifest, "synthetic", geometry, storage)
    store = TeacherStore.create(str(root), "bench", provenance, manifest, (h, w), dim, storage)
    todo = np.arange(n)
    status, records, stored = store.read_unit_state(list(range(store.num_units)))
    before, start = written_bytes(), time.perf_counter()
    writer = FeatureWriter(store, status, records, manifest, todo=todo if gathered else None, stored=stored)
    for lo in range(0, n, batch):
        rows = np.arange(lo, min(lo + batch, n))
        writer.submit(rows, cls[rows], features[rows], None, [])
    writer.close()
    seconds, written = time.perf_counter() - start, written_bytes() - before
    stored = stored_bytes(root / "bench")
    return {"written": written, "stored": stored, "ratio": written / stored, "seconds": seconds}


def parse_codec(text: str) -> tuple[str, int]:
    name, _, level = text.partition(":")
    return name, int(level or 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--shard-images", type=int, default=64)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--codecs", nargs="+", default=["none", "zstd:1"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    features = rng.standard_normal((args.images, args.grid, args.grid, args.dim), dtype=np.float32).astype(np.float16)
    cls = features.mean(axis=(1, 2)).astype(np.float16)
    rows = []
    for codec in args.codecs:
        name, level = parse_codec(codec)
        storage = StorageConfig(dtype="float16", codec=name, level=level, shard_images=args.shard_images,
                                encoding=EncodingConfig())
        for batch in args.batches:
            for gathered in (False, True):
                folder = Path(tempfile.mkdtemp(prefix="bench-shards-"))
                try:
                    result = write_group(folder / "cache.zarr", features, cls, batch, storage, gathered)
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
                row = {"codec": codec, "batch": batch, "writer": "per unit (gathered)" if gathered else "per batch",
                       **result}
                rows.append(row)
                print(f"{codec:8s} batch {batch:4d} {row['writer']:20s} written/stored {row['ratio']:.3f} "
                      f"({row['written'] / 1e6:.1f} / {row['stored'] / 1e6:.1f} MB, {row['seconds']:.2f} s)")
    if args.out:
        args.out.write_text(json.dumps({"command": "python tools/bench_shard_writes.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k != "out"), "machine": platform.platform(),
            "cpus": __import__("os").cpu_count(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
