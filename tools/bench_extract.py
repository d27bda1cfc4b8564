"""Extraction throughput vs. bare teacher-forward throughput, side by side in one run.

    python tools/bench_extract.py                      # real offline DINOv2 ViT-S/14 on the demo's photos
    python tools/bench_extract.py --teacher mast3r --random-weights --device cuda --batch-size 64 --images DIR

Bare forward: images decoded and resized once, kept in memory as uint8; timed = host->device copy +
teacher forward (inference_mode, bf16 autocast on CUDA) + synchronise. Extraction: the full
``dune-cache extract`` pipeline (decode in DataLoader workers, forward, checks, compressed Zarr writes)
into a fresh cache. Same images, batch size, device and teacher; rounds alternate A/B and the median
of each is reported, with ratio = extraction img/s / forward img/s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dune_cache.extract import ExtractConfig, run_extraction, teacher_features
from dune_cache.runtime import default_num_workers, pick_device
from dune_cache.geometry import resolve_geometry
from dune_cache.images import load_manifest, load_pixels
from dune_cache.offline_teachers import AUTO, resolve_checkpoint_option
from dune_cache.store import StorageConfig
from dune_cache.teachers import create_teacher


def replicate_images(src: Path, count: int, out: Path) -> Path:
    """A folder of ``count`` symlinks cycling over the images of ``src`` (distinct ids, same pixels)."""
    manifest = load_manifest(src)
    out.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        source = manifest.path(k % len(manifest))
        (out / f"{k:06d}{source.suffix}").symlink_to(source.resolve())
    return out


def bare_forward_rate(teacher, pixels: torch.Tensor, batch_size: int, device: torch.device, amp: bool) -> float:
    """Images/s of host->device + forward + sync over in-memory uint8 ``pixels`` ``(N, 3, H, W)``."""
    if device.type == "cuda":
        pixels = pixels.pin_memory()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for lo in range(0, len(pixels), batch_size):
        teacher_features(teacher, pixels[lo:lo + batch_size], device, amp)
    sync()
    return len(pixels) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="dinov2_vits14")
    parser.add_argument("--checkpoint", type=Path, default=Path(AUTO),
                        help="teacher checkpoint (default: the offline one, `dune-cache teachers --offline`)")
    parser.add_argument("--random-weights", action="store_true", help="ignore --checkpoint (speed only)")
    parser.add_argument("--images", type=Path, default=Path("demo/train/photos"),
                        help="image folder, cycled (default: the demo's photos, made by `make demo`)")
    parser.add_argument("--count", type=int, default=96, help="images per round (source images are cycled)")
    parser.add_argument("--resolution", default="224")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=None, help="default: as dune-cache extract")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--codec", default=StorageConfig.codec)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="intra-op threads for the forward in both measurements (CPU); default: torch's")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = pick_device(args.device)
    checkpoint = None if args.random_weights else resolve_checkpoint_option(args.teacher, args.checkpoint)
    teacher = create_teacher(args.teacher, checkpoint).to(device)
    geometry = resolve_geometry(teacher.spec, args.resolution)
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        images = replicate_images(args.images, args.count, work / "images")
        manifest = load_manifest(images)
        pixels = torch.stack([torch.from_numpy(load_pixels(manifest.path(i), geometry.resolution, geometry.resize))
                              for i in range(len(manifest))])
        bare_forward_rate(teacher, pixels[: args.batch_size], args.batch_size, device, True)  # warm-up
        forward_rates, extract_rates = [], []
        for r in range(args.rounds):
            forward_rates.append(bare_forward_rate(teacher, pixels, args.batch_size, device, True))
            cfg = ExtractConfig(teacher=args.teacher, images=images, out=str(work / f"cache{r}"),
                                checkpoint=checkpoint, random_weights=checkpoint is None,
                                resolution=args.resolution, batch_size=args.batch_size,
                                num_workers=args.num_workers, device=str(device), progress=False,
                                storage=StorageConfig(codec=args.codec))
            extract_rates.append(run_extraction(cfg).images_per_s)
            print(f"round {r}: forward {forward_rates[-1]:.2f} img/s, extraction {extract_rates[-1]:.2f} img/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fwd, ext = statistics.median(forward_rates), statistics.median(extract_rates)
    result = {
        "teacher": args.teacher, "weights": "random" if checkpoint is None else str(checkpoint),
        "resolution": list(geometry.resolution), "images_per_round": args.count, "batch_size": args.batch_size,
        "num_workers": args.num_workers if args.num_workers is not None else default_num_workers(device), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "codec": args.codec,
        "forward_img_s": round(fwd, 3), "extract_img_s": round(ext, 3), "ratio": round(ext / fwd, 3),
        "rounds": args.rounds,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
