"""A cache never lies: a lost chunk of a done image is an error on every read path (or skipped on request), never
NaN targets; SIGTERM and a full disk stop extraction with one paragraph, keeping and resuming what was done."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr.storage
from typer.testing import CliRunner

from dune_cache.cli import app as cache_app
from dune_cache.encodings import EncodingConfig
from dune_cache.extract.run import run_extraction
from dune_cache.errors import DiskFullError, Interrupted
from dune_cache.read.backends import BACKENDS, backend_installed
from dune_cache.read.reader import CacheReader
from dune_cache.commands.verify import verify_cache
from dune_cache.commands.recompress import RecompressConfig, recompress
from dune_cache.commands.stats import compute_stats
from dune_cache.format.constants import STATUS_DONE
from dune_cache.format.store import TeacherStore
from dune_cache.errors import DamagedFeaturesError
from dune_cache.teachers import create_teacher

from test_extract import TESTS, config, images, read_all  # noqa: F401 - images: 6 photos and 3 unusable files
from test_reader import make_group

LOST = "a3"  # the image whose patch chunk is lost


@pytest.fixture
def lost_chunk(tmp_path) -> Path:
    """Group ``alpha`` (6 done images) whose patch chunk of image ``a3`` (row 3) is gone, as after an incomplete
    copy or upload."""
    root = tmp_path / "cache.zarr"
    make_group(root, "alpha", [f"a{i}" for i in range(6)], [1] * 6, (2, 3), 8)
    chunk = root / "alpha" / "patch" / "c" / "3" / "0" / "0" / "0"
    assert chunk.is_file()
    chunk.unlink()
    return root


@pytest.mark.parametrize("backend", [b for b in BACKENDS if backend_installed(b)])
def test_a_lost_chunk_is_an_error_naming_teacher_array_image_and_fix(lost_chunk, backend):
    reader = CacheReader(str(lost_chunk), backend=backend)
    assert np.isfinite(reader.read(np.array([0, 1, 2])).patch["alpha"].numpy()).all()  # intact images read
    with pytest.raises(DamagedFeaturesError) as error:
        reader.read(np.array([0, 3, 5]))
    message = str(error.value)
    assert "teacher alpha: patch of 1 image(s) marked done" in message and f": {LOST}." in message
    assert f"dune-cache verify {lost_chunk}" in message and f"dune-cache repair {lost_chunk}" in message
    assert "data.skip_damaged=true" in message


def test_a_lost_chunk_is_an_error_also_when_decoded_later_on_the_training_device(lost_chunk):
    reader = CacheReader(str(lost_chunk), backend="zarr")
    stored = reader.read(np.array([3, 4]), decode=False)  # DataLoader workers hand stored parts over
    with pytest.raises(DamagedFeaturesError, match=f"patch of 1 image.*: {LOST}\\."):
        reader.decode(stored, "cpu")


def test_skip_damaged_drops_just_those_targets_and_counts_them(lost_chunk, caplog):
    reader = CacheReader(str(lost_chunk), backend="zarr", skip_damaged=True)
    batch = reader.read(np.array([0, 3, 5, 3]))
    assert batch.damaged[:, 0].tolist() == [False, True, False, True]
    assert batch.mask[:, 0].tolist() == [True, False, True, False]
    assert np.isfinite(batch.patch["alpha"].numpy()).all() and not batch.patch["alpha"][1].any()
    assert np.isfinite(batch.cls["alpha"].numpy()).all() and not batch.cls["alpha"][1].any()
    assert "skipped 2 damaged target(s) (data.skip_damaged) of image(s) a3, a3" in caplog.text


def test_stats_recompress_and_show_refuse_a_lost_chunk(lost_chunk, tmp_path):
    with pytest.raises(DamagedFeaturesError, match=f"alpha: patch .*: {LOST}\\."):
        compute_stats(str(lost_chunk), "alpha")
    with pytest.raises(DamagedFeaturesError, match=f"alpha: patch .*: {LOST}\\."):
        recompress(RecompressConfig(cache=str(lost_chunk), out=str(tmp_path / "copy.zarr"),
                                    encoding=EncodingConfig.parse("int8-token")))
    result = CliRunner().invoke(cache_app, ["stats", str(lost_chunk)])
    assert result.exit_code != 0 and f"{LOST}" in result.output and "Traceback" not in result.output
    pictures = CliRunner().invoke(cache_app, ["show", str(lost_chunk), "--out", str(tmp_path / "pics"),
                                              "--images", LOST])
    assert pictures.exit_code != 0 and "dune-cache repair" in pictures.output, pictures.output
    # verify lists it and repair is the fix it names
    verified = CliRunner().invoke(cache_app, ["verify", str(lost_chunk), "--no-progress"])
    assert verified.exit_code == 1 and "image 3" in verified.output


def test_pending_images_still_read_as_nan_where_the_store_is_read_raw(tmp_path):
    root = tmp_path / "cache.zarr"
    store = make_group(root, "alpha", [f"a{i}" for i in range(4)], [1, 0, 1, 0], (2, 3), 8)
    values = store.read_features("patch", np.arange(4))  # pending rows are not damage: no error
    assert np.isfinite(values[[0, 2]]).all() and np.isnan(values[[1, 3]]).all()


# ---------------------------------------------------------------------------------------
# Interrupting and filling the disk
# ---------------------------------------------------------------------------------------
def test_sigterm_stops_extraction_keeping_finished_batches_and_resumes(tmp_path, images, tiny_checkpoint,
                                                                        monkeypatch):
    reference = config(images, tmp_path / "ref", tiny_checkpoint)
    run_extraction(reference)
    teacher_cls = type(create_teacher("tiny_test_teacher"))
    real_forward = teacher_cls.forward
    calls = {"n": 0}

    def sigterm_on_second_batch(self, px):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread at the next bytecode
        return real_forward(self, px)

    monkeypatch.setattr(teacher_cls, "forward", sigterm_on_second_batch)
    cfg = config(images, tmp_path / "cache", tiny_checkpoint)
    with pytest.raises(Interrupted, match="interrupted .*SIGTERM.* kept in .*cache. Re-run the same command") as stop:
        run_extraction(cfg)
    assert stop.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handler is back
    status, _, _ = read_all(tmp_path / "cache")
    assert 0 < (status == STATUS_DONE).sum() < 6
    monkeypatch.setattr(teacher_cls, "forward", real_forward)
    run_extraction(cfg)
    for a, b in zip(read_all(tmp_path / "ref"), read_all(tmp_path / "cache")):
        np.testing.assert_array_equal(a, b)


def test_sigterm_to_the_cli_exits_within_seconds_with_one_paragraph(tmp_path, real_image_dir, tiny_checkpoint):
    images = tmp_path / "many"
    images.mkdir()
    for k in range(40):
        for photo in real_image_dir.iterdir():
            shutil.copy(photo, images / f"{k:02d}_{photo.name}")
    out = tmp_path / "cache"
    script = ("import sys, time; sys.path.insert(0, {tests!r}); import conftest; "
              "real = conftest.TinyTeacher.forward_tokens; "
              "conftest.TinyTeacher.forward_tokens = lambda self, x: (time.sleep(0.25), real(self, x))[1]; "
              "from dune_cache.cli import app; app()").format(tests=str(TESTS))
    process = subprocess.Popen([sys.executable, "-c", script, "extract", "--teacher", "tiny_test_teacher",
                                "--images", str(images), "--out", str(out), "--checkpoint", str(tiny_checkpoint),
                                "--batch-size", "2", "--unit-size", "4", "--num-workers", "1", "--no-progress"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        status = out / "tiny_test_teacher" / "status" / "c" / "0"
        if status.exists():
            break
        time.sleep(0.1)
    assert process.poll() is None, process.communicate()[0]
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=30)[0]
    # the whole job takes >= 30 s (120 batches x 0.25 s); stopping must not wait for it, even on a loaded machine
    assert time.monotonic() - signalled < 15, "took more than a few seconds to stop"
    assert process.returncode == 143, output
    assert "extraction interrupted (terminated (SIGTERM))" in output and "Re-run the same command" in output
    assert "Traceback" not in output
    status, _, _ = read_all(out)
    done = int((status == STATUS_DONE).sum())
    assert 0 < done < 240
    [report] = verify_cache(str(out))
    assert report.pending == 240 - done and not report.damaged and not report.inconsistent, report.problems


def test_a_full_disk_is_one_paragraph_keeping_what_was_written(tmp_path, images, tiny_checkpoint, monkeypatch):
    out = tmp_path / "cache"
    real_set = zarr.storage.LocalStore._set
    writes = {"n": 0}

    async def fills_up_after_40_writes(self, key, value, exclusive=False):
        writes["n"] += 1
        if writes["n"] > 40:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.root / key))
        return await real_set(self, key, value, exclusive)

    monkeypatch.setattr(zarr.storage.LocalStore, "_set", fills_up_after_40_writes)
    args = ["extract", "--teacher", "tiny_test_teacher", "--images", str(images), "--out", str(out),
            "--checkpoint", str(tiny_checkpoint), "--batch-size", "2", "--unit-size", "4", "--num-workers", "0",
            "--no-progress"]
    result = CliRunner().invoke(cache_app, args)
    assert result.exit_code == 2 and result.exception is None or isinstance(result.exception, SystemExit)
    message = result.output.strip()
    assert message.startswith("error: no space left on the device writing ") and str(out) in message
    assert "Every image finished before is kept in" in message and "re-run the same command to resume" in message
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    with pytest.raises(DiskFullError):
        run_extraction(config(images, out, tiny_checkpoint))
    monkeypatch.setattr(zarr.storage.LocalStore, "_set", real_set)
    status, _, _ = read_all(out)
    kept = int((status == STATUS_DONE).sum())
    assert 0 < kept < 6
    assert CliRunner().invoke(cache_app, args).exit_code == 0  # space again: the same command resumes
    run_extraction(config(images, tmp_path / "ref", tiny_checkpoint))
    for a, b in zip(read_all(tmp_path / "ref"), read_all(out)):
        np.testing.assert_array_equal(a, b)
    assert TeacherStore.open(str(out), "tiny_test_teacher").read_failures() == TeacherStore.open(
        str(tmp_path / "ref"), "tiny_test_teacher").read_failures()
