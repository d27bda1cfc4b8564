"""Exactness of the RADIO teachers against NVlabs/RADIO's own ``hubconf.radio_model``.

For each case below this builds the upstream backbone with the checkout's own ``create_model_from_args``
(``--upstream``, imported at run time with its ``einops`` dependency, nothing copied), fills every parameter
with seeded random values, and saves a release-layout file: ``{"args": Namespace, "state_dict": {...}}`` with
``base_model.*``, a non-default ``input_conditioner.norm_mean/norm_std``, a random ``_feature_normalizer.*`` in
some cases and a dummy adaptor head ``_heads.0.*`` (ignored by both sides). Upstream loads that file with
``hubconf.radio_model(version=<file>)``; this package with ``create_teacher(<name>, <file>)``. On identical uint8
pixels of a real photo (upstream gets them / 255, as its conditioner expects) it compares

* cls with the first summary token of upstream's ``summary`` (``RadioOutput.summary`` viewed ``(B, k, D)``),
* patch with upstream's ``features``,
* the level of block 0 (``--blocks``) with upstream's block-0 output (hook): the cls slot and the patch tokens.

Cases cover: a real-depth ViT-B/16 ``*_v2_224`` backbone (LayerScale ``grandma``, unused ``reg_token``) with
three summary teachers, registers from ``register_multiple`` and a feature normalizer; a ViT-H/16 at real width
with 2 blocks whose first teacher has no summary (cls is slot 1), a repeated teacher name, explicit
``cpe_num_registers`` and ``model_norm``; a so400m/16 with ``cls_token_per_teacher=False``; a ViT-L/16 without
CPE (``cpe_max_size`` 224: crop-then-resize positions). Inputs: 512x512 and 384x640 (not square, off the grid).

    python tools/check_upstream_radio.py --upstream /tmp/up_radio --commit SHA --out docs/results/radio_upstream.json

(run with ``einops`` importable, e.g. ``PYTHONPATH=/tmp/radio_deps``.)
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from upstream_check import photo_pixels, randomize as seeded_random, report  # noqa: E402  (tools/, run as a script)

from dune_cache.teachers import create_teacher

SIZES = ((512, 512), (384, 640))
CONDITIONER = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))  # non-default mean / std: proves they are read from the file
CASES = (  # teacher name, args.model, model_kwargs, teachers, args extras, with a feature normalizer
    ("c_radio_v3_b", "vit_base_patch16_v2_224", {},
     [{"name": "siglip2-g"}, {"name": "dino_v2-g"}, {"name": "sam", "use_summary": False}],
     {"register_multiple": 8, "cpe_max_size": 2048}, True),
    ("c_radio_v3_h", "vit_huge_patch16_224", {"depth": 2},
     [{"name": "sam", "use_summary": False}, {"name": "siglip2-g"}, {"name": "dino_v2-g"}, {"name": "siglip2-g"}],
     {"cpe_num_registers": 5, "model_norm": True, "cpe_max_size": 2048}, False),
    ("c_radio_v4_so400m", "vit_so400m_patch16_224", {"depth": 2},
     [{"name": "siglip2-g"}, {"name": "dino_v3"}],
     {"cls_token_per_teacher": False, "register_multiple": 10, "cpe_max_size": 2048}, True),
    ("radio_v2_5_l", "vit_large_patch16_224", {"depth": 2},
     [{"name": "clip"}, {"name": "dino_v2"}], {"register_multiple": 4, "cpe_max_size": 224}, False),
)


def release_args(model: str, model_kwargs: dict, teachers: list[dict], extras: dict) -> argparse.Namespace:
    """The ``args`` a RADIO training run pickles, with what ``create_model_from_args`` and ``radio_model`` read."""
    base = dict(model=model, model_kwargs=dict(model_kwargs), teachers=teachers, in_chans=None, input_size=None,
                pretrained=False, num_classes=0, drop=0.0, drop_path=None, drop_block=None, gp=None,
                bn_momentum=None, bn_eps=None, torchscript=False, initial_checkpoint=None, model_norm=False,
                cls_token_per_teacher=True, register_multiple=None, cpe_num_registers=None, spectral_reparam=False,
                damp=None, dtype=torch.float32)
    return argparse.Namespace(**{**base, **extras})


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded values (:func:`upstream_check.randomize`, LayerScale ``grandma`` N(0.5, 0.1) so no block is
    near-identity); positions and prefix tokens N(0, 1)."""
    seeded_random(model, seed, lambda name, p: name.endswith(("pos_embed", "token")))


def release_file(create_model_from_args, case, seed: int, folder: Path) -> Path:
    """Write the case's seeded upstream backbone in the release layout; returns the file."""
    name, model, model_kwargs, teachers, extras, normalizer = case
    args = release_args(model, model_kwargs, teachers, extras)
    backbone = create_model_from_args(release_args(model, model_kwargs, teachers, extras))
    randomize(backbone, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    state = {f"base_model.{k}": v for k, v in backbone.state_dict().items()}
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in CONDITIONER)
    state |= {"input_conditioner.norm_mean": mean, "input_conditioner.norm_std": std,
              "_heads.0.weight": torch.randn(8, backbone.embed_dim, generator=gen)}
    if normalizer:
        d = backbone.embed_dim
        state |= {"_feature_normalizer.mean": torch.randn(d, generator=gen),
                  "_feature_normalizer.tx": torch.eye(d) + torch.randn(d, d, generator=gen) / math.sqrt(d)}
    path = folder / f"{name}_seed{seed}.pth.tar"
    torch.save({"args": args, "state_dict": state}, path)
    return path


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


@torch.no_grad()
def compare(hubconf, case, path: Path, pixels: torch.Tensor) -> dict:
    """One row: upstream vs this package on ``pixels`` ``(1, 3, H, W)``."""
    name = case[0]
    upstream = hubconf.radio_model(version=str(path), progress=False).eval()
    captured = {}
    hook = upstream.model.blocks[0].register_forward_hook(lambda m, i, o: captured.setdefault("block0", o))
    try:
        summary, features = upstream(pixels.float() / 255.0)
    finally:
        hook.remove()
    teacher = create_teacher(name, path)
    ours = teacher(pixels, blocks=(0,))
    h, w = pixels.shape[-2] // 16, pixels.shape[-1] // 16
    d = teacher.spec.embed_dim
    skip = upstream.num_summary_tokens
    slot = int(upstream.summary_idxs[0])
    block0 = captured["block0"]
    level_cls, level_patch = ours.levels[0]
    return {"teacher": name, "arch": case[1], "depth": len(upstream.model.blocks),
            "input": f"{pixels.shape[-2]}x{pixels.shape[-1]}",
            "summary_slot": slot, "summary_tokens": summary.shape[1] // d, "prefix_tokens": skip,
            "cls": max_abs(ours.cls, summary.view(1, -1, d)[:, 0]),
            "patch": max_abs(ours.patch, features.view(1, h, w, d)),
            "level0_cls": max_abs(level_cls, block0[:, slot]),
            "level0_patch": max_abs(level_patch, block0[:, skip:].reshape(1, h, w, d)),
            "patch_max_abs": float(features.abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", type=Path, required=True, help="NVlabs/RADIO checkout (holds hubconf.py)")
    parser.add_argument("--commit", default="unknown", help="the checkout's commit, recorded in the JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the JSON record here")
    args = parser.parse_args()
    cpu_start = time.process_time()
    sys.path.insert(0, str(args.upstream))
    import hubconf  # noqa: PLC0415  (the checkout given on the command line)
    from radio.radio_model import create_model_from_args  # noqa: PLC0415

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            path = release_file(create_model_from_args, case, args.seed, Path(tmp))
            for size in SIZES:
                rows.append(compare(hubconf, case, path, photo_pixels(*size)))
                print(rows[-1], flush=True)
    report("NVlabs/RADIO", args.commit, rows, ("cls", "patch", "level0_cls", "level0_patch"), cpu_start, args.out)


if __name__ == "__main__":
    main()
