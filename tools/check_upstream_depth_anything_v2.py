"""Exactness of the Depth Anything V2 encoder teachers against DepthAnything/Depth-Anything-V2's own forward.

For each size this builds upstream's ``DepthAnythingV2(**model_configs[size])`` from a checkout (``--upstream``,
imported at run time, nothing copied), fills every parameter (encoder and DPT head) with seeded random values
(LayerScale and norms included), saves ``model.state_dict()`` with ``torch.save`` (the release
``depth_anything_v2_vit*.pth`` layout: ``pretrained.*`` + ``depth_head.*``), loads that file with this package
and compares on identical normalised pixels with what the DPT head reads: the last of
``model.pretrained.get_intermediate_layers(x, model.intermediate_layer_idx[size], return_class_token=True)``
(patch tokens, class token; final norm applied) vs the teacher's patch / cls.

ViT-S, -B and -L run at real size through ``create_teacher``. ViT-g runs at its real width with fewer blocks
(``--giant-depth``; upstream's ``DinoVisionTransformer`` built with that depth, its last block read): this
package's side is the same loader (:func:`encoder_state` + DINOv2 conversion + strict load) into a timm model of
that depth.

    python tools/check_upstream_depth_anything_v2.py --upstream /tmp/up_dav2 [--commit SHA] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from upstream_check import randomize as seeded_random, report  # noqa: E402  (tools/, run as a script)

MODEL_CONFIGS = {  # the README's model_configs: the DPT head's widths (the head is random and ignored)
    "vits": {"encoder": "vits", "features": 64, "out_channels": [48, 96, 192, 384]},
    "vitb": {"encoder": "vitb", "features": 128, "out_channels": [96, 192, 384, 768]},
    "vitl": {"encoder": "vitl", "features": 256, "out_channels": [256, 512, 1024, 1024]},
    "vitg": {"encoder": "vitg", "features": 384, "out_channels": [1536, 1536, 1536, 1536]},
}
SIZES = ((518, 518), (364, 476))  # native 37 x 37, and an off-native non-square grid 26 x 34


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter seeded-random (:func:`upstream_check.randomize`); tokens and position embeddings N(0, 1)."""
    seeded_random(model, seed, lambda name, _: name.endswith(("cls_token", "pos_embed", "mask_token")))


def upstream_model(upstream: Path, encoder: str, depth: int | None, seed: int) -> torch.nn.Module:
    """Upstream ``DepthAnythingV2``; ``depth``: its DINOv2 built with that many blocks, the last one read."""
    sys.path.insert(0, str(upstream))
    from depth_anything_v2 import dinov2 as up_dinov2  # noqa: PLC0415  (the checkout given on the command line)
    from depth_anything_v2.dpt import DepthAnythingV2  # noqa: PLC0415

    build = up_dinov2.DinoVisionTransformer
    if depth is not None:  # vit_giant2() passes depth itself: override that one argument
        up_dinov2.DinoVisionTransformer = lambda **kwargs: build(**{**kwargs, "depth": depth})
    try:
        model = DepthAnythingV2(**MODEL_CONFIGS[encoder])
    finally:
        up_dinov2.DinoVisionTransformer = build
    if depth is not None:
        model.intermediate_layer_idx[encoder] = list(range(depth - 4, depth))
    randomize(model, seed)
    return model.eval()


def our_teacher(name: str, path: Path, depth: int | None):
    from timm import create_model

    from dune_cache.teachers import create_teacher, get_spec
    from dune_cache.teachers.base import find_state_dict, load_state_dict_strict, read_checkpoint
    from dune_cache.teachers.depth_anything_v2 import DepthAnythingV2Teacher, encoder_state
    from dune_cache.teachers.dinov2 import load_dinov2_state_dict

    if depth is None:
        return create_teacher(name, path)
    spec = get_spec(name)
    vit = create_model(spec.arch, pretrained=False, img_size=518, dynamic_img_size=True, num_classes=0, depth=depth)
    state = encoder_state(find_state_dict(read_checkpoint(path)), str(path))
    load_state_dict_strict(vit, load_dinov2_state_dict(state), str(path))
    return DepthAnythingV2Teacher(spec, vit).eval()


def compare(encoder: str, upstream: Path, depth: int | None, folder: Path, seed: int) -> list[dict]:
    name = f"depth_anything_v2_{encoder}"
    model = upstream_model(upstream, encoder, depth, seed)
    path = folder / f"depth_anything_v2_{encoder}.pth"
    torch.save(model.state_dict(), path)
    teacher = our_teacher(name, path, depth)
    read = model.intermediate_layer_idx[encoder]
    rows = []
    for h, w in SIZES:
        pixels = torch.randint(0, 256, (1, 3, h, w), generator=torch.Generator().manual_seed(seed + h),
                               dtype=torch.uint8)
        with torch.no_grad():
            x = teacher.normalize(pixels)
            ref_patch, ref_cls = model.pretrained.get_intermediate_layers(x, read, return_class_token=True)[-1]
            out = teacher(pixels)
        row = {"teacher": name, "blocks": len(model.pretrained.blocks), "width": model.pretrained.embed_dim,
               "dpt_blocks": list(read), "input": f"{h}x{w}", "grid": f"{h // 14}x{w // 14}",
               "cls": float((out.cls - ref_cls).abs().max()),
               "patch": float((out.patch.flatten(1, 2) - ref_patch).abs().max()),
               "patch_scale": float(ref_patch.abs().max())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", type=Path, required=True, help="DepthAnything/Depth-Anything-V2 checkout")
    parser.add_argument("--giant-depth", type=int, default=4, help="blocks of the ViT-g copy (40: real size)")
    parser.add_argument("--commit", help="upstream commit (default: git rev-parse HEAD of --upstream)")
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    commit = args.commit or subprocess.run(["git", "-C", str(args.upstream), "rev-parse", "HEAD"],
                                           capture_output=True, text=True).stdout.strip() or None
    start = time.process_time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for encoder in MODEL_CONFIGS:
            depth = args.giant_depth if encoder == "vitg" and args.giant_depth != 40 else None
            rows += compare(encoder, args.upstream, depth, Path(tmp), args.seed)
    report("DepthAnything/Depth-Anything-V2", commit, rows, ("cls", "patch"), start, args.out)


if __name__ == "__main__":
    main()
