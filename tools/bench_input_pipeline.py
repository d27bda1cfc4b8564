"""Stage-2 input pipeline, per sample: CPU-seconds of each stage and bytes read, converted to cores and storage GB/s
per H100 at the trainer's predicted rate.

    python tools/bench_input_pipeline.py [--work /tmp/inpipe] [--images 256] [--gpu-rate N] [--rounds 5]

DUNE's setting: 3 teachers with 24×24 grids × 1024 channels float16 (a synthetic cache with realistic values,
``tools/bench_reader.py``'s ``synthetic_cache``, the group hard-linked under three names), recompressed into the
storage encodings (``bitround``, ``int8-channel``, ``pca:rank=256``); real photos (``demo/train/photos``) saved as
JPEG quality 90 at ImageNet-like size (long side 500) and large (long side 1600, upscaled: decode cost as a large
photo's, bytes below a real one's); student resolution 336 with the trainer's grid crops (``augment.mode=grid-crop``
defaults). Each stage runs the project's own function on one thread (``torch.set_num_threads(1)``, as in a
DataLoader worker) and is timed with ``time.process_time``; stages alternate within each round; medians of the
rounds. CPU-seconds, not wall time, so a loaded machine changes them little.

Stages: file read; image decode (PIL with the shipped draft at twice the student size, without draft, with a draft at
the size the crop needs, torchvision ``decode_jpeg`` on the CPU); crop + resize (``crop_pixels``, torchvision
antialiased bicubic on the tensor); photometric augmentation applied on the CPU and its draws alone; target read +
decompress (``CacheReader.read(decode=False)``, float16, the stored parts) and the decode on the CPU on top
(``read(decode=True)``); the token crop; the image copy's read (``dune-cache add-images`` at 336).

The rate (samples/s per H100 at 336) is ``cached_samples_per_s_per_h100`` of ``docs/results/cost_model.json`` when
that file exists, else ``--gpu-rate``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import zarr
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from bench_reader import TEACHER, encoded_cache, synthetic_cache  # noqa: E402

from dune_cache.encodings import EncodingConfig  # noqa: E402
from dune_cache.commands.add_images import add_images  # noqa: E402
from dune_cache.format.image_copy import read_info
from dune_cache.images.decode import open_rgb  # noqa: E402
from dune_cache.read.reader import CacheReader  # noqa: E402
from dune_cache.format.store import TeacherStore  # noqa: E402
from dune_student.data.augment import (apply_photometric_uint8, crop_pixels, draft_size, sample_grid_crop,
                                       sample_photometric_params)
from dune_student.config import AugmentConfig  # noqa: E402
from dune_student.data.batches import crop_batch  # noqa: E402

TEACHERS = (TEACHER, f"{TEACHER}_b", f"{TEACHER}_c")
ENCODINGS = ("none", "bitround", "int8-channel", "pca:rank=256")
COST_MODEL = Path(__file__).resolve().parent.parent / "docs" / "results" / "cost_model.json"
PHOTOS = Path(__file__).resolve().parent.parent / "demo" / "train" / "photos"


def three_teachers(root: str) -> str:
    """``root`` with its one synthetic group hard-linked under two more names (three teacher groups)."""
    for name in TEACHERS[1:]:
        if not Path(root, name).exists():
            os.system(f"cp -al '{root}/{TEACHER}' '{root}/{name}'")
    return root


def write_photos(folder: Path, ids: list[str], long_side: int) -> Path:
    """``folder`` holding a JPEG (quality 90) named ``ids[i]`` of photo ``i % 12`` resized to ``long_side``."""
    if folder.exists():
        return folder
    folder.mkdir(parents=True)
    photos = sorted(PHOTOS.glob("*"))
    for k, image_id in enumerate(ids):
        img = Image.open(photos[k % len(photos)]).convert("RGB")
        scale = long_side / max(img.size)
        img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC).save(
            folder / image_id, format="JPEG", quality=90)
    return folder


def per_sample_cpu(run: Callable[[], object], samples: int) -> float:
    """CPU-seconds of this process per sample for one call of ``run`` covering ``samples`` samples."""
    start = time.process_time()
    run()
    return (time.process_time() - start) / samples


class Stages:
    """The timed stages over ``files`` (JPEG paths) with one grid crop per file."""

    def __init__(self, files: list[Path], grid: tuple[int, int], resolution: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.files, self.grid, self.size = files, grid, (resolution, resolution)
        self.crops = [sample_grid_crop(grid, AugmentConfig(), generator) for _ in files]
        self.data = [f.read_bytes() for f in files]
        self.pixels = [torch.from_numpy(np.asarray(open_rgb(f)).copy()).permute(2, 0, 1) for f in files]

    def read_files(self) -> None:
        for f in self.files:
            f.read_bytes()

    def decode_pil(self, draft: str) -> None:
        """PIL decode to RGB; ``draft``: ``shipped`` (twice the student size), ``none``, ``crop`` (the crop's need)."""
        for data, crop in zip(self.data, self.crops):
            size = {"shipped": (2 * self.size[0],) * 2, "none": None,
                    "crop": draft_size(crop, self.grid, self.size)}[draft]
            np.asarray(open_rgb(io.BytesIO(data), draft_size=size))

    def decode_torchvision(self) -> None:
        from torchvision.io import ImageReadMode, decode_jpeg

        decode_jpeg([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in self.data], mode=ImageReadMode.RGB)

    def crop_resize(self) -> None:
        for pixels, crop in zip(self.pixels, self.crops):
            crop_pixels(pixels, crop, self.grid, self.size)


def median_table(stages: dict[str, tuple[Callable[[], object], int]], rounds: int) -> dict[str, float]:
    """Median over ``rounds`` of each stage's CPU-seconds per sample (stages alternate within a round)."""
    runs: dict[str, list[float]] = {name: [] for name in stages}
    for name, (run, n) in stages.items():  # warm-up
        run()
    for _ in range(rounds):
        for name, (run, n) in stages.items():
            runs[name].append(per_sample_cpu(run, n))
    return {name: statistics.median(values) for name, values in runs.items()}


def gpu_rate(args: argparse.Namespace) -> tuple[float, str]:
    """Samples/s per H100 at 336 and where the figure comes from."""
    if COST_MODEL.exists():
        model = json.loads(COST_MODEL.read_text())
        rates = model.get("cached_samples_per_s_per_h100", {})
        if str(args.resolution) in rates:
            return float(rates[str(args.resolution)]), (f"{COST_MODEL.name} cached_samples_per_s_per_h100"
                                                        f"[{args.resolution}]")
    return args.gpu_rate, "--gpu-rate (docs/results/cost_model.json not there yet)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/inpipe", help="Folder for the caches and photos (reused).")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=336)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gpu-rate", type=float, default=1000.0, help="Samples/s per H100 when the cost model "
                        "is missing (the order of magnitude docs/scale.md derives for a ViT-B/14 student at 336).")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    grid, dim = args.resolution // 14, 1024
    root = synthetic_cache(argparse.Namespace(cache=str(work / "cache.zarr"), images=args.images, grid=grid, dim=dim))
    ids = list(TeacherStore.open(root, TEACHER).manifest().ids)
    imagenet = write_photos(work / "photos_500", ids, 500)
    large = write_photos(work / "photos_1600", ids[:64], 1600)
    caches = {spec: three_teachers(encoded_cache(root, EncodingConfig.parse(spec))) for spec in ENCODINGS}
    info = read_info(root)
    if info is None or info.resolution != args.resolution:
        add_images(root, str(imagenet), args.resolution, overwrite=True)
    rng = np.random.default_rng(0)
    batch = rng.choice(args.images, args.batch, replace=False)
    stages: dict[str, tuple[Callable[[], object], int]] = {}
    for label, folder in (("500 px", imagenet), ("1600 px", large)):
        files = sorted(folder.glob("*.jpg"))[:args.batch]
        s = Stages(files, (grid, grid), args.resolution)
        stages[f"file read ({label})"] = (s.read_files, len(files))
        for draft in ("shipped", "none", "crop"):
            stages[f"decode PIL, draft {draft} ({label})"] = (lambda s=s, d=draft: s.decode_pil(d), len(files))
        stages[f"decode torchvision decode_jpeg CPU ({label})"] = (s.decode_torchvision, len(files))
        stages[f"crop + resize ({label})"] = (s.crop_resize, len(files))
    clean = torch.randint(0, 256, (args.batch, 3, args.resolution, args.resolution), dtype=torch.uint8)
    stages["photometric draws"] = (lambda: sample_photometric_params(args.batch, torch.Generator().manual_seed(1)),
                                   args.batch)
    stages["photometric draws + apply (CPU)"] = (
        lambda: apply_photometric_uint8(clean, sample_photometric_params(args.batch, torch.Generator().manual_seed(1))),
        args.batch)
    reader_copy = CacheReader(root, [TEACHER], dtype=torch.float16)
    stages["image copy read (336 px JPEG)"] = (lambda: reader_copy.image_bytes(batch), args.batch)
    crops = [sample_grid_crop((grid, grid), AugmentConfig(), torch.Generator().manual_seed(2))] * args.batch
    for spec, cache in caches.items():
        reader = CacheReader(cache, list(TEACHERS), dtype=torch.float16)
        stages[f"targets {spec}: read + decompress (decode=False)"] = (
            lambda r=reader: r.read(batch, decode=False), args.batch)
        stages[f"targets {spec}: read + decode on CPU"] = (lambda r=reader: r.read(batch), args.batch)
    tokens = torch.zeros(args.batch, grid, grid, dim, dtype=torch.float16)
    stages["token crop (3 teachers)"] = (lambda: [crop_batch(tokens, crops) for _ in TEACHERS], args.batch)
    cpu = median_table(stages, args.rounds)
    stored = {spec: sum(TeacherStore.open(cache, t).nbytes_stored() for t in TEACHERS) / args.images
              for spec, cache in caches.items()}
    jpeg = {label: np.mean([f.stat().st_size for f in folder.glob("*.jpg")])
            for label, folder in (("500 px", imagenet), ("1600 px", large))}
    copy_bytes = float(zarr.open_array(f"{root}/images/offsets", mode="r")[-1]) / args.images
    (work / "input_pipeline.json").write_text(json.dumps({"cpu_s_per_sample": cpu, "target_bytes": stored,
                                                          "jpeg_bytes": jpeg, "copy_bytes": copy_bytes}, indent=1))
    report(args, cpu, stored, jpeg, copy_bytes)


def report(args: argparse.Namespace, cpu: dict[str, float], stored: dict[str, float], jpeg: dict[str, float],
           copy_bytes: float) -> None:
    rate, source = gpu_rate(args)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; torch {torch.__version__}, Pillow {Image.__version__}; rate {rate:.0f} "
          f"samples/s per H100 ({source}); {args.rounds} rounds, medians\n")
    print("| stage | CPU ms per sample | cores per H100 |")
    print("|---|---|---|")
    for name, seconds in cpu.items():
        print(f"| {name} | {1e3 * seconds:.2f} | {seconds * rate:.2f} |")
    print("\n| bytes read per sample | MB | GB/s per H100 |")
    print("|---|---|---|")
    for label, size in jpeg.items():
        print(f"| JPEG q90 ({label}) | {size / 1e6:.3f} | {size * rate / 1e9:.3f} |")
    print(f"| image copy, 336 px JPEG q90 | {copy_bytes / 1e6:.3f} | {copy_bytes * rate / 1e9:.3f} |")
    for spec, size in stored.items():
        print(f"| targets {spec} (3 teachers) | {size / 1e6:.3f} | {size * rate / 1e9:.3f} |")
    print("\n| pipeline (500 px JPEG) | encoding | CPU ms per sample | cores per H100 | GB/s per H100 |")
    print("|---|---|---|---|---|")
    image = {"loader decode + photometric on CPU (shipped)": cpu["decode PIL, draft shipped (500 px)"]
             + cpu["crop + resize (500 px)"] + cpu["photometric draws + apply (CPU)"],
             "photometric on the device": cpu["decode PIL, draft shipped (500 px)"] + cpu["crop + resize (500 px)"]
             + cpu["photometric draws"],
             "JPEG decode + crop + photometric on the device": cpu["photometric draws"]}
    for name, image_cpu in image.items():
        for spec in stored:
            total = image_cpu + cpu["file read (500 px)"] + cpu[f"targets {spec}: read + decompress (decode=False)"] \
                + cpu["token crop (3 teachers)"]
            size = stored[spec] + jpeg["500 px"]
            print(f"| {name} | {spec} | {1e3 * total:.2f} | {total * rate:.1f} | {size * rate / 1e9:.2f} |")


if __name__ == "__main__":
    main()
