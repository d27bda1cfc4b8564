"""Encodings: round-trip error bounds on synthetic ViT-like features, calibration, missing chunks, decoding
in torch, stores and readers of encoded groups, extraction with an encoding."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dune_cache.encodings import INT8_MISSING, Encoding, EncodingConfig, EncodingError, calibration_indices
from dune_cache.config import ExtractConfig
from dune_cache.extract.provenance import build_provenance
from dune_cache.extract.run import run_extraction
from dune_cache.teachers.geometry import Geometry
from dune_cache.images.manifest import ImageManifest
from dune_cache.commands.verify import verify_cache
from dune_cache.read.reader import CacheReader
from dune_cache.read.batches import EncodedBatch
from dune_cache.format.constants import STATUS_DONE
from dune_cache.format.store import TeacherStore
from dune_cache.errors import DamagedFeaturesError, StoreMismatchError
from dune_cache.config import StorageConfig
from dune_cache.teachers.spec import TeacherSpec

D, GRID, MASSIVE = 64, (4, 4), (3, 17, 40)  # channels, token grid, massive-activation channels


def vit_like(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """cls ``(n, D)`` and patch ``(n, 4, 4, D)`` float32: correlated Gaussian channels with per-channel scales
    and means, plus a few massive-activation channels (60-120 in magnitude, each with its own sign, on every
    token, as in ViT residual streams)."""
    structure = np.random.default_rng(1234)  # one distribution; ``seed`` draws samples from it
    mixing = structure.standard_normal((D, D)) / np.sqrt(D) * structure.uniform(0.3, 2.0, D)
    mean = structure.normal(0, 0.5, D)
    rng = np.random.default_rng(seed)

    def tokens(shape):
        x = rng.standard_normal((*shape, D)) @ mixing + mean
        x[..., list(MASSIVE)] = np.array([1, -1, 1]) * rng.uniform(60, 120, (*shape, len(MASSIVE)))
        return x.astype(np.float32)
    return tokens((n,)), tokens((n, *GRID))


def calibrated(text: str, seed: int = 0, dtype: str = "float16") -> Encoding:
    cls, patch = vit_like(64, seed)
    config = EncodingConfig.parse(text)
    return Encoding.calibrate(config, D, dtype, {"cls": cls, "patch": patch} if config.needs_calibration else None)


def round_trip(encoding: Encoding, x: np.ndarray, kind: str = "patch") -> np.ndarray:
    return encoding.decode_numpy(kind, encoding.encode(kind, x))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


NORMAL = np.setdiff1d(np.arange(D), MASSIVE)


def test_none_stores_the_storage_dtype_exactly():
    _, patch = vit_like(8, seed=1)
    encoding = calibrated("none")
    parts = encoding.encode("patch", patch)
    assert list(parts) == [""] and parts[""].dtype == np.float16
    np.testing.assert_array_equal(round_trip(encoding, patch), patch.astype(np.float16).astype(np.float32))


def test_bitround_keeps_keepbits_mantissa_bits_and_rounds_to_nearest():
    _, patch = vit_like(8, seed=1)
    stored = calibrated("bitround:keepbits=7").encode("patch", patch)[""]
    assert stored.dtype == np.float16
    assert not (stored.view(np.uint16) & 0b111).any()  # 10 - 7 low mantissa bits are zero
    half = patch.astype(np.float16).astype(np.float32)
    np.testing.assert_array_less(np.abs(stored.astype(np.float32) - half), np.abs(half) * 2.0 ** -8 + 1e-7)
    edge = np.array([65504.0, -65504.0, 1.0, 0.0], dtype=np.float32)  # would round past the largest fp16
    out = calibrated("bitround:keepbits=7").encode("cls", edge)[""]
    assert np.isfinite(out).all() and out[2] == 1.0 and out[3] == 0.0
    with pytest.raises(EncodingError, match="mantissa"):
        calibrated("bitround:keepbits=10")


def test_int8_channel_error_is_at_most_half_a_step_in_range():
    _, patch = vit_like(32, seed=1)  # other images than the calibration ones
    encoding = calibrated("int8-channel")
    scheme = encoding.schemes["patch"]
    assert encoding.encode("patch", patch)[""].dtype == np.int8
    err = np.abs(round_trip(encoding, patch) - patch)
    lo = scheme.arrays["offset"] - 127 * scheme.arrays["scale"]
    hi = scheme.arrays["offset"] + 127 * scheme.arrays["scale"]
    inside = (patch >= lo) & (patch <= hi)
    assert inside.mean() > 0.9999
    assert (err[inside] <= (np.broadcast_to(scheme.arrays["scale"], patch.shape)[inside] / 2) * (1 + 1e-5)).all()
    assert scheme.info["heldout_clip_fraction"] < 1e-3 and scheme.info["relative_error"] < 0.01


def test_int8_token_keeps_massive_channels_and_per_token_error_is_half_a_step():
    _, patch = vit_like(32, seed=1)
    encoding = calibrated("int8-token")
    scheme = encoding.schemes["patch"]
    assert sorted(scheme.info["outlier_channels"]) == list(MASSIVE)
    parts = encoding.encode("patch", patch)
    assert parts["_scale"].shape == (32, *GRID, 1) and parts["_outliers"].shape == (32, *GRID, len(MASSIVE))
    back = round_trip(encoding, patch)
    np.testing.assert_array_equal(back[..., list(MASSIVE)], patch[..., list(MASSIVE)].astype(np.float16))
    assert (np.abs(back - patch)[..., NORMAL] <= parts["_scale"] / 2 * (1 + 1e-5)).all()


def test_on_normal_channels_int8_channel_and_token_with_outliers_beat_plain_per_token_absmax():
    _, patch = vit_like(32, seed=1)
    worst_cosine, error = {}, {}
    for text in ("int8-channel", "int8-token", "int8-token:outlier_ratio=1000"):  # the last: no outlier channels
        back, x = round_trip(calibrated(text), patch)[..., NORMAL], patch[..., NORMAL]
        worst_cosine[text] = cosine(back, x).min()
        error[text] = np.linalg.norm(back - x) / np.linalg.norm(x)
    assert worst_cosine["int8-channel"] > 0.999 and worst_cosine["int8-token"] > 0.9999
    # naive per-token int8: the massive channels set every token's step
    assert worst_cosine["int8-token:outlier_ratio=1000"] < 0.97
    assert error["int8-token:outlier_ratio=1000"] > 10 * max(error["int8-channel"], error["int8-token"])


def test_pca_rank_or_variance_and_orthonormal_basis():
    rng = np.random.default_rng(2)
    low = (rng.standard_normal((64, *GRID, 6)) @ rng.standard_normal((6, D)) * 3
           + 0.01 * rng.standard_normal((64, *GRID, D)) + 5).astype(np.float32)
    samples = {"cls": low[:, 0, 0], "patch": low}
    by_variance = Encoding.calibrate(EncodingConfig(name="pca", variance=0.99), D, "float16", samples)
    patch = by_variance.schemes["patch"]
    assert patch.info["rank"] == 6 and patch.info["variance_kept"] >= 0.99
    basis = patch.arrays["basis"]
    np.testing.assert_allclose(basis @ basis.T, np.eye(6), atol=1e-5)
    assert np.abs(round_trip(by_variance, low) - low).max() < 0.1
    by_rank = Encoding.calibrate(EncodingConfig(name="pca", rank=3), D, "float16", samples)
    assert by_rank.encode("patch", low)[""].shape == (64, *GRID, 3) and by_rank.schemes["patch"].info["rank"] == 3
    assert by_variance.schemes["cls"].name == "none"  # CLS is stored as is under pca
    with pytest.raises(EncodingError, match="exceeds the feature dimension"):
        Encoding.calibrate(EncodingConfig(name="pca", rank=D + 1), D, "float16", samples)


def test_values_beyond_float16_are_refused_not_stored_as_inf():
    encoding = calibrated("pca:rank=4")
    with pytest.raises(EncodingError, match="float16's range"):
        encoding.encode("patch", np.full((1, *GRID, D), 1e5, dtype=np.float32))


@pytest.mark.parametrize("text", ["int8-channel", "int8-token", "pca:rank=8", "pca-int8:rank=8"])
def test_torch_decode_equals_the_numpy_formulas(text):
    encoding = calibrated(text)
    _, patch = vit_like(4, seed=3)
    parts = encoding.encode("patch", patch)
    scheme = encoding.schemes["patch"]
    got = encoding.decode("patch", {k: torch.from_numpy(v) for k, v in parts.items()}, "cpu")
    assert got.dtype == torch.float32 and got.shape == patch.shape
    if scheme.name == "int8-channel":
        expected = parts[""] * scheme.arrays["scale"] + scheme.arrays["offset"]
    elif scheme.name == "int8-token":
        expected = parts[""] * parts["_scale"]
        expected[..., scheme.arrays["outlier_channels"]] = parts["_outliers"]
    elif scheme.name == "pca-int8":
        expected = (parts[""] * parts["_scale"]) @ scheme.arrays["basis"] + scheme.arrays["mean"]
    else:
        expected = parts[""].astype(np.float32) @ scheme.arrays["basis"] + scheme.arrays["mean"]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(got.numpy(), encoding.decode_numpy("patch", parts))


def test_missing_int8_codes_decode_to_nan():
    encoding = calibrated("int8-channel")
    codes = np.zeros((2, D), dtype=np.int8)
    codes[1, 5] = INT8_MISSING
    x = encoding.decode_numpy("cls", {"": codes})
    assert np.isfinite(x[0]).all() and np.isnan(x[1, 5]) and np.isfinite(np.delete(x[1], 5)).all()


def test_config_parsing_and_provenance_round_trip():
    assert EncodingConfig.parse("pca:variance=0.95,calibration_images=8") == EncodingConfig(
        name="pca", variance=0.95, calibration_images=8)
    assert str(EncodingConfig.parse("bitround")) == "bitround:keepbits=7"
    with pytest.raises(EncodingError, match="not one of int8-token's parameters"):
        EncodingConfig.parse("int8-token:rank=3")
    with pytest.raises(EncodingError, match="choose one of"):
        EncodingConfig.parse("int4")
    encoding = calibrated("int8-token")
    arrays = encoding.arrays()
    loaded = Encoding.load(encoding.to_json(), D, "float16", arrays.__getitem__)
    _, patch = vit_like(2, seed=5)
    np.testing.assert_array_equal(round_trip(loaded, patch), round_trip(encoding, patch))
    assert loaded.to_json() == encoding.to_json()


def test_calibration_images_are_spread_over_the_list():
    np.testing.assert_array_equal(calibration_indices(10, 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(calibration_indices(3, 64), [0, 1, 2])
    assert len(calibration_indices(0, 64)) == 0


# ---------------------------------------------------------------------------------------
# Stores and readers of encoded groups
# ---------------------------------------------------------------------------------------
def encoded_group(root: Path, text: str, status: list[int],
                  seed: int = 0) -> tuple[TeacherStore, np.ndarray, np.ndarray]:
    """A group of synthetic ViT-like features written through encoding ``text`` (done rows only); returns the
    store and the float cls/patch that were written (rows not done hold zeros)."""
    n = len(status)
    manifest = ImageManifest(ids=tuple(f"i{k}" for k in range(n)), tags=("",) * n, base=None)
    spec = TeacherSpec(name="vit", arch="synthetic", patch_size=8, embed_dim=D)
    geometry = Geometry(resolution=(32, 32), grid=GRID, patch_size=8)
    storage = StorageConfig(unit_size=2, shard_images=0, encoding=EncodingConfig.parse(text))
    encoding = calibrated(text, dtype=storage.dtype)
    store = TeacherStore.create(str(root), "vit", build_provenance(spec, None, manifest, "test", geometry, storage),
                                manifest, GRID, D, storage, encoding=encoding)
    cls, patch = vit_like(n, seed)
    done = np.flatnonzero(np.asarray(status) == STATUS_DONE)
    store.write_rows(done, cls[done], patch[done])
    for unit in range(store.num_units):
        store.write_unit_status(unit, np.asarray(status, dtype=np.uint8))
    return store, cls, patch


@pytest.mark.parametrize("text", ["int8-token", "pca-int8:rank=8"])
def test_an_unwritten_image_of_an_int8_group_decodes_to_nan_and_fails_verify(tmp_path, text):
    store, _, _ = encoded_group(tmp_path / "c.zarr", text, [1, 1, 1, 1])
    store.patch[2] = INT8_MISSING  # as if the chunk were lost: it reads as the fill value
    assert np.isnan(store.read_features("patch", 2, check=False)).all()
    assert np.isfinite(store.read_features("patch", 1)).all()
    with pytest.raises(DamagedFeaturesError, match=r"teacher vit: patch of 1 image\(s\) marked done .*: i2\. .*"
                       r"`dune-cache verify .*c\.zarr`.*`dune-cache repair"):
        store.read_features("patch", [1, 2])
    [report] = verify_cache(str(tmp_path / "c.zarr"))
    assert not report.ok and any("image 2" in p and "non-finite" in p for p in report.problems)


@pytest.mark.parametrize("text", ["int8-channel", "int8-token", "pca:rank=16", "pca-int8:rank=16", "bitround"])
def test_reader_returns_decoded_float_targets_and_decodes_stored_parts_on_request(tmp_path, text):
    store, cls, patch = encoded_group(tmp_path / "c.zarr", text, [1, 1, 2, 1, 1, 1])
    reader = CacheReader(str(tmp_path / "c.zarr"), backend="zarr")
    assert reader.dims == {"vit": D} and reader.grids == {"vit": GRID}
    indices = np.array([4, 0, 2, 2])
    batch = reader.read(indices)
    rows = np.flatnonzero(store.read_status() == STATUS_DONE)[indices]
    np.testing.assert_array_equal(batch.patch["vit"].numpy(), store.read_features("patch", rows))
    assert batch.patch["vit"].dtype == torch.float32 and batch.cls["vit"].shape == (4, D)
    relative = np.linalg.norm(batch.patch["vit"].numpy() - patch[rows]) / np.linalg.norm(patch[rows])
    assert relative < 0.05
    encoded = reader.read(indices, decode=False)
    assert isinstance(encoded, EncodedBatch)
    again = reader.decode(encoded, "cpu")
    assert torch.equal(again.patch["vit"], batch.patch["vit"]) and torch.equal(again.cls["vit"], batch.cls["vit"])


def test_decoding_zeroes_samples_a_teacher_lacks(tmp_path):
    encoded_group(tmp_path / "c.zarr", "int8-channel", [1, 1, 1, 1])
    reader = CacheReader(str(tmp_path / "c.zarr"), backend="zarr")
    encoded = reader.read(np.arange(2), decode=False)
    encoded.mask[1, 0] = False  # as the reader marks a sample a group has not done
    decoded = reader.decode(encoded)
    assert (decoded.patch["vit"][1] == 0).all() and (decoded.patch["vit"][0] != 0).any()


@pytest.mark.parametrize("backend", ["tensorstore", "zarrs", "memory"])
def test_backends_read_encoded_parts_alike(tmp_path, backend):
    pytest.importorskip(backend) if backend != "memory" else None
    encoded_group(tmp_path / "c.zarr", "int8-token", [1, 1, 1, 1, 1, 1])
    indices = np.array([5, 1, 3])
    reference = CacheReader(str(tmp_path / "c.zarr"), backend="zarr").read(indices)
    other = CacheReader(str(tmp_path / "c.zarr"), backend=backend).read(indices)
    assert (torch.equal(reference.patch["vit"], other.patch["vit"])
            and torch.equal(reference.cls["vit"], other.cls["vit"]))


# ---------------------------------------------------------------------------------------
# Extraction with an encoding
# ---------------------------------------------------------------------------------------
def test_extraction_calibrates_once_and_resumes_with_the_stored_calibration(tmp_path, real_image_dir,
                                                                             tiny_checkpoint):
    out = tmp_path / "cache.zarr"
    cfg = ExtractConfig(teacher="tiny_test_teacher", images=real_image_dir, out=str(out), checkpoint=tiny_checkpoint,
                        batch_size=2, num_workers=0, progress=False,
                        storage=StorageConfig(unit_size=2,
                                              encoding=EncodingConfig.parse("pca:rank=6,calibration_images=4")))
    run_extraction(cfg)
    store = TeacherStore.open(str(out), "tiny_test_teacher", mode="a")
    kinds = store.provenance["storage"]["encoding"]["kinds"]
    assert kinds["patch"] == {**kinds["patch"], "scheme": "pca", "images": 4, "rank": 6}
    assert store.patch.shape == (6, 4, 6, 6) and store.cls.dtype == np.float16
    basis = store.encoding.schemes["patch"].arrays["basis"].copy()
    status = store.read_status()
    status[[1, 4]] = 0  # forget two images: the resumed run recomputes them with the stored basis
    for unit in range(store.num_units):
        store.write_unit_status(unit, status)
    run_extraction(cfg)
    resumed = TeacherStore.open(str(out), "tiny_test_teacher")
    np.testing.assert_array_equal(resumed.encoding.schemes["patch"].arrays["basis"], basis)
    assert (resumed.read_status() == STATUS_DONE).all() and all(r.ok for r in verify_cache(str(out)))
    with pytest.raises(StoreMismatchError, match="storage.encoding.name"):
        run_extraction(replace(cfg, storage=StorageConfig(unit_size=2, encoding=EncodingConfig(name="int8-token"))))


def test_extract_command_takes_an_encoding_with_params(tmp_path, real_image_dir, tiny_checkpoint):
    from typer.testing import CliRunner

    from dune_cache.cli import app

    out = tmp_path / "cli.zarr"
    args = ["extract", "--teacher", "tiny_test_teacher", "--images", str(real_image_dir), "--out", str(out),
            "--checkpoint", str(tiny_checkpoint), "--num-workers", "0", "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--encoding", "int8-channel:margin=0.5,calibration_images=3"])
    assert result.exit_code == 0, result.output
    section = TeacherStore.open(str(out), "tiny_test_teacher").provenance["storage"]["encoding"]
    assert section["params"] == {"margin": 0.5, "sigmas": 6.0, "calibration_images": 3}
    assert section["kinds"]["cls"]["images"] == 3
    bad = CliRunner().invoke(app, [*args, "--encoding", "int8-channel:rank=3", "--overwrite"])
    assert bad.exit_code == 2 and "not one of int8-channel's parameters" in bad.output
