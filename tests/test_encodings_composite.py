"""Composite encodings (``pca-int8``, per-image ``lowrank`` with a float or an int8 basis) and the scheme registry:
round-trip bounds, the union of per-image subspaces a global basis cannot hold, cropped decoding, unwritten parts,
torch formulas, the training loader's two decode paths."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dune_cache.commands.verify import verify_cache
from dune_cache.config import ENCODINGS, PARAMS, StorageConfig, ViewSampling
from dune_cache.encodings import Encoding, EncodingConfig, EncodingError, encoding_summary, list_schemes, scheme_class
from dune_cache.encodings.base import Scheme, token_cosines
from dune_cache.encodings.lowrank import image_factors
from dune_cache.encodings.registry import register_scheme
from dune_cache.errors import DamagedFeaturesError
from dune_cache.extract.provenance import build_provenance
from dune_cache.format.store import TeacherStore
from dune_cache.format.rows import ViewRows
from dune_cache.images.manifest import ImageManifest
from dune_cache.read.reader import CacheReader
from dune_cache.teachers.geometry import Geometry
from dune_cache.teachers.spec import TeacherSpec
from dune_student.config import AugmentConfig, DataConfig
from dune_student.data.augment import GridCrop
from dune_student.data.batches import BatchSource, InputPlan

D, GRID, K = 48, (6, 5), 4  # channels, token grid, rank of each image's tokens
LOWRANK = (f"lowrank:image_rank={K}", f"lowrank:image_rank={K},basis=int8")  # float basis (default), int8 basis


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


def test_lowrank_int8_basis_stays_within_the_int8_steps_of_both_factors_in_fewer_bytes():
    patch = rotating_subspaces(6)
    encoding = calibrated(LOWRANK[1], patch)
    parts = encoding.encode("patch", patch)
    assert {k: (v.shape, v.dtype) for k, v in parts.items()} == {
        "": ((6, *GRID, K), np.int8), "_basis": ((6, K, D), np.int8), "_basis_step": ((6, K, 1), np.float32),
        "_mean": ((6, 1, D), np.float16)}
    assert np.abs(parts["_basis"]).max(axis=-1).min() == 127  # each row's step is its own absmax / 127
    back = round_trip(encoding, patch)
    # error bound per token: half a token-factor step on each of K factors (a step = the row's norm, within half a
    # row step per channel), the K rows' int8 rounding (half a row step per channel) times codes up to 127, and
    # float16 rounding of the mean
    step = parts["_basis_step"][..., 0]  # (6, K)
    norms = np.linalg.norm(parts["_basis"] * parts["_basis_step"], axis=-1) + 0.5 * step * np.sqrt(D)
    bound = (0.5 * np.linalg.norm(norms, axis=-1) + 63.5 * np.sqrt(D) * step.sum(-1)
             + 2 ** -11 * np.abs(patch).max(axis=(1, 2, 3)) * np.sqrt(D))[:, None, None]
    assert (np.linalg.norm(back - patch, axis=-1) <= bound).all()
    assert token_cosines(patch, back).min() > 0.999
    float_basis = calibrated(LOWRANK[0], patch)
    error = {name: np.linalg.norm(round_trip(e, patch) - patch) for name, e in (("float", float_basis),
                                                                                ("int8", encoding))}
    assert error["int8"] < 2 * error["float"]
    size = {name: sum(v.nbytes for k, v in e.encode("patch", patch).items() if k)
            for name, e in (("float", float_basis), ("int8", encoding))}
    assert size == {"float": 6 * (K + 1) * D * 2, "int8": 6 * (K * D + 4 * K + 2 * D)}
    assert encoding.schemes["patch"].info["token_cosine_p001"] > 0.999


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
    weights, factors, mean = (v.numpy() for v in image_factors(torch.from_numpy(x), 6))
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


@pytest.mark.parametrize("text", LOWRANK)
def test_lowrank_decodes_a_cropped_grid_with_the_whole_basis_and_refuses_a_cropped_basis(text):
    patch = rotating_subspaces(3, noise=0.05)
    encoding = calibrated(text, patch)
    parts = {k: torch.from_numpy(v) for k, v in encoding.encode("patch", patch).items()}
    whole = encoding.decode("patch", parts, "cpu")
    cropped = {**parts, "": parts[""][:, 1:4, 2:5].flip(-2)}
    assert torch.equal(encoding.decode("patch", cropped, "cpu"), whole[:, 1:4, 2:5].flip(-2))
    with pytest.raises(EncodingError,
                       match=r"_basis \(3, 3, 1, 48\) does not match the token factors \(3, 3, 3, 4\).* uncropped"):
        encoding.decode("patch", {**cropped, "_basis": parts["_basis"][:, 1:4, None, :]}, "cpu")
    for suffix in set(parts) - {"", "_basis"}:  # int8 basis: its steps and mean are per image too
        with pytest.raises(EncodingError, match=rf"part {suffix} \(3, 1, \d, \d+\) does not match.* uncropped"):
            encoding.decode("patch", {**cropped, suffix: parts[suffix][:, None]}, "cpu")


@pytest.mark.parametrize("text", LOWRANK)
def test_lowrank_torch_decode_is_the_documented_formula_on_views_and_single_images(text):
    patch = rotating_subspaces(4, noise=0.1).reshape(2, 2, *GRID, D)  # (image, view, h, w, D)
    encoding = calibrated(text, patch.reshape(4, *GRID, D))
    parts = encoding.encode("patch", patch)
    weights = parts[""].astype(np.float32).reshape(2, 2, -1, K)
    if "_mean" in parts:  # basis=int8: x = A @ (A_basis · A_basis_step) + A_mean
        expected = weights @ (parts["_basis"] * parts["_basis_step"]) + parts["_mean"].astype(np.float32)
    else:  # x = A @ A_basis[..., :k, :] + A_basis[..., k, :]
        basis = parts["_basis"].astype(np.float32)
        expected = weights @ basis[..., :K, :] + basis[..., K:, :]
    expected = expected.reshape(patch.shape)
    got = encoding.decode("patch", {k: torch.from_numpy(v) for k, v in parts.items()}, "cpu")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-4)
    single = encoding.decode_numpy("patch", {k: v[1, 0] for k, v in parts.items()})
    np.testing.assert_array_equal(single, got.numpy()[1, 0])


@pytest.mark.parametrize("text", [*LOWRANK, "pca-int8:rank=6"])
def test_an_unwritten_part_of_a_composite_encoding_decodes_to_nan(text):
    patch = rotating_subspaces(2)
    encoding = calibrated(text, patch)
    for part in encoding.parts("patch"):
        parts = encoding.encode("patch", patch)
        parts[part.suffix][1] = part.fill  # image 1's chunk of this part never written: it reads as the fill value
        back = encoding.decode_numpy("patch", parts)
        assert np.isfinite(back[0]).all() and np.isnan(back[1]).any(), part
        assert not part.per_image or np.isnan(back[1]).all(), part  # every token of the image mixes its rows


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


def test_the_lowrank_basis_is_a_parameter_recorded_only_when_int8():
    default, int8 = EncodingConfig.parse(LOWRANK[0]), EncodingConfig.parse(LOWRANK[1])
    # groups made before the parameter existed record, print and compare exactly as before
    assert default.to_json() == {"name": "lowrank", "params": {"image_rank": K, "calibration_images": 64}}
    assert EncodingConfig.parse(f"lowrank:image_rank={K},basis=float") == default
    assert EncodingConfig.from_json(default.to_json()) == default and default.basis == "float"
    assert int8.to_json()["params"] == {"image_rank": K, "calibration_images": 64, "basis": "int8"}
    assert str(int8) == f"lowrank:image_rank={K},calibration_images=64,basis=int8"
    assert EncodingConfig.parse(str(int8)) == int8 == EncodingConfig.from_json(int8.to_json())
    line = encoding_summary(calibrated(LOWRANK[1], rotating_subspaces(4)).to_json())
    assert line.startswith(f"lowrank:image_rank={K},calibration_images=64,basis=int8 (cls: none")
    for bad in ("int4", "fp16", ""):
        with pytest.raises(EncodingError, match=rf"basis '{bad}': choose one of float, int8"):
            EncodingConfig.parse(f"lowrank:basis={bad}")
    with pytest.raises(EncodingError, match=r"'basis=int8' is not one of pca-int8's parameters"):
        EncodingConfig.parse("pca-int8:basis=int8")


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
    store = TeacherStore.create(str(root), "vit", provenance, manifest, GRID, D, storage,
                                views=views, encoding=encoding)
    cached = None
    if views:
        cached = ViewRows(cls=patch[:, None, 0, 0].repeat(views, 1), patch=patch[:, None, :, ::-1].repeat(views, 1),
                          boxes=np.tile(np.array([0, 0, 1, 1], np.float32), (n, views, 1)),
                          flip=np.ones((n, views), np.uint8))
    store.write_rows(np.arange(n), patch[:, 0, 0], patch, cached)
    for unit in range(store.num_units):
        store.write_unit_status(unit, np.ones(n, dtype=np.uint8))
    return store, patch


@pytest.mark.parametrize("text", ["pca-int8:rank=6", *LOWRANK])
def test_the_plain_zarr_recipe_decodes_composite_encodings(tmp_path, text):
    store, _ = composite_group(tmp_path / "c.zarr", text)
    section = (Path(__file__).parents[1] / "docs" / "cache-format.md").read_text().split(
        "## Decoding an encoded cache with plain zarr", 1)[1]
    scope = {"CACHE": str(tmp_path / "c.zarr"), "TEACHER": "vit"}
    exec(re.search(r"```python\n(.*?)```", section, re.S).group(1), scope)
    for name in ("patch", "cls", "views/patch"):
        np.testing.assert_allclose(scope["decode"](name, np.arange(4)), store.read_features(name, np.arange(4)),
                                   rtol=1e-5, atol=1e-5)


STORED = {LOWRANK[0]: {"": (GRID, K, "int8"), "_basis": ((K + 1,), D, "float16")},
          LOWRANK[1]: {"": (GRID, K, "int8"), "_basis": ((K,), D, "int8"), "_basis_step": ((K,), 1, "float32"),
                       "_mean": ((1,), D, "float16")}}  # suffix -> (token grid or rows, last, dtype)


@pytest.mark.parametrize("shard_images", [0, 2])
@pytest.mark.parametrize("text", LOWRANK)
def test_a_lowrank_group_stores_one_basis_per_image_and_reads_back_everywhere(tmp_path, text, shard_images):
    store, patch = composite_group(tmp_path / "c.zarr", text, shard_images=shard_images)
    for suffix, (rows, last, dtype) in STORED[text].items():
        array, views = store.group[f"patch{suffix}"], store.group[f"views/patch{suffix}"]
        assert (array.shape, str(array.dtype), views.shape) == ((6, *rows, last), dtype, (6, 1, *rows, last))
        if suffix:
            assert array.metadata.dimension_names == ("image", "factor", "channel")
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
        assert {k: tuple(v.shape) for k, v in encoded.patch["vit"].items()} == {
            suffix: (4, *rows, last) for suffix, (rows, last, _) in STORED[text].items()}
        assert torch.equal(reader.decode(encoded, "cpu").patch["vit"], batch.patch["vit"])


@pytest.mark.parametrize("text", LOWRANK)
def test_the_training_loader_crops_the_token_factors_and_keeps_the_basis_whole_on_both_decode_paths(tmp_path, text):
    store, _ = composite_group(tmp_path / "c.zarr", text)
    listing = tmp_path / "images.txt"
    listing.write_text("".join(f"i{k}\n" for k in range(6)))
    args = (CacheReader(str(tmp_path / "c.zarr"), backend="zarr"),
            DataConfig(images=str(listing), batch_size=3, shuffle_block=2, shuffle_buffer=4), AugmentConfig(), 0,
            np.arange(6), 32)
    indices, views = np.array([4, 0, 2]), np.array([-1, 0, -1])
    crops = [GridCrop(y0=1, x0=2, h=4, w=3, flip=True), GridCrop(y0=0, x0=0, h=4, w=3, flip=False),
             GridCrop(y0=2, x0=1, h=4, w=3, flip=True)]  # one size per batch
    _, in_worker, *_ = BatchSource(*args).cropped_targets(indices, crops, views)
    deferred = BatchSource(*args, InputPlan(decode_targets_on_device=True))
    encoded = deferred.cropped_targets(indices, crops, views)[4]
    assert {k: tuple(v.shape) for k, v in encoded.patch["vit"].items()} == {
        suffix: (3, *(rows if suffix else (4, 3)), last) for suffix, (rows, last, _) in STORED[text].items()}
    on_device = deferred.reader().decode(encoded, "cpu").patch["vit"]  # what the trainer does on its device
    torch.testing.assert_close(on_device, in_worker["vit"])
    whole = torch.from_numpy(store.read_features("patch", indices))
    whole[1] = whole[1].flip(-2)  # sample 1 is view 0: the image mirrored
    boxes = [w[c.y0:c.y0 + c.h, c.x0:c.x0 + c.w] for w, c in zip(whole, crops)]
    expected = torch.stack([box.flip(-2) if c.flip else box for box, c in zip(boxes, crops)])
    torch.testing.assert_close(on_device.float(), expected, atol=2e-2, rtol=1e-3)  # float16 targets


@pytest.mark.parametrize("text, suffix", [(LOWRANK[0], "_basis"), *((LOWRANK[1], s) for s in STORED[LOWRANK[1]])])
def test_an_unwritten_basis_chunk_is_damage_the_store_and_verify_name(tmp_path, text, suffix):
    store, _ = composite_group(tmp_path / "c.zarr", text, views=0)
    array = store.group[f"patch{suffix}"]
    array[2] = array.fill_value  # as if the chunk were lost: it reads as the fill value
    assert np.isnan(store.read_features("patch", 2, check=False)).all()
    with pytest.raises(DamagedFeaturesError, match=r"patch of 1 image\(s\) marked done .*: i2\."):
        store.read_features("patch", [1, 2])
    [report] = verify_cache(str(tmp_path / "c.zarr"))
    assert not report.ok and any("image 2" in p for p in report.problems)
