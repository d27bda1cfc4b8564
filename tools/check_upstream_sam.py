"""Exactness of the SAM teachers against facebookresearch/segment-anything's own forward.

For each ViT size asked for, this builds the upstream ``Sam`` (image encoder, prompt encoder, mask decoder) from
the upstream source at ``--upstream`` (imported from that checkout at run time, nothing copied), fills every
tensor with seeded random values, saves ``sam.state_dict()`` with ``torch.save`` (the release file layout:
a plain state dict with ``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*`` keys), loads that file
with this package and compares, on identical uint8 pixels of a real photo, this package's tokens with the
upstream ``Sam.preprocess`` + ``image_encoder`` output (after the neck; before it via a hook on the last block),
cropped to the input's own grid:

    python tools/check_upstream_sam.py --upstream /tmp/sam_upstream --sizes b,l,h --depth-reduced 4

ViT-B runs at its real depth (12 blocks) through ``create_teacher``; L and H at their real width with
``--depth-reduced`` blocks split into ``--groups`` equal groups, each ending with a global-attention block as
upstream's four groups do (default: 4 blocks, global at 1 and 3), built through
``dune_cache.teachers.sam.sam_teacher`` with the same overrides. Sizes: the native 1024x1024 and ``--off-native``
(default 768x1024: a 4:3 photo as SAM's resize gives it, zero-padded to 1024 by both sides).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from dune_cache.teachers.geometry import parse_size
from dune_cache.teachers import create_teacher, get_spec
from dune_cache.teachers.sam import sam_teacher

from upstream_check import photo_pixels  # noqa: E402  (tools/, run as a script)

UPSTREAM_SIZES = {  # letter -> (build function of segment_anything.build_sam, real depth, real global blocks)
    "b": ("build_sam_vit_b", 12, (2, 5, 8, 11)),
    "l": ("build_sam_vit_l", 24, (5, 11, 17, 23)),
    "h": ("build_sam_vit_h", 32, (7, 15, 23, 31)),
}
UPSTREAM_WIDTH_HEADS = {"b": (768, 12), "l": (1024, 16), "h": (1280, 16)}


def import_upstream(checkout: Path):
    """``segment_anything.build_sam`` from the checkout at ``checkout`` (its own source, run as is)."""
    sys.path.insert(0, str(checkout))
    # the package's __init__ rebinds the name ``build_sam`` to a function: take the module itself
    return importlib.import_module("segment_anything.build_sam")


def reduced_global_blocks(depth: int, groups: int) -> tuple[int, ...]:
    """Global-attention blocks of a ``depth``-block encoder in ``groups`` equal groups, each ending with one."""
    size = depth // groups
    return tuple(size * (g + 1) - 1 for g in range(groups))


def randomise_(module: torch.nn.Module, seed: int) -> None:
    """Every tensor of ``module`` to seeded random values at unit activation scale: norm weights 1 + 0.1 N,
    biases 0.1 N, rel-pos tables and pos_embed N / sqrt(head width), matrices and kernels N / sqrt(fan-in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            noise = torch.randn(t.shape, generator=g, dtype=torch.float64)
            if "rel_pos" in name or name.endswith("pos_embed"):
                t.copy_(noise / math.sqrt(t.shape[-1]))
            elif t.ndim == 1 and name.endswith("weight"):
                t.copy_(1 + 0.1 * noise)
            elif t.ndim == 1:
                t.copy_(0.1 * noise)
            else:
                t.copy_(noise / math.sqrt(max(1, t[0].numel())))


def build_upstream(build_sam, size: str, depth: int | None, groups: int):
    """Upstream ``Sam`` of ``size``: real (``depth=None``) or with ``depth`` blocks; returns (sam, global blocks)."""
    fn, real_depth, real_globals = UPSTREAM_SIZES[size]
    if depth is None or depth == real_depth:
        return getattr(build_sam, fn)(), real_globals
    width, heads = UPSTREAM_WIDTH_HEADS[size]
    globals_ = reduced_global_blocks(depth, groups)
    sam = build_sam._build_sam(encoder_embed_dim=width, encoder_depth=depth, encoder_num_heads=heads,
                               encoder_global_attn_indexes=list(globals_))
    return sam, globals_


@torch.no_grad()
def upstream_tokens(sam, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream forward on uint8 ``(1, 3, H, W)``: (neck output, last block output), both ``(1, H/16, W/16, C)``."""
    h, w = pixels.shape[-2] // 16, pixels.shape[-1] // 16
    captured = {}
    hook = sam.image_encoder.blocks[-1].register_forward_hook(lambda m, i, o: captured.setdefault("blocks", o))
    try:
        neck = sam.image_encoder(sam.preprocess(pixels.float()))
    finally:
        hook.remove()
    return neck.permute(0, 2, 3, 1)[:, :h, :w], captured["blocks"][:, :h, :w]


def max_diffs(ours, reference: torch.Tensor) -> dict[str, float]:
    """Max abs differences of cls (vs the mean of the reference patch tokens) and patch, and the patch scale."""
    return {"cls": float((ours.cls - reference.mean(dim=(1, 2))).abs().max()),
            "patch": float((ours.patch - reference).abs().max()),
            "patch_max_abs": float(reference.abs().max())}


def check_size(build_sam, size: str, depth: int | None, groups: int, inputs, workdir: Path, seed: int) -> list[dict]:
    """Rows of the exactness table for ViT-``size`` (both teachers: after and before the neck)."""
    sam, globals_ = build_upstream(build_sam, size, depth, groups)
    randomise_(sam, seed)
    sam.eval()
    checkpoint = workdir / f"sam_vit_{size}_random_seed{seed}.pth"
    torch.save(sam.state_dict(), checkpoint)
    real_depth = UPSTREAM_SIZES[size][1]
    used_depth = len(sam.image_encoder.blocks)
    references = [upstream_tokens(sam, pixels) for pixels in inputs]
    rows = []
    for name, after_neck in ((f"sam_vit{size}", True), (f"sam_vit{size}_encoder", False)):
        if used_depth == real_depth:
            teacher = create_teacher(name, checkpoint)
        else:
            teacher = sam_teacher(get_spec(name), checkpoint, after_neck, depth=used_depth,
                                  global_attn_indexes=globals_).eval()
        for pixels, (neck, blocks) in zip(inputs, references):
            t0 = time.process_time()
            with torch.no_grad():
                ours = teacher(pixels)
            reference = neck if after_neck else blocks
            rows.append({"teacher": name, "depth": f"{used_depth}/{real_depth}", "global_blocks": list(globals_),
                         "input": f"{pixels.shape[-2]}x{pixels.shape[-1]}", **max_diffs(ours, reference),
                         "cpu_s_forward": round(time.process_time() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
        del teacher
    checkpoint.unlink()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", type=Path, required=True,
                        help="segment-anything checkout (holds segment_anything/)")
    parser.add_argument("--sizes", default="b,l,h", help="comma-separated ViT sizes among b, l, h")
    parser.add_argument("--depth-reduced", type=int, default=4,
                        help="blocks of the L and H encoders (their real width); 0: real depth. B always runs at "
                             "its real depth.")
    parser.add_argument("--groups", type=int, default=2, help="global-attention blocks of a reduced encoder")
    parser.add_argument("--off-native", default="768x1024", help="the off-native input size HxW (<= 1024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/check_upstream_sam"))
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    build_sam = import_upstream(args.upstream)
    args.workdir.mkdir(parents=True, exist_ok=True)
    inputs = [photo_pixels(1024, 1024), photo_pixels(*parse_size(args.off_native))]
    rows = []
    for size in args.sizes.split(","):
        depth = None if size == "b" or not args.depth_reduced else args.depth_reduced
        rows += check_size(build_sam, size, depth, args.groups, inputs, args.workdir, args.seed)
    print("\n| teacher | depth (used/real) | global blocks | input | max abs diff cls | max abs diff patch | "
          "max abs patch |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['teacher']} | {r['depth']} | {r['global_blocks']} | {r['input']} | {r['cls']:.1e} | "
              f"{r['patch']:.1e} | {r['patch_max_abs']:.3g} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    worst = max(max(r["cls"], r["patch"]) for r in rows)
    print(f"worst max abs diff {worst:.2e} ({'within' if worst <= 1e-4 else 'ABOVE'} 1e-4)")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
