"""Composite encodings (``pca-int8``, per-image ``lowrank``) and the scheme registry: round-trip bounds, the union of
per-image subspaces a global basis cannot hold, cropped decoding, unwritten parts, torch formulas."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dune_cache.config import ENCODINGS, PARAMS, ViewSampling
from dune_cache.encodings import (INT8_MISSING, Encoding, EncodingConfig, EncodingError, encoding_summary,
                                  list_schemes, scheme_class)
from dune_cache.encodings.base import Scheme, token_cosines
from dune_cache.encodings.lowrank import image_factors
from dune_cache.encodings.registry import register_scheme
from dune_cache.extract import build_provenance
from dune_cache.geometry import Geometry
from dune_cache.images import ImageManifest
from dune_cache.inspect import verify_cache
from dune_cache.reader import CacheReader
from dune_cache.store import DamagedFeaturesError, StorageConfig, TeacherStore, ViewRows
from dune_cache.teachers.base import TeacherSpec

D, GRID, K = 48, (6, 5), 4  # channels, token grid, rank of each image's tokens


def rotating_subspaces(n: int, seed: int = 0, noise: float = 0.0) -> np.ndarray:
    """Patch tokens ``(n, 6, 5, D)`` float32: each image's tokens lie in its own random ``K``-dim subspace around
    its own mean (a union of subspaces, as ViT features of different images), plus ``noise``."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((n, GRID[0] * GRID[1], K)) * np.array([8.0, 4.0, 2.0, 1.0])
    directions = np.linalg.qr(rng.standard_normal((n, D, K)))[0].transpose(0, 2, 1)  # (n, K, D) orthonormal rows
    tokens = weights @ directions + rng.normal(0, 3, (n, 1, D)) + noise * rng.standard_normal((n, GRID[0] * GRID[1], D))
    return tokens.reshape(n, *GRID, D).astype(np.float32)


def calibrated(text: str, patch: np.ndarray) -> Encoding:
    return Encoding.calibrate(EncodingConfig.parse(text), D, "float16", {"cls": patch[:, 0, 0], "patch": patch})


def round_trip(encoding: Encoding, patch: np.ndarray) -> np.ndarray:
    return encoding.decode_numpy("patch", encoding.encode("patch", patch))


def test_every_configured_encoding_has_one_registered_scheme_and_names_stay_in_the_config():
    assert sorted(list_schemes()) == sorted(ENCODINGS) and set(PARAMS) == set(ENCODINGS)

    class Unlisted(Scheme):
        name = "int4"

    with pytest.raises(ValueError, match="not listed in dune_cache.config.ENCODINGS"):
        register_scheme(Unlisted)
    with pytest.raises(ValueError, match="registered twice"):
        register_scheme(scheme_class("pca"))

    class Uncalibrated(Scheme):
        name = "pca"

    with pytest.raises(ValueError, match="needs_calibration differs from EncodingConfig"):
        register_scheme(Uncalibrated)


def test_lowrank_keeps_each_image_subspace_exactly_up_to_int8_and_float16_steps():
    patch = rotating_subspaces(6)
    encoding = calibrated(f"lowrank:image_rank={K}", patch)
    parts = encoding.encode("patch", patch)
    assert parts[""].shape == (6, *GRID, K) and parts[""].dtype == np.int8
    assert set(parts) == {"", "_basis"} and parts["_basis"].shape == (6, K + 1, D)
    back = round_trip(encoding, patch)
    # error bound per token: half an int8 step on each of K factors (a step = the stored row's norm), plus float16
    # rounding of the stored rows and of the mean
    steps = np.linalg.norm(parts["_basis"][:, :K].astype(np.float32), axis=-1)  # (6, K)
    bound = (0.5 * np.linalg.norm(steps, axis=-1) + 2 ** -11 * (127 * steps.sum(-1) + np.abs(patch).max(axis=(1, 2, 3)))
             * np.sqrt(D))[:, None, None]
    assert (np.linalg.norm(back - patch, axis=-1) <= bound).all()
    assert token_cosines(patch, back).min() > 0.999
    info = encoding.schemes["patch"].info
    assert info["energy_kept_min"] > 0.9999 and info["token_cosine_p001"] > 0.999
    assert encoding.schemes["cls"].name == "none"


def test_a_global_basis_of_as_many_bytes_cannot_hold_a_union_of_image_subspaces():
    calibration, heldout = rotating_subspaces(32, seed=1), rotating_subspaces(8, seed=2)
    lowrank = calibrated(f"lowrank:image_rank={K}", calibration)
    stored = {name: sum(v.nbytes for v in e.encode("patch", heldout).values())
              for name, e in (("lowrank", lowrank),)}
    rank = stored["lowrank"] // (len(heldout) * GRID[0] * GRID[1]) - 4  # int8 coefficients + a float32 step per token
    global_pca = calibrated(f"pca-int8:rank={rank}", calibration)
    assert sum(v.nbytes for v in global_pca.encode("patch", heldout).values()) >= stored["lowrank"]
    assert token_cosines(heldout, round_trip(lowrank, heldout)).min() > 0.999
    assert np.quantile(token_cosines(heldout, round_trip(global_pca, heldout)), 0.001) < 0.99


@pytest.mark.parametrize("grid", [(8, 8), (6, 5), (2, 2)])
def test_image_factors_are_the_truncated_svd_whichever_gram_is_smaller(grid):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, *grid, D)).astype(np.float32)  # 64 tokens >= D channels; 30 < D; 4 tokens < rank
    weights, factors, mean = image_factors(x, 6)
    tokens = x.reshape(3, -1, D)
    singular = np.linalg.svd(tokens - tokens.mean(1, keepdims=True), compute_uv=False)
    kept = min(6, tokens.shape[1] - 1)  # centred tokens span at most T - 1 directions
    np.testing.assert_allclose(np.linalg.norm(weights.reshape(3, -1, 6), axis=1)[:, :kept], singular[:, :kept],
                               rtol=1e-3, atol=1e-4)
    gram = factors @ factors.transpose(0, 2, 1)
    np.testing.assert_allclose(gram[:, :kept, :kept], np.broadcast_to(np.eye(kept), (3, kept, kept)), atol=1e-4)
    assert np.abs(weights[..., kept:]).max(initial=0) < 1e-4  # nothing beyond the image's own rank
    reconstructed = weights.reshape(3, -1, 6) @ factors + mean
    best = singular[:, kept:]  # the truncated SVD's error, the least any rank-``kept`` factorisation leaves
    np.testing.assert_allclose(np.linalg.norm(reconstructed - tokens, axis=(1, 2)), np.linalg.norm(best, axis=1),
                               rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(mean[:, 0], tokens.mean(1), atol=1e-6)


def test_lowrank_decodes_a_cropped_grid_with_the_whole_basis_and_refuses_a_cropped_basis():
    patch = rotating_subspaces(3, noise=0.05)
    encoding = calibrated(f"lowrank:image_rank={K}", patch)
    parts = {k: torch.from_numpy(v) for k, v in encoding.encode("patch", patch).items()}
    whole = encoding.decode("patch", parts, "cpu")
    cropped = {"": parts[""][:, 1:4, 2:5].flip(-2), "_basis": parts["_basis"]}
    assert torch.equal(encoding.decode("patch", cropped, "cpu"), whole[:, 1:4, 2:5].flip(-2))
    with pytest.raises(EncodingError, match=r"_basis \(3, 3, 1, 48\) does not match the token factors \(3, 3, 3, 4\).* uncropped"):
        encoding.decode("patch", {**cropped, "_basis": parts["_basis"][:, 1:4, None, :]}, "cpu")


def test_lowrank_torch_decode_is_the_documented_formula_on_views_and_single_images():
    patch = rotating_subspaces(4, noise=0.1).reshape(2, 2, *GRID, D)  # (image, view, h, w, D)
    encoding = calibrated(f"lowrank:image_rank={K}", patch.reshape(4, *GRID, D))
    parts = encoding.encode("patch", patch)
    basis = parts["_basis"].astype(np.float32)
    weights = parts[""].astype(np.float32).reshape(2, 2, -1, K)
    expected = (weights @ basis[..., :K, :] + basis[..., K:, :]).reshape(patch.shape)
    got = encoding.decode("patch", {k: torch.from_numpy(v) for k, v in parts.items()}, "cpu")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-4)
    single = encoding.decode_numpy("patch", {k: v[1, 0] for k, v in parts.items()})
    np.testing.assert_array_equal(single, got.numpy()[1, 0])


@pytest.mark.parametrize("part, value", [("", INT8_MISSING), ("_scale", np.nan), ("_basis", np.nan)])
def test_an_unwritten_part_of_a_composite_encoding_decodes_to_nan(part, value):
    patch = rotating_subspaces(2)
    for text in (f"lowrank:image_rank={K}", "pca-int8:rank=6"):
        encoding = calibrated(text, patch)
        parts = encoding.encode("patch", patch)
        if part not in parts:
            continue
        parts[part][1] = value  # image 1's chunk of this part never written: it reads as the fill value
        back = encoding.decode_numpy("patch", parts)
        assert np.isfinite(back[0]).all() and np.isnan(back[1]).any(), (text, part)


def test_pca_int8_stores_half_the_bytes_of_pca_at_the_same_rank_and_about_its_error():
    patch = rotating_subspaces(16, noise=0.5)
    pca, pca8 = calibrated("pca:rank=12", patch), calibrated("pca-int8:rank=12", patch)
    assert pca8.encode("patch", patch)[""].dtype == np.int8
    error = {name: np.linalg.norm(round_trip(e, patch) - patch) for name, e in (("pca", pca), ("int8", pca8))}
    assert error["int8"] < 1.05 * error["pca"]
    assert pca8.schemes["patch"].info["rank"] == 12 and pca8.schemes["cls"].name == "none"


def test_info_line_names_the_rank_energy_and_tail_cosine():
    patch = rotating_subspaces(4)
    line = encoding_summary(calibrated(f"lowrank:image_rank={K}", patch).to_json())
    assert line.startswith(f"lowrank:image_rank={K},calibration_images=64 (cls: none")
    assert f"rank {K} per image (100.00% energy, min 100.00%)" in line
    assert re.search(r"cosine mean 1\.0000, 0\.1% quantile (1\.0000|0\.999\d)\)", line)
    with pytest.raises(EncodingError, match="image_rank 0: must be >= 1"):
        EncodingConfig.parse("lowrank:image_rank=0")


# ---------------------------------------------------------------------------------------
# Stores, readers and verify with per-image parts
# ---------------------------------------------------------------------------------------
def composite_group(root: Path, text: str = f"lowrank:image_rank={K}", shard_images: int = 0, views: int = 1
                    ) -> tuple[TeacherStore, np.ndarray]:
    """A 6-image group stored with encoding ``text`` and ``views`` cached views; returns the store and the float
    patch tokens written ``(6, 6, 5, D)`` (views: the same tokens mirrored)."""
    n = 6
    manifest = ImageManifest(ids=tuple(f"i{k}" for k in range(n)), tags=("",) * n, base=None)
    spec = TeacherSpec(name="vit", arch="synthetic", patch_size=8, embed_dim=D)
    geometry = Geometry(resolution=(48, 40), grid=GRID, patch_size=8)
    storage = StorageConfig(unit_size=2, shard_images=shard_images, encoding=EncodingConfig.parse(text))
    patch = rotating_subspaces(n, noise=0.05)
    encoding = calibrated(text, patch)
    provenance = build_provenance(spec, None, manifest, "test", geometry, storage,
                                  views=ViewSampling().to_json(views) if views else None)
    store = TeacherStore.create(str(root), "vit", provenance, manifest, GRID, D, storage, views=views, encoding=encoding)
    cached = None
    if views:
        cached = ViewRows(cls=patch[:, None, 0, 0].repeat(views, 1), patch=patch[:, None, :, ::-1].repeat(views, 1),
                          boxes=np.tile(np.array([0, 0, 1, 1], np.float32), (n, views, 1)),
                          flip=np.ones((n, views), np.uint8))
    store.write_rows(np.arange(n), patch[:, 0, 0], patch, cached)
    for unit in range(store.num_units):
        store.write_unit_status(unit, np.ones(n, dtype=np.uint8))
    return store, patch


@pytest.mark.parametrize("text", ["pca-int8:rank=6", f"lowrank:image_rank={K}"])
def test_the_plain_zarr_recipe_decodes_composite_encodings(tmp_path, text):
    store, _ = composite_group(tmp_path / "c.zarr", text)
    section = (Path(__file__).parents[1] / "docs" / "cache-format.md").read_text().split(
        "## Decoding an encoded cache with plain zarr", 1)[1]
    scope = {"CACHE": str(tmp_path / "c.zarr"), "TEACHER": "vit"}
    exec(re.search(r"```python\n(.*?)```", section, re.S).group(1), scope)
    for name in ("patch", "cls", "views/patch"):
        np.testing.assert_allclose(scope["decode"](name, np.arange(4)), store.read_features(name, np.arange(4)),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shard_images", [0, 2])
def test_a_lowrank_group_stores_one_basis_per_image_and_reads_back_everywhere(tmp_path, shard_images):
    store, patch = composite_group(tmp_path / "c.zarr", shard_images=shard_images)
    assert store.group["patch"].shape == (6, *GRID, K) and store.group["patch_basis"].shape == (6, K + 1, D)
    assert store.group["views/patch_basis"].shape == (6, 1, K + 1, D)
    assert store.group["patch_basis"].metadata.dimension_names == ("image", "factor", "channel")
    decoded = store.read_features("patch", np.arange(6))
    assert token_cosines(patch, decoded).min() > 0.999
    np.testing.assert_allclose(store.read_features("views/patch", np.arange(6))[:, 0], decoded[:, :, ::-1], atol=1e-5)
    [report] = verify_cache(str(tmp_path / "c.zarr"))
    assert report.ok, report.problems
    indices, views = np.array([4, 0, 2, 2]), np.array([-1, 0, 0, -1])
    for backend in ("zarr", "tensorstore"):
        reader = CacheReader(str(tmp_path / "c.zarr"), backend=backend)
        batch = reader.read(indices, views)
        expected = np.where((views >= 0)[:, None, None, None], decoded[indices][:, :, ::-1], decoded[indices])
        np.testing.assert_allclose(batch.patch["vit"].numpy(), expected, atol=1e-5)
        encoded = reader.read(indices, views, decode=False)
        assert encoded.patch["vit"]["_basis"].shape == (4, K + 1, D)
        assert torch.equal(reader.decode(encoded, "cpu").patch["vit"], batch.patch["vit"])


def test_an_unwritten_basis_chunk_is_damage_the_store_and_verify_name(tmp_path):
    store, _ = composite_group(tmp_path / "c.zarr", views=0)
    store.group["patch_basis"][2] = np.nan  # as if the chunk were lost: it reads as the fill value
    assert np.isnan(store.read_features("patch", 2, check=False)).all()
    with pytest.raises(DamagedFeaturesError, match=r"patch of 1 image\(s\) marked done .*: i2\."):
        store.read_features("patch", [1, 2])
    [report] = verify_cache(str(tmp_path / "c.zarr"))
    assert not report.ok and any("image 2" in p for p in report.problems)
