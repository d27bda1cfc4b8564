"""Exactness of the DINOv3 teachers against facebookresearch/dinov3's own forward.

For each release model this builds the upstream ``DinoVisionTransformer`` from the hub constructor of a
checkout (``--upstream``, imported at run time, nothing copied), fills every parameter with seeded random
values (LayerScale, norms and biases included, so no block is near-identity), rounds ``rope_embed.periods``
to bfloat16 as the release files store them, saves ``model.state_dict()`` with ``torch.save`` (the release
``.pth`` layout), loads that file with this package and compares on identical normalised pixels:
upstream ``forward_features`` -> ``x_norm_clstoken`` / ``x_storage_tokens`` / ``x_norm_patchtokens`` vs the
teacher's cls / registers / patch. The same weights are also written in timm's layout by timm's own
``checkpoint_filter_fn`` (as ``.safetensors``), which drops ``rope_embed.periods`` (timm computes them in
float32): that file is compared with upstream holding float32 periods (``periods_fp32``, the hub
constructor's own init), and its distance to the bfloat16-period release forward is reported as
``*_vs_bf16_periods`` (information: what a timm-layout copy of a release file loses).

S, S+ and B run at real size; L, H+ and 7B at their real width with fewer blocks (``--reduced-depth``)
to fit a 2-core CPU; ``--full`` runs every model at real depth.

    python tools/check_upstream_dinov3.py --upstream /tmp/up_dinov3 [--commit SHA] [--out FILE.json]
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

REAL_SIZE = ("dinov3_vits16", "dinov3_vits16plus", "dinov3_vitb16")
WIDE = ("dinov3_vitl16", "dinov3_vith16plus", "dinov3_vit7b16")
SIZES = ((256, 256), (224, 320))  # native, and an off-native non-square grid (14 x 20)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter seeded-random (:func:`upstream_check.randomize`); 1-D parameters other than biases (tokens,
    ...) N(0, 1); the periods rounded to bfloat16 as in the release files."""
    seeded_random(model, seed, lambda name, p: p.ndim <= 1 and not name.endswith("bias"))
    with torch.no_grad():
        periods = model.rope_embed.periods
        periods.copy_(periods.bfloat16().float())


def upstream_model(upstream: Path, name: str, depth: int | None, seed: int) -> torch.nn.Module:
    sys.path.insert(0, str(upstream))
    from dinov3.hub import backbones  # noqa: PLC0415  (the checkout given on the command line)

    build = backbones._make_dinov3_vit  # the hub constructors pass depth themselves: override that one argument
    if depth is not None:
        backbones._make_dinov3_vit = lambda **kwargs: build(**{**kwargs, "depth": depth})
    try:
        model = getattr(backbones, name)(pretrained=False)
    finally:
        backbones._make_dinov3_vit = build
    assert depth is None or len(model.blocks) == depth
    randomize(model, seed)
    return model.eval()


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def compare(name: str, upstream: Path, depth: int | None, folder: Path, seed: int) -> list[dict]:
    from safetensors.torch import save_file
    from timm.models.eva import checkpoint_filter_fn

    from dune_cache.teachers import create_teacher, get_spec
    from dune_cache.teachers.base import read_checkpoint
    from dune_cache.teachers.dinov3 import create_dinov3_vit, dinov3_teacher_from_state

    model = upstream_model(upstream, name, depth, seed)
    release = folder / f"{name}_pretrain_lvd1689m-random.pth"
    torch.save(model.state_dict(), release)
    spec = get_spec(name)
    timm_model = create_dinov3_vit(spec.arch, device="meta", depth=depth)
    timm_file = folder / f"{name}_timm.safetensors"
    save_file({k: v.contiguous() for k, v in checkpoint_filter_fn(read_checkpoint(release), timm_model).items()},
              str(timm_file))
    fp32_periods = upstream_model(upstream, name, depth, seed)
    fp32_periods.rope_embed._init_weights()  # the hub constructor's float32 periods, as timm computes them
    rows = []
    for layout, path, reference in (("release .pth", release, model),
                                    ("timm .safetensors", timm_file, fp32_periods)):
        if depth is None:
            teacher = create_teacher(name, path)
        else:
            teacher = dinov3_teacher_from_state(spec, read_checkpoint(path), str(path), depth=depth).eval()
        for h, w in SIZES:
            pixels = torch.randint(0, 256, (2, 3, h, w), generator=torch.Generator().manual_seed(seed + h),
                                   dtype=torch.uint8)
            with torch.no_grad():
                x = teacher.normalize(pixels)
                ref = reference.forward_features(x)
                out = teacher(pixels)
                row = {"teacher": name, "layout": layout, "periods": "bf16" if reference is model else "fp32",
                       "blocks": len(model.blocks), "width": model.embed_dim, "input": f"{h}x{w}",
                       "grid": f"{h // 16}x{w // 16}", **differences(out, ref),
                       "patch_scale": float(ref["x_norm_patchtokens"].abs().max())}
                if reference is not model:
                    row.update({f"{k}_vs_bf16_periods": v
                                for k, v in differences(out, model.forward_features(x)).items()})
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def differences(out, ref: dict) -> dict[str, float]:
    """Max abs differences of a :class:`TeacherOutput` from upstream's ``forward_features`` dict."""
    return {"cls": max_abs(out.cls, ref["x_norm_clstoken"]),
            "registers": max_abs(out.registers, ref["x_storage_tokens"]),
            "patch": max_abs(out.patch.flatten(1, 2), ref["x_norm_patchtokens"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", type=Path, required=True, help="facebookresearch/dinov3 checkout")
    parser.add_argument("--reduced-depth", type=int, default=2, help="blocks of the L, H+ and 7B copies")
    parser.add_argument("--full", action="store_true", help="every model at real depth")
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--commit", help="upstream commit (default: git rev-parse HEAD of --upstream)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    commit = args.commit or subprocess.run(["git", "-C", str(args.upstream), "rev-parse", "HEAD"],
                                           capture_output=True, text=True).stdout.strip() or None
    start = time.process_time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in REAL_SIZE + WIDE:
            depth = None if args.full or name in REAL_SIZE else args.reduced_depth
            rows += compare(name, args.upstream, depth, Path(tmp), args.seed)
    report("facebookresearch/dinov3", commit, rows, ("cls", "registers", "patch"), start, args.out)


if __name__ == "__main__":
    main()
