"""Augmentation when the teachers' targets come from a cache instead of a live teacher.

A live-teacher recipe (DUNE) augments the image once and feeds the *same* view to the student and
every teacher. With cached targets the teacher saw one fixed view per image, so every augmentation
is an approximation of that recipe; each mode below says what it costs and what it approximates.

``none``
    The student sees the whole image at its input size; targets are the cached tokens as they are.
    No extra storage, exact targets, but no geometric augmentation: one view per image, which is
    what Beyer et al. ("patient and consistent") show overfits over long schedules (CVPR 2022).

``grid-crop`` (default)
    A RandomResizedCrop (``crop_scale``, ``crop_ratio``) whose box is snapped to whole cells of the
    cached token grid (at least ``min_cells`` cells a side), plus a horizontal flip. The student
    gets the box's pixels of the whole image resized to its input size; the patch targets are the
    cached full-image tokens inside the box (flipped alike), a ReLabel-style RoI of a full-image
    label map. **No extra storage.** Approximation: a live teacher would re-render the crop at its
    full input resolution, while the cached tokens were computed on the whole image — each target
    token carries the context of the whole image and covers its cell at the full-image scale (a
    crop of scale ``s`` is seen by the student about ``1/√s`` times magnified). The CLS target stays
    the full-image CLS, although the student's view shows only part of the image. Boxes whose ideal
    size would leave the grid, or break the scale/ratio bounds after snapping, are replaced by the
    nearest allowed box instead of being re-drawn as torchvision does.

``views`` (K cached views per image, ``dune-cache extract --views K``)
    The cache holds, besides the whole image, K RandomResizedCrop views per image (boxes and flip
    flags stored with the tokens, FKD-style). Each epoch every sample shows one of its K views, drawn
    uniformly; the student gets that view's box of the whole image, flipped alike and resized to its
    input size (:func:`crop_view_pixels`, the very function the extraction cut the teacher's input
    with), so the targets are **exact**: the teacher saw the same crop. **(K+1)× the storage and
    extraction compute**; only K fixed views per image instead of a fresh crop each epoch.

Photometric (``photometric``, student input only)
    DUNE's colour recipe — ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8 (random order of the four
    adjustments), grayscale p=0.2, GaussianBlur(kernel 9, σ ∈ [0.1, 5]) p=0.2, Solarize(0.5)
    p=0.2 — applied to the student's pixels only. Free in storage. It assumes the teachers'
    features are invariant to these changes (true for the colour-invariance DINOv2 was trained
    for, less so for MASt3R/Multi-HMR and for solarisation or grayscale): the student learns to map
    the recoloured image to the features of the original colours.

Randomness comes from an explicit ``torch.Generator`` everywhere, so a batch is reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

from dune_cache import crop_view

from ..config import AUGMENT_MODES, AugmentConfig

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's RGB -> luma weights


@dataclass(frozen=True)
class GridCrop:
    """A box of ``h × w`` cells at cell ``(y0, x0)`` of a token grid, then a horizontal flip if ``flip``."""

    y0: int
    x0: int
    h: int
    w: int
    flip: bool


def full_grid_crop(grid: tuple[int, int]) -> GridCrop:
    """The identity crop of a ``(h, w)`` grid."""
    return GridCrop(y0=0, x0=0, h=grid[0], w=grid[1], flip=False)


def allowed_box_sizes(grid: tuple[int, int], cfg: AugmentConfig) -> torch.Tensor:
    """``(K, 2)`` int64: every ``(h, w)`` in cells that respects ``min_cells``, the scale and ratio bounds."""
    gh, gw = grid
    hs, ws = torch.meshgrid(torch.arange(cfg.min_cells, gh + 1), torch.arange(cfg.min_cells, gw + 1),
                            indexing="ij")
    hs, ws = hs.reshape(-1), ws.reshape(-1)
    scale = hs * ws / (gh * gw)
    ratio = ws / hs
    ok = ((scale >= cfg.crop_scale[0] - 1e-9) & (scale <= cfg.crop_scale[1] + 1e-9)
          & (ratio >= cfg.crop_ratio[0] - 1e-9) & (ratio <= cfg.crop_ratio[1] + 1e-9))
    if not ok.any():
        raise ValueError(f"no crop of grid {grid} has at least {cfg.min_cells} cells a side, scale in "
                         f"{cfg.crop_scale} and ratio in {cfg.crop_ratio}; widen the bounds")
    return torch.stack([hs[ok], ws[ok]], dim=1)


def _uniform(generator: torch.Generator, low: float, high: float, n: int = 1) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def sample_grid_crop(grid: tuple[int, int], cfg: AugmentConfig, generator: torch.Generator) -> GridCrop:
    """A random resized crop snapped to whole cells of ``grid`` ``(h, w)``, with a random flip.

    As torchvision's RandomResizedCrop: area fraction uniform in ``crop_scale``, log-ratio uniform in
    ``log(crop_ratio)``; the ideal box is replaced by the allowed cell box nearest to it (in log
    height/width), then placed uniformly. Other modes (``none``, ``views``): the whole grid, no flip, no draws.
    """
    if cfg.mode not in AUGMENT_MODES:
        raise ValueError(f"unknown augmentation mode {cfg.mode!r}; choose one of {', '.join(AUGMENT_MODES)}")
    if cfg.mode != "grid-crop":
        return full_grid_crop(grid)
    sizes = allowed_box_sizes(grid, cfg)
    area = _uniform(generator, *cfg.crop_scale) * grid[0] * grid[1]
    log_ratio = _uniform(generator, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]))
    ideal = torch.cat([0.5 * (area.log() - log_ratio), 0.5 * (area.log() + log_ratio)])  # log h, log w
    h, w = sizes[(sizes.log() - ideal).square().sum(dim=1).argmin()].tolist()
    y0 = int(torch.randint(grid[0] - h + 1, (1,), generator=generator))
    x0 = int(torch.randint(grid[1] - w + 1, (1,), generator=generator))
    flip = bool(torch.rand(1, generator=generator) < cfg.flip_p)
    return GridCrop(y0=y0, x0=x0, h=h, w=w, flip=flip)


def crop_pixels(pixels: torch.Tensor, crop: GridCrop, grid: tuple[int, int], out_size: tuple[int, int]) -> torch.Tensor:
    """The crop's region of the whole image, resized (bicubic, antialiased) to ``out_size`` and flipped.

    pixels: uint8 ``(3, H, W)``, the whole image with the cached geometry's framing (the grid's cell
    ``(y, x)`` covers ``[y·H/h, (y+1)·H/h) × [x·W/w, (x+1)·W/w)``; box edges falling between pixels
    are rounded to the nearest one); grid: ``(h, w)``; out_size: ``(H_s, W_s)``.
    Returns uint8 ``(3, H_s, W_s)``.
    """
    height, width = pixels.shape[-2:]
    top, bottom = (round(y * height / grid[0]) for y in (crop.y0, crop.y0 + crop.h))
    left, right = (round(x * width / grid[1]) for x in (crop.x0, crop.x0 + crop.w))
    region = TF.resize(pixels[:, top:bottom, left:right], list(out_size),
                       interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return region.flip(-1) if crop.flip else region


def draft_size(crop: GridCrop, grid: tuple[int, int], out_size: tuple[int, int]) -> tuple[int, int]:
    """``(W, H)``: the smallest whole-image size at which the crop's region still has ``out_size`` ``(H_s, W_s)``
    pixels (a JPEG decoded at a reduced scale no smaller than it loses nothing the student sees)."""
    return (math.ceil(out_size[1] * grid[1] / crop.w), math.ceil(out_size[0] * grid[0] / crop.h))


def crop_tokens(patch: torch.Tensor, crop: GridCrop) -> torch.Tensor:
    """The same box and flip on a token grid: ``(..., h, w, D)`` -> ``(..., crop.h, crop.w, D)``."""
    grid_h, grid_w = patch.shape[-3:-1]
    if crop.y0 + crop.h > grid_h or crop.x0 + crop.w > grid_w:
        raise ValueError(f"crop {crop} does not fit the token grid {(grid_h, grid_w)}")
    region = patch[..., crop.y0:crop.y0 + crop.h, crop.x0:crop.x0 + crop.w, :]
    return region.flip(-2) if crop.flip else region


def crop_view_pixels(image: Image.Image, box: np.ndarray, flip: bool, out_size: tuple[int, int]) -> torch.Tensor:
    """``views`` mode: the student's input for a cached view — the view's ``box`` ``(y0, x0, y1, x1)`` of the
    whole RGB ``image`` (relative coordinates), mirrored if ``flip``, resized to ``out_size`` ``(H_s, W_s)``.

    It is :func:`dune_cache.images.views.crop_view`, the function the extraction cut the teacher's input with, so
    student and teacher see the same region with the same resampling. Returns uint8 ``(3, H_s, W_s)``.
    """
    return torch.from_numpy(crop_view(image, box, flip, out_size))


@dataclass(frozen=True)
class PhotometricConfig:
    """DUNE's colour augmentation (``data/transform.py`` there); defaults are its values."""

    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.2
    blur_kernel: int = 9
    blur_sigma: tuple[float, float] = (0.1, 5.0)
    solarize_p: float = 0.2
    solarize_threshold: float = 0.5  # on [0, 1] pixels


@dataclass
class PhotometricParams:
    """Per-image draws for a batch of ``B``: masks ``(B,)`` bool, factors ``(B,)`` float, order ``(B, 4)``.

    ``jitter_order[b]`` is the order in which image ``b`` gets brightness (0), contrast (1),
    saturation (2) and hue (3); ``jitter_factors[:, k]`` their factors.
    """

    jitter: torch.Tensor
    jitter_order: torch.Tensor
    jitter_factors: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    blur_sigma: torch.Tensor
    solarize: torch.Tensor


def sample_photometric_params(n: int, generator: torch.Generator,
                              cfg: PhotometricConfig = PhotometricConfig()) -> PhotometricParams:
    """Draw every random choice for ``n`` images, in a fixed order (reproducible from the generator)."""
    jitter = torch.rand(n, generator=generator) < cfg.jitter_p
    jitter_order = torch.rand(n, 4, generator=generator).argsort(dim=1)
    jitter_factors = torch.stack([
        _uniform(generator, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, n),
        _uniform(generator, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, n),
        _uniform(generator, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, n),
        _uniform(generator, -cfg.hue, cfg.hue, n)], dim=1)
    grayscale = torch.rand(n, generator=generator) < cfg.grayscale_p
    blur = torch.rand(n, generator=generator) < cfg.blur_p
    blur_sigma = _uniform(generator, *cfg.blur_sigma, n)
    solarize = torch.rand(n, generator=generator) < cfg.solarize_p
    return PhotometricParams(jitter, jitter_order, jitter_factors, grayscale, blur, blur_sigma, solarize)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` -> ``(N, 1, H, W)`` grayscale."""
    weights = x.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _per_image(factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """float ``(N, 3, H, W)`` in [0, 1], factor ``(N,)`` (torchvision's ``adjust_brightness`` per image)."""
    return (x * _per_image(factor)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean gray level (torchvision's ``adjust_contrast`` per image)."""
    mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True)
    return (_per_image(factor) * x + (1 - _per_image(factor)) * mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the grayscale image (torchvision's ``adjust_saturation`` per image)."""
    return (_per_image(factor) * x + (1 - _per_image(factor)) * _luma(x)).clamp(0, 1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` RGB in [0, 1] -> HSV, hue in [0, 1)."""
    r, g, b = x.unbind(dim=1)
    minimum, value = torch.aminmax(x, dim=1)
    chroma = value - minimum
    saturation = chroma / torch.where(value > 0, value, torch.ones_like(value))
    sixth_of_inverse_chroma = torch.where(chroma > 0, 1 / (6 * chroma), torch.zeros_like(chroma))
    hue = torch.where(value == r, g - b, torch.where(value == g, b - r + 2 * chroma, r - g + 4 * chroma))
    hue = (hue * sixth_of_inverse_chroma).remainder(1.0)
    return torch.stack([hue, saturation, value], dim=1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_rgb_to_hsv` (``f(n) = v − v·s·clamp(min(k, 4 − k), 0, 1)``, ``k = (n + 6h) mod 6``)."""
    hue, saturation, value = (c.unsqueeze(1) for c in x.unbind(dim=1))
    n = x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    k = (n + 6 * hue).remainder(6)
    return value - value * saturation * torch.minimum(k, 4 - k).clamp(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` ``(N,)`` turns, in [-0.5, 0.5] (torchvision's ``adjust_hue`` per image)."""
    hsv = _rgb_to_hsv(x)
    hue = (hsv[:, :1] + _per_image(shift)).remainder(1.0)
    return _hsv_to_rgb(torch.cat([hue, hsv[:, 1:]], dim=1)).clamp(0, 1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a σ per image, reflect padding (torchvision's ``gaussian_blur``).

    x: float ``(N, 3, H, W)``; sigma: ``(N,)``.
    """
    n, c, height, width = x.shape
    offsets = torch.linspace(-(kernel_size - 1) / 2, (kernel_size - 1) / 2, kernel_size, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma.to(x.device).view(-1, 1)).square())
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N·3, k)
    half = kernel_size // 2
    planes = F.pad(x.reshape(1, n * c, height, width), (half, half, half, half), mode="reflect")
    planes = F.conv2d(planes, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    planes = F.conv2d(planes, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return planes.reshape(n, c, height, width)


def _apply_where_(x: torch.Tensor, mask: torch.Tensor, op, *per_image: torch.Tensor, sync_free: bool) -> None:
    """In place: the masked images of ``x`` ``(B, 3, H, W)`` become ``op(x[mask], *per_image[mask])``. By default only
    those images are computed (the loader's CPU path); ``sync_free`` (the training device) computes every image and
    keeps the masked ones with ``torch.where``, since a boolean index waits for the device. Each op works image by
    image, so both give the same values."""
    if not sync_free:
        if mask.any():
            x[mask] = op(x[mask], *(p[mask] for p in per_image))
        return
    x.copy_(torch.where(_per_image(mask), op(x, *per_image), x))


def apply_photometric(x: torch.Tensor, params: PhotometricParams, cfg: PhotometricConfig = PhotometricConfig(),
                      sync_free: bool = False) -> torch.Tensor:
    """Apply drawn parameters to float ``(B, 3, H, W)`` pixels in [0, 1]; returns the same shape. ``sync_free``: never
    wait for the device (see :func:`_apply_where_`), as on the training device."""
    params = PhotometricParams(**{k: v.to(x.device, non_blocking=True) for k, v in vars(params).items()})
    x = x.clone()
    for position in range(4):
        for op_index, op in enumerate(JITTER_OPS):
            chosen = params.jitter & (params.jitter_order[:, position] == op_index)
            _apply_where_(x, chosen, op, params.jitter_factors[:, op_index], sync_free=sync_free)
    x = torch.where(_per_image(params.grayscale), _luma(x).expand_as(x), x)
    _apply_where_(x, params.blur, lambda imgs, sigma: gaussian_blur(imgs, sigma, cfg.blur_kernel),
                  params.blur_sigma, sync_free=sync_free)
    solarized = _per_image(params.solarize) & (x >= cfg.solarize_threshold)
    return torch.where(solarized, 1 - x, x)


def photometric(pixels: torch.Tensor, generator: torch.Generator,
                cfg: PhotometricConfig = PhotometricConfig()) -> torch.Tensor:
    """DUNE's colour augmentation on a uint8 batch ``(B, 3, H, W)`` (any device) -> uint8 ``(B, 3, H, W)``.

    Parameters are drawn per image from ``generator`` (a CPU generator); computed in float32 and
    rounded once at the end.
    """
    return apply_photometric_uint8(pixels, sample_photometric_params(len(pixels), generator, cfg), cfg)


def apply_photometric_uint8(pixels: torch.Tensor, params: PhotometricParams,
                            cfg: PhotometricConfig = PhotometricConfig(), sync_free: bool = False) -> torch.Tensor:
    """Drawn parameters applied to a uint8 batch ``(B, 3, H, W)`` on its device -> uint8 ``(B, 3, H, W)``: float32
    in [0, 1], rounded once at the end (the draws can be made in a DataLoader worker, this on the GPU)."""
    out = apply_photometric(pixels.float() / 255, params, cfg, sync_free)
    return (out * 255).round().clamp(0, 255).to(torch.uint8)
