"""The built-in teacher families: their specs, registered without importing torch.

Each family keeps its model code in its own module (``dinov2``, ``multihmr``, ``mast3r``, ``unic``,
``torchvision_cnn``, ``timm_generic``), imported by a :func:`~.registry.lazy_factory` when one of its teachers
is created; here are the facts ``dune-cache teachers`` lists and extraction checks flags against. A new
family adds its specs here and its factory there.
"""
from __future__ import annotations

from .registry import lazy_factory, register_prefix, register_teacher
from .spec import HALF_MEAN, HALF_STD, IMAGENET_MEAN, IMAGENET_STD, TeacherSpec


def _factory(family: str, name: str):
    """The factory ``name`` of family module ``family``, imported when called."""
    return lazy_factory(f"{__package__}.{family}", name)


# ---------------------------------------------------------------------------------------
# DINOv2 (dinov2.py)
# ---------------------------------------------------------------------------------------
DINOV2_PATCH_SIZE = 14
DINOV2_PRETRAIN_SIZE = 518  # final high-resolution phase of DINOv2 pretraining: 37 x 37 position embeddings
DINOV2_SIZES = {  # name letter -> (timm stem, width)
    "s": ("vit_small", 384),
    "b": ("vit_base", 768),
    "l": ("vit_large", 1024),
    "g": ("vit_giant", 1536),
}


def dinov2_timm_arch(size: str, num_registers: int) -> str:
    """timm model name of DINOv2 size ``s|b|l|g`` with 0 or 4 registers."""
    stem = DINOV2_SIZES[size][0]
    return f"{stem}_patch14_reg{num_registers}_dinov2" if num_registers else f"{stem}_patch14_dinov2"


def _dinov2_spec(size: str, num_registers: int) -> TeacherSpec:
    suffix = f"_reg{num_registers}" if num_registers else ""
    return TeacherSpec(
        name=f"dinov2_vit{size}14{suffix}",
        arch=dinov2_timm_arch(size, num_registers),
        patch_size=DINOV2_PATCH_SIZE,
        embed_dim=DINOV2_SIZES[size][1],
        num_registers=num_registers,
        cls_source="token",
        native_resolution=(DINOV2_PRETRAIN_SIZE, DINOV2_PRETRAIN_SIZE),
        final_norm=True,
        description=(
            f"DINOv2 ViT-{size.upper()}/14{f' with {num_registers} registers' if num_registers else ''} "
            f"(facebookresearch/dinov2, file dinov2_vit{size}14{suffix}_pretrain.pth or timm layout). "
            "Native 518x518: pretrained at 224 then a final high-resolution phase at 518 (37x37 "
            "position embeddings); DUNE feeds 336/448. Tokens after the final norm."
        ),
    )


for _size in DINOV2_SIZES:
    for _registers in (0, 4):
        register_teacher(_dinov2_spec(_size, _registers))(_factory("dinov2", "build_dinov2_teacher"))

# ---------------------------------------------------------------------------------------
# Multi-HMR (multihmr.py)
# ---------------------------------------------------------------------------------------
register_teacher(TeacherSpec(
    name="multihmr",
    arch=dinov2_timm_arch("l", 0),
    patch_size=14,
    embed_dim=1024,
    num_registers=0,
    cls_source="token",
    native_resolution=(672, 672),
    final_norm=True,
    description=(
        "Multi-HMR ViT-L/14 encoder (naver/multi-hmr, file multiHMR_672_L.pt, keys "
        "backbone.encoder.* of model_state_dict): DINOv2-L fine-tuned for human mesh recovery "
        "on 672x672 letterboxed squares. DUNE distils its patch tokens only; the CLS token is "
        "stored too. Tokens after the final norm."
    ),
))(_factory("multihmr", "build_multihmr_teacher"))


# ---------------------------------------------------------------------------------------
# CroCo family: MASt3R, DUSt3R, CroCo v2 (mast3r.py)
# ---------------------------------------------------------------------------------------
def _vit_large_spec(name: str, description: str, **overrides) -> TeacherSpec:
    """Spec of a ViT-L/16 CroCo-family encoder; DUSt3R/MASt3R defaults (mean/std 0.5, 384x512)."""
    defaults = dict(
        arch="croco_vit_large_patch16_rope100", patch_size=16, embed_dim=1024, cls_source="mean_patch",
        mean=HALF_MEAN, std=HALF_STD, native_resolution=(384, 512),
    )
    return TeacherSpec(name=name, description=description, **{**defaults, **overrides})


CROCO_VIT_LARGE_SPECS = (
    _vit_large_spec("mast3r", "MASt3R encoder (MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth)"),
    _vit_large_spec("dust3r", "DUSt3R encoder (DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth)"),
    _vit_large_spec(
        "croco_v2", "CroCo v2 encoder (CroCo_V2_ViTLarge_BaseDecoder.pth), ImageNet normalisation",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, native_resolution=(224, 224),
    ),
)
for _spec in CROCO_VIT_LARGE_SPECS:
    register_teacher(_spec)(_factory("mast3r", "croco_vit_large"))


# ---------------------------------------------------------------------------------------
# UNIC's four ViT-B/16 teachers (unic.py)
# ---------------------------------------------------------------------------------------
def _unic_spec(name: str, arch: str, description: str, *, pooled_cls: bool = False) -> TeacherSpec:
    """ViT-B/16 at 224, ImageNet mean/std; ``pooled_cls``: CLS = fc_norm(mean of patches), no final norm."""
    return TeacherSpec(
        name=name, arch=arch, patch_size=16, embed_dim=768, num_registers=0,
        cls_source="mean_patch" if pooled_cls else "token",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, native_resolution=(224, 224),
        final_norm=not pooled_cls, description=description,
    )


_TOKENS_AFTER_NORM = "CLS and patch tokens after the final norm (UNIC's x_norm_* targets)."

register_teacher(_unic_spec(
    "dino_vitb16", "vit_base_patch16_224",
    "DINO ViT-B/16 (facebookresearch/dino, dino_vitbase16_pretrain.pth, plain state dict; "
    f"a training checkpoint's 'teacher' also loads). UNIC teacher. {_TOKENS_AFTER_NORM}",
))(_factory("unic", "build_dino_vitb16"))

register_teacher(_unic_spec(
    "ibot_vitb16", "vit_base_patch16_224",
    "iBOT ViT-B/16 (bytedance/ibot, vitb_16_rand_mask/checkpoint_teacher.pth, under 'state_dict'; "
    f"a training checkpoint's 'teacher' also loads). UNIC teacher. {_TOKENS_AFTER_NORM}",
))(_factory("unic", "build_ibot_vitb16"))

register_teacher(_unic_spec(
    "deit3_vitb16", "deit3_base_patch16_224",
    "DeiT-III ViT-B/16 (facebookresearch/deit, deit_3_base_224_1k.pth or _21k.pth, under 'model', "
    f"LayerScale gamma_1/gamma_2, classifier dropped). UNIC teacher. {_TOKENS_AFTER_NORM}",
))(_factory("unic", "build_deit3_vitb16"))

register_teacher(_unic_spec(
    "dbot_vitb16", "vit_base_patch16_224 (global_pool=avg, fc_norm)",
    "dBOT-ft ViT-B/16 (liuxingbin/dbot, 84.5_dbot_base_finetune.pth, ImageNet-1k fine-tuned, MAE "
    "fine-tune layout under 'model': fc_norm instead of norm, classifier dropped). UNIC teacher. As in "
    "UNIC: CLS = fc_norm(mean of patch tokens) (the fine-tuned pooled feature, not the class token); "
    "patch tokens = last block output (the model has no final norm).",
    pooled_cls=True,
))(_factory("unic", "build_dbot_vitb16"))

# ---------------------------------------------------------------------------------------
# torchvision's MobileNetV2 (torchvision_cnn.py)
# ---------------------------------------------------------------------------------------
MOBILENET_V2 = TeacherSpec(
    name="mobilenet_v2", arch="torchvision mobilenet_v2 (features only)", patch_size=32, embed_dim=1280,
    num_registers=0, cls_source="mean_patch", mean=IMAGENET_MEAN, std=IMAGENET_STD, native_resolution=(224, 224),
    final_norm=True,
    description="MobileNetV2, ImageNet-1k supervised (torchvision weights); patch = final 1280-d feature map "
                "(stride 32, after BN+ReLU6), CLS = its global average pool (the classifier's input)",
)
register_teacher(MOBILENET_V2)(_factory("torchvision_cnn", "mobilenet_v2"))

# ---------------------------------------------------------------------------------------
# Any timm ViT: ``timm:<model_name>`` (timm_generic.py)
# ---------------------------------------------------------------------------------------
register_prefix("timm", "any timm ViT-style model (dynamic_img_size) from a local checkpoint file")(
    _factory("timm_generic", "timm_teacher"))
