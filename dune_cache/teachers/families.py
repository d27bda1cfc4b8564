"""The built-in teacher families: their specs, registered without importing torch.

Each family keeps its model code in its own module (``dinov2``, ``multihmr``, ``mast3r``, ``unic``,
``torchvision_cnn``, ``timm_generic``), imported by a :func:`~.registry.lazy_factory` when one of its teachers
is created; here are the facts ``dune-cache teachers`` lists and extraction checks flags against. A new
family adds its specs here and its factory there.
"""
from __future__ import annotations

from dataclasses import dataclass

from .registry import lazy_factory, register_prefix, register_teacher
from .spec import CLIP_MEAN, CLIP_STD, HALF_MEAN, HALF_STD, IMAGENET_MEAN, IMAGENET_STD, TeacherSpec


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

_UPSTREAM_POS = ("Position embeddings resampled off 224 exactly as DINO/iBOT's interpolate_pos_encoding "
                 "(bicubic, +0.1 scale-factor offset, no antialiasing) instead of timm's antialiased bicubic; "
                 "equal to the default name at 224.")
for _name, _upstream in (("dino_vitb16", "facebookresearch/dino"), ("ibot_vitb16", "bytedance/ibot")):
    register_teacher(_unic_spec(
        f"{_name}_upstream_pos", "vit_base_patch16_224",
        f"{_name} (same checkpoints, {_upstream}) run by the DINOv2 code path. {_UPSTREAM_POS} {_TOKENS_AFTER_NORM}",
    ))(_factory("unic", f"build_{_name}_upstream_pos"))

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


# ---------------------------------------------------------------------------------------
# DINOv3 (dinov3.py)
# ---------------------------------------------------------------------------------------
DINOV3_PATCH_SIZE = 16
DINOV3_NUM_STORAGE_TOKENS = 4
DINOV3_NATIVE_SIZE = 256  # pretraining global crops (ViT-7B high-res adaptation: 512/768); upstream eval transform
DINOV3_SIZES = {  # release name -> (timm model with the release's qkv biases, width, display name)
    "dinov3_vits16": ("vit_small_patch16_dinov3_qkvb", 384, "ViT-S/16"),
    "dinov3_vits16plus": ("vit_small_plus_patch16_dinov3_qkvb", 384, "ViT-S+/16 (SwiGLU)"),
    "dinov3_vitb16": ("vit_base_patch16_dinov3_qkvb", 768, "ViT-B/16"),
    "dinov3_vitl16": ("vit_large_patch16_dinov3_qkvb", 1024, "ViT-L/16"),
    "dinov3_vith16plus": ("vit_huge_plus_patch16_dinov3_qkvb", 1280, "ViT-H+/16 (SwiGLU)"),
    "dinov3_vit7b16": ("vit_7b_patch16_dinov3", 4096, "ViT-7B/16 (SwiGLU, no qkv bias)"),
}


def _dinov3_spec(name: str) -> TeacherSpec:
    arch, width, display = DINOV3_SIZES[name]
    return TeacherSpec(
        name=name, arch=arch, patch_size=DINOV3_PATCH_SIZE, embed_dim=width,
        num_registers=DINOV3_NUM_STORAGE_TOKENS, cls_source="token", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        native_resolution=(DINOV3_NATIVE_SIZE, DINOV3_NATIVE_SIZE), final_norm=True,
        description=(
            f"DINOv3 {display}, LVD-1689M (facebookresearch/dinov3, file {name}_pretrain_lvd1689m-*.pth, or "
            f"timm's {arch.removesuffix('_qkvb')}[_qkvb] layout). Axial RoPE (base 100, coordinates in [-1, 1] "
            "per axis, eval: no jitter), so any multiple of 16 runs without resampling; native 256x256 (the "
            "upstream eval transform). cls = class token, registers = the 4 storage tokens, patch = patch "
            "tokens, all after the final norm (upstream x_norm_clstoken / x_storage_tokens / "
            "x_norm_patchtokens); storage tokens are not in patch."
        ),
    )


for _name in DINOV3_SIZES:
    register_teacher(_dinov3_spec(_name))(_factory("dinov3", "build_dinov3_teacher"))


# ---------------------------------------------------------------------------------------
# SigLIP2 fixed-resolution vision towers (siglip2.py)
# ---------------------------------------------------------------------------------------
SIGLIP2_TOWERS = {  # name stem -> (timm stem, Hugging Face model-card stem, width, patch, released resolutions)
    "vitb16": ("vit_base_patch16_siglip", "google/siglip2-base-patch16", 768, 16, (224, 256, 384, 512)),
    "vitl16": ("vit_large_patch16_siglip", "google/siglip2-large-patch16", 1024, 16, (256, 384, 512)),
    "so400m14": ("vit_so400m_patch14_siglip", "google/siglip2-so400m-patch14", 1152, 14, (224, 378)),
    "so400m16": ("vit_so400m_patch16_siglip", "google/siglip2-so400m-patch16", 1152, 16, (256, 384, 512)),
    "vitg16": ("vit_giantopt_patch16_siglip", "google/siglip2-giant-opt-patch16", 1536, 16, (256, 384)),
}
# The HF card "so400m-patch14-384" is a 27 x 27 grid (its conv drops 384 - 27*14 = 6 pixels): 378 px here.
SIGLIP2_HF_CARD_RESOLUTION = {378: 384}


def _siglip2_spec(stem: str, resolution: int) -> TeacherSpec:
    timm_stem, hf_card, width, patch, _ = SIGLIP2_TOWERS[stem]
    grid = resolution // patch
    card = f"{hf_card}-{SIGLIP2_HF_CARD_RESOLUTION.get(resolution, resolution)}"
    return TeacherSpec(
        name=f"siglip2_{stem}_{resolution}",
        arch=f"{timm_stem}_{resolution}",
        patch_size=patch,
        embed_dim=width,
        num_registers=0,
        cls_source="attn_pool",
        mean=HALF_MEAN,
        std=HALF_STD,
        native_resolution=(resolution, resolution),
        final_norm=True,
        description=(
            f"SigLIP2 vision tower ({card}, timm {timm_stem}_{resolution}.v2_webli), {grid}x{grid} position "
            "embeddings; checkpoint in the timm layout (attn_pool.*) or the Hugging Face layout (vision_model.*, "
            "alone or in a full SiglipModel whose text_model.*, logit_scale and logit_bias are ignored). "
            "No CLS token: cls = the attention-pool head output (MAP head over the post_layernorm tokens: "
            "HF pooler_output, timm attn_pool, SigLIP's image embedding before the contrastive logits); "
            "patch = tokens after post_layernorm (timm norm). Off the native grid the position embeddings are "
            "resized bicubic, align_corners=False, no antialiasing (HF interpolate_pos_encoding)."
        ),
    )


for _stem, (*_, _resolutions) in SIGLIP2_TOWERS.items():
    for _resolution in _resolutions:
        register_teacher(_siglip2_spec(_stem, _resolution))(_factory("siglip2", "build_siglip2_teacher"))

# ---------------------------------------------------------------------------------------
# SAM image encoders (sam.py)
# ---------------------------------------------------------------------------------------
SAM_PATCH_SIZE = 16
SAM_CANVAS = 1024  # SAM resizes the long side to 1024 and pads to 1024x1024: a 64x64 grid
SAM_NECK_DIM = 256
SAM_SIZES = {  # letter -> (timm model, encoder width, release checkpoint file)
    "b": ("samvit_base_patch16", 768, "sam_vit_b_01ec64.pth"),
    "l": ("samvit_large_patch16", 1024, "sam_vit_l_0b3195.pth"),
    "h": ("samvit_huge_patch16", 1280, "sam_vit_h_4b8939.pth"),
}


def _sam_spec(size: str, after_neck: bool) -> TeacherSpec:
    """``sam_vit{size}`` (after the neck, 256-d) or ``sam_vit{size}_encoder`` (last block, encoder width)."""
    arch, width, release = SAM_SIZES[size]
    tokens = ("patch = SAM's image embedding: the output of the neck (1x1 conv, LayerNorm2d, 3x3 conv, "
              f"LayerNorm2d), {SAM_NECK_DIM}-d" if after_neck else
              f"patch = the last block's output before the neck, {width}-d (SAM's encoder has no final norm)")
    return TeacherSpec(
        name=f"sam_vit{size}" if after_neck else f"sam_vit{size}_encoder",
        arch=arch, patch_size=SAM_PATCH_SIZE, embed_dim=SAM_NECK_DIM if after_neck else width, num_registers=0,
        cls_source="mean_patch", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        native_resolution=(SAM_CANVAS, SAM_CANVAS), final_norm=after_neck,
        description=(
            f"SAM ViT-{size.upper()}/16 image encoder (facebookresearch/segment-anything, {release}: its "
            "image_encoder.* keys, prompt_encoder.*/mask_decoder.* ignored; or timm's samvit layout). "
            f"{tokens}; no CLS token: cls = mean of the patch tokens; no registers. Native {SAM_CANVAS}x{SAM_CANVAS} "
            f"(64x64 grid). A smaller input (each side <= {SAM_CANVAS}) is zero-padded at the bottom/right to "
            f"{SAM_CANVAS}x{SAM_CANVAS} after normalisation, as SAM's preprocess does, and its own top-left "
            "H/16 x W/16 tokens are kept (nothing interpolated); larger inputs are refused."
            + ("" if not after_neck else f" For --blocks (levels are {width}-d) use sam_vit{size}_encoder.")
        ),
    )


for _size in SAM_SIZES:
    register_teacher(_sam_spec(_size, after_neck=True))(_factory("sam", "sam_neck_teacher"))
    register_teacher(_sam_spec(_size, after_neck=False))(_factory("sam", "sam_encoder_teacher"))


# ---------------------------------------------------------------------------------------
# Depth Anything V2 encoders (depth_anything_v2.py)
# ---------------------------------------------------------------------------------------
DEPTH_ANYTHING_V2_DPT_BLOCKS = {  # size -> the 4 blocks (0-based) whose final-normed tokens the DPT head reads
    "s": (2, 5, 8, 11),
    "b": (2, 5, 8, 11),
    "l": (4, 11, 17, 23),
    "g": (9, 19, 29, 39),
}


def _depth_anything_v2_spec(size: str) -> TeacherSpec:
    blocks = DEPTH_ANYTHING_V2_DPT_BLOCKS[size]
    return TeacherSpec(
        name=f"depth_anything_v2_vit{size}", arch=dinov2_timm_arch(size, 0), patch_size=DINOV2_PATCH_SIZE,
        embed_dim=DINOV2_SIZES[size][1], num_registers=0, cls_source="token", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        native_resolution=(DINOV2_PRETRAIN_SIZE, DINOV2_PRETRAIN_SIZE), final_norm=True,
        description=(
            f"Depth Anything V2 ViT-{size.upper()}/14 encoder (DepthAnything/Depth-Anything-V2, file "
            f"depth_anything_v2_vit{size}.pth: the DINOv2 encoder under 'pretrained.', the DPT head under "
            "'depth_head.' ignored). DINOv2 without registers, position embeddings resized as DINOv2 "
            "(bicubic, +0.1 offset); native 518 (upstream resizes the shorter side to 518, multiple of 14), "
            f"ImageNet mean/std. The DPT head reads get_intermediate_layers(x, {list(blocks)}, "
            "return_class_token=True): those 4 blocks' tokens, each after the final norm. cls / patch = "
            f"block {blocks[-1]} (the last of the 4, the last block) after the final norm: class token / "
            f"patch tokens. Levels are after the final norm too: --blocks dpt ({','.join(map(str, blocks))}) stores "
            "exactly what the DPT head reads."
        ),
    )


for _size in DEPTH_ANYTHING_V2_DPT_BLOCKS:
    register_teacher(_depth_anything_v2_spec(_size))(_factory("depth_anything_v2", "build_depth_anything_v2_teacher"))


# ---------------------------------------------------------------------------------------
# RADIO / C-RADIO ViT backbones with CPE (radio.py)
# ---------------------------------------------------------------------------------------
RADIO_PATCH_SIZE = 16
RADIO_ARCH = "radio_cpe_vit_patch16"  # until loaded: then the checkpoint's args.model


@dataclass(frozen=True)
class RadioRelease:
    """A released RADIO model: upstream's ``hubconf.radio_model(version=...)`` string, width, preferred
    resolution, and the ``args.model`` random weights are built with (no checkpoint: speed only)."""

    version: str
    width: int
    native: int
    random_model: str


RADIO_RELEASES = {
    "radio_v2_5_b": RadioRelease("radio_v2.5-b", 768, 768, "vit_base_patch16_224"),
    "radio_v2_5_l": RadioRelease("radio_v2.5-l", 1024, 768, "vit_large_patch16_224"),
    "radio_v2_5_h": RadioRelease("radio_v2.5-h", 1280, 768, "vit_huge_patch16_224"),
    "radio_v2_5_h_norm": RadioRelease("radio_v2.5-h-norm", 1280, 768, "vit_huge_patch16_224"),
    "c_radio_v3_b": RadioRelease("c-radio_v3-b", 768, 512, "vit_base_patch16_v2_224"),
    "c_radio_v3_l": RadioRelease("c-radio_v3-l", 1024, 512, "vit_large_patch16_v2_224"),
    "c_radio_v3_h": RadioRelease("c-radio_v3-h", 1280, 512, "vit_huge_patch16_224"),
    "c_radio_v3_g": RadioRelease("c-radio_v3-g", 1536, 512, "vit_giant_patch16_224"),
    "c_radio_v4_so400m": RadioRelease("c-radio_v4-so400m", 1152, 512, "vit_so400m_patch16_224"),
    "c_radio_v4_h": RadioRelease("c-radio_v4-h", 1280, 512, "vit_huge_patch16_224"),
}


def _radio_spec(name: str) -> TeacherSpec:
    release = RADIO_RELEASES[name]
    return TeacherSpec(
        name=name, arch=RADIO_ARCH,
        patch_size=RADIO_PATCH_SIZE, embed_dim=release.width, num_registers=0, cls_source="token",
        mean=CLIP_MEAN, std=CLIP_STD, native_resolution=(release.native, release.native),
        final_norm=False,
        description=(
            f"RADIO {release.version} (NVlabs/RADIO release .pth.tar, hubconf version {release.version!r}): args + "
            "state_dict(_ema); backbone base_model.*, input_conditioner.* (the model's own input normalisation, "
            "read from the file; CLIP mean/std in the releases), optional _feature_normalizer.*; the adaptor heads "
            "(_heads.*, _feature_projections.*) and _intermediate_feature_normalizer.* ignored. The backbone, its "
            "summary tokens and registers are read from args (num_registers here: 0 until loaded). "
            "RADIO's summary is k per-teacher summary tokens concatenated (k*D); a cache group has one width, so "
            "cls = the summary token of the checkpoint's first summary teacher (named below once loaded; "
            "radio:<this name>@<teacher> picks another). "
            "patch = RADIO's spatial features (feature normalizer applied when the file has one), no final norm "
            "unless args.model_norm. Positions (CPE grid, 128x128 at cpe_max_size 2048): resized bilinear, "
            "align_corners=False, to a square of the larger grid side and cropped top-left, as the NVlabs/RADIO "
            f"repository does. Preferred resolution {release.native}x{release.native}; any multiple of 16 works."
        ),
    )


for _name in RADIO_RELEASES:
    register_teacher(_radio_spec(_name))(_factory("radio", "build_radio_teacher"))

register_prefix("radio", "a RADIO release above with cls = the summary token of another of its summary teachers "
                "(a name in the checkpoint's args.teachers), e.g. radio:c_radio_v3_b@dino_v2-g",
                form="<release>@<summary teacher>")(
    _factory("radio", "radio_head_teacher"))
