"""CacheReader: alignment of teacher groups by image id, errors, backends agree, read-only; shuffle order."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dune_cache.extract.provenance import build_provenance
from dune_cache.teachers.geometry import Geometry
from dune_cache.images.manifest import ImageManifest
from dune_cache.read.backends import BACKENDS, backend_installed
from dune_cache.read.reader import CacheReader
from dune_cache.errors import ReaderError
from dune_cache.read.shuffle import block_shuffled_order, buffer_shuffle
from dune_cache.commands.stats import compute_stats
from dune_cache.format.stats import write_stats
from dune_cache.format.constants import STATUS_DONE, STATUS_PENDING
from dune_cache.format.store import TeacherStore
from dune_cache.config import StorageConfig
from dune_cache.teachers.spec import TeacherSpec


def installed_backends() -> list[str]:
    return [name for name in BACKENDS if backend_installed(name)]


def make_group(root: Path, name: str, ids: list[str], status: list[int], grid: tuple[int, int], dim: int,
               tags: list[str] | None = None, seed: int = 0) -> TeacherStore:
    """A teacher group with random float16 features for the done/failed images (failed rows hold
    garbage a reader must ignore; pending rows are never written)."""
    manifest = ImageManifest(ids=tuple(ids), tags=tuple(tags or [""] * len(ids)), base=None)
    spec = TeacherSpec(name=name, arch="synthetic", patch_size=8, embed_dim=dim)
    geometry = Geometry(resolution=(grid[0] * 8, grid[1] * 8), grid=grid, patch_size=8)
    storage = StorageConfig(unit_size=2, shard_images=0)
    store = TeacherStore.create(str(root), name, build_provenance(spec, None, manifest, "test", geometry, storage),
                                manifest, grid, dim, storage)
    rng = np.random.default_rng(seed)
    status = np.asarray(status, dtype=np.uint8)
    written = np.flatnonzero(status != STATUS_PENDING)
    store.write_rows(written, rng.standard_normal((len(written), dim)).astype(np.float16),
                     rng.standard_normal((len(written), *grid, dim)).astype(np.float16))
    for unit in range(store.num_units):
        store.write_unit_status(unit, status)
    return store


@pytest.fixture
def two_groups(tmp_path) -> Path:
    """Group ``alpha`` (6 images, one failed) and ``beta`` (other ids, other grid and dim, one failed)."""
    root = tmp_path / "cache.zarr"
    make_group(root, "alpha", [f"a{i}" for i in range(6)], [1, 1, 2, 1, 1, 1], (2, 3), 8,
               tags=["generic"] * 6, seed=1)
    make_group(root, "beta", ["a4", "b0", "a1", "a2", "b1"], [1, 1, 1, 1, 2], (3, 3), 4,
               tags=["beta", "beta", "", "beta", "beta"], seed=2)
    return root


def stored_rows(root: Path, name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """image id -> (cls, patch) as stored, for the done images of a group."""
    store = TeacherStore.open(str(root), name)
    ids = store.manifest().ids
    return {ids[i]: (store.cls[i], store.patch[i]) for i in np.flatnonzero(store.read_status() == STATUS_DONE)}


def test_groups_are_aligned_by_image_id_with_a_mask(two_groups):
    reader = CacheReader(str(two_groups), backend="zarr")
    assert reader.teachers == ["alpha", "beta"]
    # union of done ids: alpha's in manifest order (a2 failed there), then beta's new ones (a2 done in beta)
    assert reader.image_ids == ["a0", "a1", "a3", "a4", "a5", "b0", "a2"]
    assert reader.tags == ["generic", "generic", "generic", "generic", "generic", "beta", "beta"]
    assert reader.grids == {"alpha": (2, 3), "beta": (3, 3)} and reader.dims == {"alpha": 8, "beta": 4}
    stored = {name: stored_rows(two_groups, name) for name in reader.teachers}
    indices = np.array([6, 0, 3, 3, 5, 1, 2, 4])  # any order, with a repeat
    batch = reader.read(indices)
    assert batch.mask.shape == (8, 2) and batch.patch["beta"].shape == (8, 3, 3, 4)
    for k, sample in enumerate(indices):
        image_id = reader.image_ids[sample]
        for t, name in enumerate(reader.teachers):
            has = image_id in stored[name]
            assert bool(batch.mask[k, t]) == has, (image_id, name)
            cls, patch = stored[name][image_id] if has else (0, 0)
            np.testing.assert_array_equal(batch.cls[name][k].numpy(), np.zeros(reader.dims[name]) + cls)
            np.testing.assert_array_equal(batch.patch[name][k].numpy(),
                                          np.zeros((*reader.grids[name], reader.dims[name])) + patch)
    assert all(v.dtype == torch.float32 for v in [*batch.cls.values(), *batch.patch.values()])


def test_a_missing_teacher_is_named_with_the_available_ones(two_groups):
    with pytest.raises(ReaderError, match=r"no teacher group 'gamma'.*available: alpha, beta"):
        CacheReader(str(two_groups), ["alpha", "gamma"])
    reader = CacheReader(str(two_groups), ["beta"], backend="zarr")
    assert reader.teachers == ["beta"] and reader.image_ids == ["a4", "b0", "a1", "a2"]
    with pytest.raises(IndexError):
        reader.read(np.array([4]))


def test_an_incomplete_group_is_refused_unless_partial_reads_are_allowed(two_groups):
    make_group(two_groups, "gamma", ["a0", "c0", "c1", "c2"], [1, 0, 1, 0], (2, 2), 4)
    with pytest.raises(ReaderError, match=r"'gamma' is incomplete: 2 of 4 images pending"):
        CacheReader(str(two_groups))
    reader = CacheReader(str(two_groups), ["gamma", "alpha"], backend="zarr", allow_partial=True)
    assert reader.image_ids[:2] == ["a0", "c1"] and "c0" not in reader.image_ids
    batch = reader.read(np.arange(len(reader)))
    np.testing.assert_array_equal(batch.mask[:3].numpy(), [[True, True], [True, False], [False, True]])


@pytest.mark.parametrize("backend", [b for b in installed_backends() if b != "zarr"])
def test_backends_return_identical_batches(two_groups, backend):
    reference, other = CacheReader(str(two_groups), backend="zarr"), CacheReader(str(two_groups), backend=backend)
    assert other.backend == backend
    indices = np.random.default_rng(0).permutation(len(reference))
    a, b = reference.read(indices), other.read(indices)
    assert (a.mask == b.mask).all()
    for name in reference.teachers:
        assert (a.cls[name] == b.cls[name]).all() and (a.patch[name] == b.patch[name]).all()


@pytest.mark.parametrize("backend", installed_backends())
def test_float16_output_holds_the_stored_values(two_groups, backend):
    indices = np.array([6, 2, 0])
    wide = CacheReader(str(two_groups), backend="zarr").read(indices)
    half = CacheReader(str(two_groups), backend=backend, dtype=torch.float16).read(indices)
    for name in ("alpha", "beta"):
        assert half.patch[name].dtype == torch.float16 and torch.equal(half.patch[name].float(), wide.patch[name])
        assert torch.equal(half.cls[name].float(), wide.cls[name])


def test_auto_backend_is_an_installed_one(two_groups):
    assert CacheReader(str(two_groups)).backend in installed_backends()
    with pytest.raises(ReaderError, match="unknown backend"):
        CacheReader(str(two_groups), backend="hdf5")
    with pytest.raises(ReaderError, match="not a floating point dtype"):
        CacheReader(str(two_groups), dtype=torch.int8)


FORKED_WORKERS = """
import sys, numpy as np, torch
from dune_cache.read.reader import CacheReader

class Batches(torch.utils.data.Dataset):
    def __init__(self, reader): self.reader = reader
    def __len__(self): return len(self.reader) // 2
    def __getitem__(self, k): return self.reader.read(np.arange(2 * k, 2 * k + 2)).patch["alpha"]

got = {}
for backend in sys.argv[2:]:
    reader = CacheReader(sys.argv[1], backend=backend)  # built, never read, in the parent
    loader = torch.utils.data.DataLoader(Batches(reader), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    got[backend] = torch.cat(list(loader))
expected = CacheReader(sys.argv[1], backend="zarr").read(np.arange(len(got["zarr"]))).patch["alpha"]
print(" ".join(f"{backend}={torch.equal(x, expected)}" for backend, x in got.items()))
"""


def test_a_reader_built_before_forking_works_in_dataloader_workers(two_groups):
    # a fresh interpreter: this pytest process has already used the backends, and a forked child
    # cannot use tensorstore (abort) or zarrs (hang) once its parent has
    backends = installed_backends()
    done = subprocess.run([sys.executable, "-c", FORKED_WORKERS, str(two_groups), *backends],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [f"{backend}=True" for backend in backends]


def test_a_used_reader_pickles_without_its_handles(two_groups):
    reader = CacheReader(str(two_groups))
    first = reader.read(np.arange(3))
    clone = pickle.loads(pickle.dumps(reader))  # what spawn/forkserver DataLoader workers receive
    assert clone.image_ids == reader.image_ids
    assert torch.equal(clone.read(np.arange(3)).patch["beta"], first.patch["beta"])


def file_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


def test_reading_never_writes_to_the_cache(two_groups):
    write_stats(str(two_groups), "alpha", compute_stats(str(two_groups), "alpha"))
    before = file_snapshot(two_groups)
    for backend in installed_backends():
        reader = CacheReader(str(two_groups), backend=backend)
        reader.read(np.arange(len(reader)))
        assert reader.stats("alpha").count == 5 and reader.stats("beta") is None
    assert file_snapshot(two_groups) == before


# ---------------------------------------------------------------------------------------
# Shuffle
# ---------------------------------------------------------------------------------------
def reference_buffer_shuffle(stream: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The shuffle buffer written as the obvious loop (same random draws as the vectorised one)."""
    fill = min(size, len(stream))
    buffer, out = list(stream[:fill]), []
    if len(stream) > fill:
        for item, slot in zip(stream[fill:], rng.integers(0, fill, size=len(stream) - fill)):
            out.append(buffer[slot])
            buffer[slot] = item
    return np.asarray(out + [buffer[k] for k in rng.permutation(fill)], dtype=np.int64)


@pytest.mark.parametrize("n,size", [(0, 4), (3, 8), (10, 4), (1000, 7), (500, 1), (100, 100), (101, 100)])
def test_vectorised_buffer_shuffle_equals_the_loop(n, size):
    stream = np.random.default_rng(n).permutation(n)
    np.testing.assert_array_equal(buffer_shuffle(stream, size, np.random.default_rng(1)),
                                  reference_buffer_shuffle(stream, size, np.random.default_rng(1)))


@pytest.mark.parametrize("n,block,buffer", [(0, 4, 4), (1, 4, 4), (10, 3, 4), (1000, 64, 256), (1000, 1, 5000)])
def test_block_shuffled_order_is_a_deterministic_permutation(n, block, buffer):
    order = block_shuffled_order(n, block, buffer, seed=3, epoch=0)
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
    np.testing.assert_array_equal(order, block_shuffled_order(n, block, buffer, seed=3, epoch=0))
    if n >= 10:
        assert not np.array_equal(order, block_shuffled_order(n, block, buffer, seed=3, epoch=1))
        assert not np.array_equal(order, block_shuffled_order(n, block, buffer, seed=4, epoch=0))


def test_without_a_buffer_blocks_come_whole_and_in_shuffled_order():
    order = block_shuffled_order(1000, 50, 1, seed=0, epoch=0)
    blocks = order.reshape(20, 50)
    np.testing.assert_array_equal(blocks - blocks[:, :1], np.tile(np.arange(50), (20, 1)))
    assert sorted(blocks[:, 0] // 50) == list(range(20)) and list(blocks[:, 0] // 50) != list(range(20))
