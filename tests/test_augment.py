"""Grid-snapped crops keep pixels and cached tokens aligned; photometric augmentation is DUNE's, reproducibly."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from dune_student.config import AugmentConfig
from dune_student.data.augment import (GridCrop, PhotometricConfig, adjust_brightness, adjust_contrast, adjust_hue,
                                       adjust_saturation, apply_photometric, crop_pixels, crop_tokens, gaussian_blur,
                                       photometric, sample_grid_crop, sample_photometric_params)

PATCH = 4
GRID = (6, 8)


def cell_coded_image(grid: tuple[int, int], patch: int) -> torch.Tensor:
    """uint8 ``(3, h·p, w·p)``: every cell is one flat colour encoding its (row, column)."""
    h, w = grid
    rows = torch.arange(h).view(h, 1).expand(h, w)
    cols = torch.arange(w).view(1, w).expand(h, w)
    colours = torch.stack([rows * 40 + 5, cols * 30 + 5, (rows * w + cols) * 5], dim=0).to(torch.uint8)
    return colours.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)


def centre_teacher(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """An exact per-patch "teacher": the mean of each patch's central 2×2 pixels -> ``(h, w, 3)``."""
    c, height, width = pixels.shape
    patches = pixels.float().reshape(c, height // patch, patch, width // patch, patch)
    centre = patches[:, :, patch // 2 - 1:patch // 2 + 1, :, patch // 2 - 1:patch // 2 + 1]
    return centre.mean(dim=(2, 4)).permute(1, 2, 0)


def mean_teacher(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """Another exact per-patch function: the mean colour of each patch -> ``(h, w, 3)``."""
    c, height, width = pixels.shape
    return pixels.float().reshape(c, height // patch, patch, width // patch, patch).mean(dim=(2, 4)).permute(1, 2, 0)


def some_crops(count: int, seed: int = 0, **config) -> list[GridCrop]:
    generator = torch.Generator().manual_seed(seed)
    cfg = AugmentConfig(crop_scale=(0.1, 1.0), **config)
    return [sample_grid_crop(GRID, cfg, generator) for _ in range(count)]


@pytest.mark.parametrize("magnification", [1, 2, 3])
def test_cropped_targets_are_the_teacher_features_of_the_cropped_pixels(magnification):
    image = cell_coded_image(GRID, PATCH)
    full_tokens = centre_teacher(image, PATCH)
    crops = some_crops(40)
    assert any(c.flip for c in crops) and any(not c.flip for c in crops)
    for crop in crops:
        out_size = (crop.h * PATCH * magnification, crop.w * PATCH * magnification)
        student_view = crop_pixels(image, crop, GRID, out_size)
        assert torch.equal(centre_teacher(student_view, PATCH * magnification), crop_tokens(full_tokens, crop))


def test_cropped_targets_match_on_natural_content_at_the_cached_scale():
    generator = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (3, GRID[0] * PATCH, GRID[1] * PATCH), dtype=torch.uint8, generator=generator)
    full_tokens = mean_teacher(image, PATCH)
    for crop in some_crops(40, seed=1):
        student_view = crop_pixels(image, crop, GRID, (crop.h * PATCH, crop.w * PATCH))
        assert torch.equal(mean_teacher(student_view, PATCH), crop_tokens(full_tokens, crop))


def test_flip_mirrors_pixels_and_tokens_alike():
    image = cell_coded_image(GRID, PATCH)
    tokens = torch.arange(GRID[0] * GRID[1] * 2.0).reshape(1, *GRID, 2)  # leading batch dimension
    straight = GridCrop(y0=1, x0=2, h=3, w=5, flip=False)
    flipped = GridCrop(y0=1, x0=2, h=3, w=5, flip=True)
    assert torch.equal(crop_tokens(tokens, flipped), crop_tokens(tokens, straight).flip(-2))
    assert torch.equal(crop_tokens(tokens, flipped)[0, :, 0], tokens[0, 1:4, 6])
    out = (24, 40)
    assert torch.equal(crop_pixels(image, flipped, GRID, out), crop_pixels(image, straight, GRID, out).flip(-1))


def test_crop_pixels_handles_images_whose_cells_are_not_whole_pixels():
    image = torch.randint(0, 256, (3, 53, 71), dtype=torch.uint8)
    crop = GridCrop(y0=1, x0=3, h=4, w=5, flip=True)
    view = crop_pixels(image, crop, GRID, (56, 70))
    assert view.shape == (3, 56, 70) and view.dtype == torch.uint8


def test_crop_tokens_rejects_a_box_outside_the_grid():
    with pytest.raises(ValueError, match="does not fit"):
        crop_tokens(torch.zeros(4, 4, 8), GridCrop(y0=2, x0=0, h=3, w=2, flip=False))


def test_sampled_crops_are_reproducible_from_the_generator():
    assert some_crops(20, seed=5) == some_crops(20, seed=5)
    assert some_crops(20, seed=5) != some_crops(20, seed=6)


@pytest.mark.parametrize("grid", [(4, 6), (16, 16), (24, 32)])
def test_boxes_lie_in_the_grid_and_respect_the_bounds(grid):
    cfg = AugmentConfig()
    generator = torch.Generator().manual_seed(0)
    crops = [sample_grid_crop(grid, cfg, generator) for _ in range(2000)]
    for crop in crops:
        assert 0 <= crop.y0 and crop.y0 + crop.h <= grid[0] and 0 <= crop.x0 and crop.x0 + crop.w <= grid[1]
        assert min(crop.h, crop.w) >= cfg.min_cells
        assert cfg.crop_scale[0] <= crop.h * crop.w / (grid[0] * grid[1]) <= cfg.crop_scale[1]
        assert cfg.crop_ratio[0] <= crop.w / crop.h <= cfg.crop_ratio[1]
    flips = sum(c.flip for c in crops) / len(crops)
    assert abs(flips - cfg.flip_p) < 4 * math.sqrt(0.25 / len(crops))
    if grid[0] >= 16:  # fine grids: the snapped area stays close to RandomResizedCrop's uniform scale
        mean_scale = sum(c.h * c.w for c in crops) / len(crops) / (grid[0] * grid[1])
        assert abs(mean_scale - sum(cfg.crop_scale) / 2) < 0.05
        assert len({(c.y0, c.x0) for c in crops}) > 20


def test_mode_none_is_the_whole_grid_and_impossible_bounds_are_refused():
    generator = torch.Generator().manual_seed(0)
    assert sample_grid_crop((5, 7), AugmentConfig(mode="none"), generator) == GridCrop(0, 0, 5, 7, False)
    with pytest.raises(ValueError, match="widen the bounds"):
        sample_grid_crop((3, 3), AugmentConfig(crop_scale=(0.1, 0.2)), generator)
    with pytest.raises(ValueError, match="unknown augmentation mode"):
        sample_grid_crop((3, 3), AugmentConfig(mode="mixup"), generator)


def float_images(n: int = 3) -> torch.Tensor:
    x = torch.rand(n, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    x[0, :, :5] = 0.5  # gray: zero chroma
    x[1, :, :3] = 0.0  # black
    return x


@pytest.mark.parametrize("ours, theirs, factor", [
    (adjust_brightness, TF.adjust_brightness, 1.3), (adjust_brightness, TF.adjust_brightness, 0.6),
    (adjust_contrast, TF.adjust_contrast, 1.4), (adjust_contrast, TF.adjust_contrast, 0.6),
    (adjust_saturation, TF.adjust_saturation, 1.2), (adjust_saturation, TF.adjust_saturation, 0.8),
    (adjust_hue, TF.adjust_hue, 0.1), (adjust_hue, TF.adjust_hue, -0.1), (adjust_hue, TF.adjust_hue, 0.5),
])
def test_batched_colour_ops_match_torchvision_per_image(ours, theirs, factor):
    x = float_images()
    expected = torch.stack([theirs(image, factor) for image in x])
    assert torch.allclose(ours(x, torch.full((len(x),), factor)), expected, atol=1e-5)


def test_batched_blur_with_one_sigma_per_image_matches_torchvision():
    x = float_images()
    sigmas = torch.tensor([0.1, 1.5, 5.0])
    expected = torch.stack([TF.gaussian_blur(image, [9, 9], [s, s]) for image, s in zip(x, sigmas.tolist())])
    assert torch.allclose(gaussian_blur(x, sigmas, 9), expected, atol=1e-5)


def test_photometric_params_follow_dunes_probabilities_and_ranges():
    cfg = PhotometricConfig()
    n = 20000
    params = sample_photometric_params(n, torch.Generator().manual_seed(0), cfg)
    tolerance = 4 * math.sqrt(0.25 / n)
    for mask, p in [(params.jitter, cfg.jitter_p), (params.grayscale, cfg.grayscale_p),
                    (params.blur, cfg.blur_p), (params.solarize, cfg.solarize_p)]:
        assert abs(mask.float().mean().item() - p) < tolerance
    assert torch.equal(params.jitter_order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    low = torch.tensor([0.6, 0.6, 0.8, -0.1])
    high = torch.tensor([1.4, 1.4, 1.2, 0.1])
    assert ((params.jitter_factors >= low) & (params.jitter_factors <= high)).all()
    assert params.blur_sigma.min() >= 0.1 and params.blur_sigma.max() <= 5.0


def test_photometric_is_reproducible_per_image_and_leaves_undrawn_images_untouched():
    pixels = torch.randint(0, 256, (16, 3, 20, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    first = photometric(pixels, torch.Generator().manual_seed(4))
    assert first.dtype == torch.uint8 and first.shape == pixels.shape
    assert torch.equal(first, photometric(pixels, torch.Generator().manual_seed(4)))
    assert not torch.equal(first, photometric(pixels, torch.Generator().manual_seed(5)))

    params = sample_photometric_params(16, torch.Generator().manual_seed(4))
    untouched = ~(params.jitter | params.grayscale | params.blur | params.solarize)
    assert untouched.any() and (~untouched).any()
    assert torch.equal(first[untouched], pixels[untouched])
    assert not torch.equal(first[~untouched], pixels[~untouched])


def test_each_image_is_augmented_independently_of_its_batch():
    x = float_images(4)
    params = sample_photometric_params(4, torch.Generator().manual_seed(2))
    params.jitter[:] = True
    params.blur[:] = True
    whole = apply_photometric(x, params)
    for i in range(4):
        single = type(params)(**{k: v[i:i + 1] for k, v in vars(params).items()})
        assert torch.allclose(apply_photometric(x[i:i + 1], single)[0], whole[i], atol=1e-6)
