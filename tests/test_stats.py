"""Target statistics: Hadamard matrices, mean/std against numpy, PHI-S properties, `dune-cache stats`."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from dune_cache.cli import app
from dune_cache.config import ExtractConfig
from dune_cache.extract.run import run_extraction
from dune_cache.commands.verify import verify_cache
from dune_cache.format.stats import STATS_ARRAYS, read_stats
from dune_cache.commands.stats import compute_stats, hadamard
from dune_cache.format.constants import STATUS_DONE
from dune_cache.format.store import TeacherStore
from dune_cache.config import StorageConfig
from test_reader import make_group


@pytest.mark.parametrize("d", [1, 2, 12, 16, 20, 28, 384, 768, 1024, 1280, 1536])
def test_hadamard_rows_are_orthogonal(d):
    h = hadamard(d)
    assert set(np.unique(h)) <= {-1, 1}
    hf = h.astype(np.float64)  # exact: entries are ±1, sums stay far below 2**53
    np.testing.assert_array_equal(hf @ hf.T, d * np.eye(d))


def test_hadamard_order_without_construction_is_an_error():
    with pytest.raises(ValueError, match="dimension 6"):
        hadamard(6)


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory, real_image_dir, tiny_checkpoint):
    """Tiny teacher (D=16, 4x6 grid) over six real photos."""
    out = tmp_path_factory.mktemp("stats") / "cache.zarr"
    cfg = ExtractConfig(teacher="tiny_test_teacher", images=real_image_dir, out=str(out), checkpoint=tiny_checkpoint,
                        batch_size=3, num_workers=0, progress=False)
    run_extraction(replace(cfg, storage=StorageConfig(dtype="float32", unit_size=4)))
    return out


def test_mean_and_std_match_numpy_and_ignore_images_not_done(tmp_path):
    root = tmp_path / "cache.zarr"
    status = [1, 2, 1, 1, 0, 1, 1, 1, 2, 1, 1]  # failed rows hold garbage, the pending one NaN
    store = make_group(root, "t", [f"i{k}" for k in range(11)], status, (3, 2), 12)
    rng = np.random.default_rng(0)
    done = np.flatnonzero(np.asarray(status) == STATUS_DONE)
    mixing = rng.standard_normal((12, 12)) * np.linspace(0.2, 3, 12)
    patch = (rng.standard_normal((len(done), 3, 2, 12)) @ mixing + rng.normal(0, 4, 12)).astype(np.float16)
    store.write_rows(done, rng.normal(2, 3, (len(done), 12)).astype(np.float16), patch)
    stats = compute_stats(str(root), "t", block_images=3)  # blocks straddle done and not-done rows
    cls = store.cls[:][done].astype(np.float64)
    tokens = store.patch[:][done].astype(np.float64).reshape(-1, 12)
    assert stats.count == len(done)
    np.testing.assert_allclose(stats.cls_mean, cls.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.cls_std, cls.std(0), rtol=1e-10)
    np.testing.assert_allclose(stats.patch_mean, tokens.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.patch_std, tokens.std(0), rtol=1e-10)
    np.testing.assert_allclose(stats.phis_mean, stats.patch_mean)
    again = compute_stats(str(root), "t", block_images=64)
    np.testing.assert_allclose(again.phis_matrix, stats.phis_matrix, rtol=1e-9, atol=1e-12)


def test_phis_gives_every_channel_unit_variance_on_a_real_cache(real_cache):
    stats = compute_stats(str(real_cache), "tiny_test_teacher")
    store = TeacherStore.open(str(real_cache), "tiny_test_teacher")
    done = np.flatnonzero(store.read_status() == STATUS_DONE)
    x = store.patch[:][done].astype(np.float64).reshape(-1, 16)
    y = (x - stats.phis_mean) @ stats.phis_matrix.T
    cov_x, cov_y = np.cov(x.T, bias=True), np.cov(y.T, bias=True)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(np.diag(cov_y), 1, rtol=1e-9)  # isotropic per channel: all variances equal
    # a scaled rotation: distances between targets are preserved up to one factor
    eigenvalues = np.linalg.eigvalsh(cov_x)
    w = stats.phis_matrix
    np.testing.assert_allclose(w @ w.T, np.eye(16) / eigenvalues.mean(), rtol=1e-9, atol=1e-12)
    # not whitening: the spectrum keeps its shape, normalised to mean 1
    np.testing.assert_allclose(np.linalg.eigvalsh(cov_y), eigenvalues / eigenvalues.mean(), rtol=1e-7, atol=1e-9)
    assert eigenvalues.max() / eigenvalues.mean() > 2  # real features are anisotropic: the check has teeth


def test_cli_stats_writes_them_and_the_cache_still_verifies(real_cache):
    assert read_stats(str(real_cache), "tiny_test_teacher") is None
    result = CliRunner().invoke(app, ["stats", str(real_cache)])
    assert result.exit_code == 0, result.output
    assert "[tiny_test_teacher] 6 images" in result.output and "PHI-S  16x16" in result.output
    stored = read_stats(str(real_cache), "tiny_test_teacher")
    computed = compute_stats(str(real_cache), "tiny_test_teacher")
    for name in STATS_ARRAYS:
        np.testing.assert_array_equal(getattr(stored, name), getattr(computed, name))
    assert stored.count == 6
    assert all(report.ok for report in verify_cache(str(real_cache)))
    missing = CliRunner().invoke(app, ["stats", str(real_cache), "--teacher", "nope"])
    assert missing.exit_code == 2 and "no teacher group 'nope'" in missing.output
