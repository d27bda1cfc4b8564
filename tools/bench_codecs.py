"""Lossless codec ratio and write/read speed on real teacher features (demo DINOv2 ViT-S/14, demo photos).

    python tools/bench_codecs.py [--resolution 448] [--rounds 3]

Features are computed once, cast to float16, then written to and read back from a Zarr v3 array
(one image per chunk, as in a cache) with each codec; speeds use all cores zarr-python uses.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from dune_cache.teachers.geometry import parse_size
from dune_cache.images.manifest import load_manifest
from dune_cache.images.decode import load_pixels
from dune_cache.offline.catalogue import AUTO, resolve_checkpoint_option
from dune_cache.format.layout import build_compressors
from dune_cache.config import StorageConfig
from dune_cache.teachers import create_teacher

CODECS = [("blosc-zstd", 1), ("blosc-zstd", 3), ("blosc-zstd", 5), ("zstd", 1), ("zstd", 3), ("blosc-lz4", 5),
          ("gzip", 5), ("none", 0)]


def measure(x: np.ndarray, codec: str, level: int, rounds: int) -> tuple[float, float, float]:
    """(ratio vs raw, write MB/s, read MB/s) of ``x`` ``(N, ...)`` stored one row per chunk."""
    group = zarr.open_group(tempfile.mkdtemp(prefix="bench_codecs_"), mode="w")
    arr = group.create_array("x", shape=x.shape, chunks=(1, *x.shape[1:]), dtype=x.dtype,
                             compressors=build_compressors(StorageConfig(codec=codec, level=level)))
    start = time.perf_counter()
    for _ in range(rounds):
        arr[:] = x
    write = (time.perf_counter() - start) / rounds
    start = time.perf_counter()
    for _ in range(rounds):
        arr[:]
    read = (time.perf_counter() - start) / rounds
    return x.nbytes / arr.nbytes_stored(), x.nbytes / write / 1e6, x.nbytes / read / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="dinov2_vits14")
    parser.add_argument("--checkpoint", type=Path, default=Path(AUTO),
                        help="teacher checkpoint (default: the offline one, `dune-cache teachers --offline`)")
    parser.add_argument("--images", type=Path, default=Path("demo/train/photos"),
                        help="image folder (default: the demo's photos, made by `make demo`)")
    parser.add_argument("--resolution", default="448")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    teacher = create_teacher(args.teacher, resolve_checkpoint_option(args.teacher, args.checkpoint))
    manifest = load_manifest(args.images)
    size = parse_size(args.resolution)
    pixels = torch.stack([torch.from_numpy(load_pixels(manifest.path(i), size, "squash"))
                          for i in range(len(manifest))])
    with torch.inference_mode():
        patch = teacher(pixels).patch.numpy().astype(np.float16)
    print(f"{args.teacher} patch features {patch.shape} float16, {patch.nbytes / 1e6:.1f} MB, "
          f"{torch.get_num_threads()} threads")
    print("| codec | level | ratio vs raw fp16 | write MB/s | read MB/s |\n|---|---|---|---|---|")
    for codec, level in CODECS:
        ratio, write, read = measure(patch, codec, level, args.rounds)
        print(f"| {codec} | {level} | {ratio:.3f} | {write:.0f} | {read:.0f} |")


if __name__ == "__main__":
    main()
