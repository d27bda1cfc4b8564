"""Exactness of the ``siglip2_*`` teachers against Hugging Face transformers' own Siglip modelling code.

For each teacher: build ``transformers.SiglipModel`` (the class of the fixed-resolution ``google/siglip2-*``
cards) from its own source with the tower's real config (``--depth`` reduces the number of vision blocks),
fill every parameter with seeded random values, ``save_pretrained`` it (``model.safetensors``, vision and text
towers), and write the same weights in timm's layout (converted here module by module from the HF model
objects, independently of the package's key converter). Both files are loaded by this package (``create_teacher``
at real depth) and run on identical uint8 pixels of a real photo; the package's ``cls``/``patch`` are compared
with HF's ``pooler_output``/``last_hidden_state`` on the same normalised pixels, at the native size and at one
off-native, non-square size (HF ``interpolate_pos_encoding=True``).

transformers is imported at run time from ``--upstream`` (a ``pip install --target`` folder holding it), appended
to ``sys.path`` so the project's own packages (torch, numpy) keep precedence; nothing of it is copied here::

    python -m pip install --target /tmp/up_siglip2_pkgs transformers
    python tools/check_upstream_siglip2.py --upstream /tmp/up_siglip2_pkgs
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from dune_cache.teachers import create_teacher, get_spec
from dune_cache.teachers.base import find_state_dict, read_checkpoint
from dune_cache.teachers.siglip2 import siglip2_teacher_from_state

from upstream_check import photo_pixels  # noqa: E402  (tools/, run as a script)


@dataclass(frozen=True)
class Tower:
    """Vision config numbers of a SigLIP2 card (``config.json`` ``vision_config``)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int


TOWERS = {  # teacher name stem -> HF vision_config of the google/siglip2-* cards
    "vitb16": Tower(768, 3072, 12, 12),
    "vitl16": Tower(1024, 4096, 24, 16),
    "so400m14": Tower(1152, 4304, 27, 16),
    "so400m16": Tower(1152, 4304, 27, 16),
    "vitg16": Tower(1536, 6144, 40, 16),
}
DEFAULT_CHECKS = ("siglip2_vitb16_224", "siglip2_vitl16_256", "siglip2_so400m14_224", "siglip2_so400m16_256",
                  "siglip2_vitg16_256:4")


def import_transformers(upstream: Path):
    sys.path.append(str(upstream))
    import transformers

    return transformers


def build_hf_model(transformers, name: str, depth: int, seed: int):
    """``SiglipModel`` with the vision tower of teacher ``name`` (``depth`` blocks) and a small text tower."""
    spec = get_spec(name)
    tower = TOWERS[name.split("_")[1]]
    vision = transformers.SiglipVisionConfig(
        hidden_size=tower.hidden, intermediate_size=tower.intermediate, num_hidden_layers=depth,
        num_attention_heads=tower.heads, image_size=spec.native_resolution[0], patch_size=spec.patch_size,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    text = transformers.SiglipTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=100, max_position_embeddings=16)
    config = transformers.SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())
    config._attn_implementation = "eager"
    model = transformers.SiglipModel(config).eval()
    randomize(model, seed)
    return model


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter seeded-random: norms' weights around 1, everything else N(0, 0.02²)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        is_norm_weight = ("norm" in name) and name.endswith("weight")
        param.copy_(1.0 + 0.1 * noise if is_norm_weight else 0.02 * noise)


def timm_layout(hf_vision) -> dict[str, torch.Tensor]:
    """timm state dict of HF ``SiglipVisionTransformer`` ``hf_vision``, read module by module."""
    emb, head = hf_vision.embeddings, hf_vision.head
    state = {"patch_embed.proj.weight": emb.patch_embedding.weight, "patch_embed.proj.bias": emb.patch_embedding.bias,
             "pos_embed": emb.position_embedding.weight[None]}
    for i, layer in enumerate(hf_vision.encoder.layers):
        attn = layer.self_attn
        modules = {"norm1": layer.layer_norm1, "attn.proj": attn.out_proj, "norm2": layer.layer_norm2,
                   "mlp.fc1": layer.mlp.fc1, "mlp.fc2": layer.mlp.fc2}
        for kind in ("weight", "bias"):
            state[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([getattr(p, kind) for p in (attn.q_proj, attn.k_proj,
                                                                                          attn.v_proj)])
            state.update({f"blocks.{i}.{n}.{kind}": getattr(m, kind) for n, m in modules.items()})
    d = head.probe.shape[-1]
    mha = head.attention
    state.update({
        "norm.weight": hf_vision.post_layernorm.weight, "norm.bias": hf_vision.post_layernorm.bias,
        "attn_pool.latent": head.probe,
        "attn_pool.q.weight": mha.in_proj_weight[:d], "attn_pool.q.bias": mha.in_proj_bias[:d],
        "attn_pool.kv.weight": mha.in_proj_weight[d:], "attn_pool.kv.bias": mha.in_proj_bias[d:],
        "attn_pool.proj.weight": mha.out_proj.weight, "attn_pool.proj.bias": mha.out_proj.bias,
        "attn_pool.norm.weight": head.layernorm.weight, "attn_pool.norm.bias": head.layernorm.bias,
    })
    for n in ("fc1", "fc2"):
        for kind in ("weight", "bias"):
            state[f"attn_pool.mlp.{n}.{kind}"] = getattr(getattr(head.mlp, n), kind)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def load_package_teacher(name: str, path: Path, depth: int, full_depth: bool):
    """The package's teacher from ``path``: ``create_teacher`` at real depth, else the reduced-depth builder."""
    if full_depth:
        return create_teacher(name, path)
    spec = get_spec(name)
    return siglip2_teacher_from_state(spec, find_state_dict(read_checkpoint(path)), str(path), depth).eval()


@torch.no_grad()
def compare(transformers, check: str, seed: int, workdir: Path) -> list[str]:
    """Markdown table rows ``| teacher | layout | depth | input | max|Δ| cls | max|Δ| patch |`` for ``check``."""
    name, _, depth_text = check.partition(":")
    spec = get_spec(name)
    real_depth = TOWERS[name.split("_")[1]].layers
    depth = int(depth_text) if depth_text else real_depth
    hf = build_hf_model(transformers, name, depth, seed)
    hf_dir = workdir / f"{name}_hf"
    hf.save_pretrained(hf_dir)
    timm_file = workdir / f"{name}_timm.safetensors"
    save_file(timm_layout(hf.vision_model), str(timm_file))
    p = spec.patch_size
    native = spec.native_resolution
    sizes = (native, (native[0] - 2 * p, native[1] + 2 * p))
    rows = []
    for layout, path in (("HF model.safetensors", hf_dir / "model.safetensors"), ("timm", timm_file)):
        teacher = load_package_teacher(name, path, depth, depth == real_depth)
        for size in sizes:
            pixels = photo_pixels(*size)
            ours = teacher(pixels)
            normalised = (pixels.float() / 255.0 - 0.5) / 0.5
            ref = hf.vision_model(pixel_values=normalised, interpolate_pos_encoding=size != native)
            grid = (size[0] // p, size[1] // p)
            ref_patch = ref.last_hidden_state.reshape(1, *grid, -1)
            d_cls = (ours.cls - ref.pooler_output).abs().max().item()
            d_patch = (ours.patch - ref_patch).abs().max().item()
            depth_note = f"{depth} (real)" if depth == real_depth else f"{depth} of {real_depth}"
            rows.append(f"| {name} | {layout} | {depth_note} | {size[0]}x{size[1]} | {d_cls:.1e} | {d_patch:.1e} |")
            print(rows[-1], flush=True)
        del teacher
        gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", type=Path, required=True, help="folder holding the transformers package")
    parser.add_argument("--checks", nargs="+", default=list(DEFAULT_CHECKS),
                        help="teacher names, NAME:DEPTH for a reduced number of vision blocks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=1e-4)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    transformers = import_transformers(args.upstream)
    print(f"transformers {transformers.__version__} from {Path(transformers.__file__).parent}; "
          f"torch {torch.__version__}")
    print("| teacher | checkpoint layout | vision blocks | input | max abs diff cls | max abs diff patch |")
    print("|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for check in args.checks:
            rows += compare(transformers, check, args.seed, Path(tmp))
            gc.collect()
    worst = max(float(v) for row in rows for v in row.strip("| ").split(" | ")[-2:])
    print(f"worst max abs diff: {worst:.1e} (threshold {args.threshold:g})")
    sys.exit(0 if worst <= args.threshold else 1)


if __name__ == "__main__":
    main()
