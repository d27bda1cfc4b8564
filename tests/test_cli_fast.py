"""The CLIs answer at once: ``--help``, the teacher list and every config or flag error import no torch, timm,
torchvision, zarr or dask, and cache misfits are found before any model is built (docs/benchmarks.md, "CLI
start-up", has the timings)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dune_cache.read.backends import BACKENDS
from dune_cache.config import ExtractConfig
from dune_cache.extract.run import run_extraction
from dune_student.training import trainer as train_module
from dune_student.config import CHOICES, RESOLVED, STUDENT_ARCHS, StudentConfig, config_to_dict, load_config
from dune_student.errors import DataError
from dune_student.model.student import ARCHS, Student
from dune_student.training.trainer import train
from test_train import config

HEAVY = ("torch", "timm", "torchvision", "zarr", "dask")
RUN_APP = """
import json, sys
from {module} import app
try:
    app({args!r}, prog_name="cli")
except SystemExit as exit:
    code = exit.code
print("RESULT", code, json.dumps([m for m in {heavy!r} if m in sys.modules]), file=sys.stderr)
"""
NO_CACHE = ["--cache", "/nonexistent/cache.zarr", "--images", "/nonexistent/images"]


def run_app(module: str, *args: str) -> tuple[int, list[str], list[str]]:
    """Run ``module``'s Typer app with ``args`` in a fresh interpreter: (exit status, heavy modules it imported,
    the stderr lines it printed before)."""
    done = subprocess.run([sys.executable, "-c", RUN_APP.format(module=module, args=list(args), heavy=HEAVY)],
                          capture_output=True, text=True, timeout=120)
    *lines, result = done.stderr.strip().splitlines()
    _, code, heavy = result.split(" ", 2)
    return int(code), json.loads(heavy), lines


@pytest.mark.parametrize("module, args", [
    ("dune_cache.cli", ["--help"]),
    ("dune_cache.cli", ["extract", "--help"]),
    ("dune_cache.cli", ["teachers"]),
    ("dune_cache.cli", ["teachers", "--offline"]),
    ("dune_cache.cli", ["teachers", "--path", "mobilenet_v2"]),
    ("dune_cache.cli", ["convert-checkpoint", "--help"]),
    ("dune_student.cli", ["--help"]),
    ("dune_student.cli", ["train", "--help"]),
])
def test_help_and_the_teacher_list_import_nothing_heavy(module, args):
    code, heavy, _ = run_app(module, *args)
    assert code == 0 and heavy == []


@pytest.mark.parametrize("args, message", [
    (["student.arch=vit_tny"], "student.arch: 'vit_tny' is not one of vit_tiny, vit_small, vit_base, vit_large"),
    (["student.archh=vit_tiny"], "unknown config field 'student.archh'; StudentConfig has: arch, attention,"),
    (["steps=many"], "steps: expected int, got 'many'"),
    (["heads.kind=deep"], "heads.kind: 'deep' is not one of transformer, ladder, mlp"),
    (["augment.mode=crop"], "augment.mode: 'crop' is not one of none, grid-crop, views"),
    (["data.reader_backend=fast"], "data.reader_backend: 'fast' is not one of auto, tensorstore, zarrs, zarr, memory"),
    (["student.img_size=100"], "student.img_size: 100 is not a multiple of student.patch_size 14"),
    (["--attention", "flash"], "student.attention: 'flash' is not one of auto, xformers, sdpa"),
])
def test_config_errors_are_one_line_naming_the_field_before_torch_or_the_cache(args, message):
    """The cache does not exist: an error about it would mean it was opened."""
    code, heavy, lines = run_app("dune_student.cli", "train", *NO_CACHE, *args)
    assert (code, heavy) == (2, [])
    assert lines == [f"error: {message}"] or (len(lines) == 1 and lines[0].startswith(f"error: {message}")), lines


@pytest.mark.parametrize("args, message", [
    (["--teacher", "nope"], "unknown teacher 'nope'"),
    (["--teacher", "dinov2_vits14"], "--checkpoint is required"),
    (["--teacher", "dinov2_vits14", "--checkpoint", "/nonexistent.pth"], "checkpoint not found: /nonexistent.pth"),
    (["--teacher", "dinov2_vits14", "--random-weights", "--resolution", "33"],
     "not a multiple of dinov2_vits14's patch size 14"),
    (["--teacher", "dinov2_vits14", "--random-weights", "--resize", "pad"], "resize mode 'pad'"),
    (["--teacher", "dinov2_vits14", "--random-weights", "--codec", "lzma"], "codec 'lzma'"),
    (["--teacher", "dinov2_vits14", "--random-weights", "--encoding", "pca:bits=3"], "not one of pca's parameters"),
    (["--teacher", "dinov2_vits14", "--random-weights", "--shard", "2/2"], "--shard '2/2': need 0 <= i < n"),
    (["--teacher", "dinov2_vits14", "--random-weights", "--scheduler", "host:8786"],
     "--scheduler 'host:8786': expected local, local:N"),
    (["--teacher", "dinov2_vits14", "--random-weights", "--scheduler", "local:0"], "--scheduler 'local:0'"),
    (["--teacher", "dinov2_vits14", "--random-weights", "--scheduler", "local:2", "--shard", "1/2"],
     "deals the work units to the cluster's workers itself: drop --shard 1/2"),
])
def test_extract_flag_errors_are_one_line_before_torch(args, message):
    code, heavy, lines = run_app("dune_cache.cli", "extract", "--images", "/nonexistent", "--out", "/nonexistent.zarr",
                                 *args)
    assert (code, heavy) == (2, [])
    assert len(lines) == 1 and message in lines[0], lines


def test_convert_checkpoint_without_the_trust_flag_refuses_before_torch(tmp_path):
    source = tmp_path / "their.pth"
    source.write_bytes(b"a pickle from someone else")
    code, heavy, lines = run_app("dune_cache.cli", "convert-checkpoint", str(source), str(tmp_path / "x.safetensors"))
    assert (code, heavy) == (2, [])
    assert len(lines) == 1 and "run it again with --trust-this-file" in lines[0], lines


def test_the_config_lists_what_the_model_and_reader_build():
    assert STUDENT_ARCHS == tuple(ARCHS)
    assert CHOICES["data.reader_backend"] == ("auto", *BACKENDS)
    for arch in STUDENT_ARCHS:
        student = Student(StudentConfig(arch=arch, attention="sdpa"), device="meta")
        assert student.embed_dim == ARCHS[arch].embed_dim and len(student.vit.blocks) == ARCHS[arch].depth


def extract(images: Path, out: Path, checkpoint: Path, resolution: str, name: str | None = None) -> None:
    """Tiny-teacher group for a student of patch 8 at ``resolution``: grid ``resolution / 8``."""
    run_extraction(ExtractConfig(teacher="tiny_test_teacher", images=images, out=str(out), checkpoint=checkpoint,
                                 name=name, student_patch=8, student_resolution=resolution, batch_size=6,
                                 num_workers=0, progress=False))


@pytest.fixture
def no_model(monkeypatch):
    """Building a student fails the test: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the cache was checked")

    monkeypatch.setattr(train_module, "Student", refuse)


def test_a_grid_mismatch_is_refused_before_any_model_is_built(tmp_path, real_image_dir, tiny_checkpoint, no_model,
                                                               caplog):
    cache = tmp_path / "cache.zarr"
    extract(real_image_dir, cache, tiny_checkpoint, "32")
    assert "token grid" not in caplog.text
    with caplog.at_level("WARNING"):
        extract(real_image_dir, cache, tiny_checkpoint, "48", name="wider")
    assert (f"teacher group wider gets token grid 6x6, other groups of {cache} have tiny_test_teacher 4x4: training "
            "with augment.mode=grid-crop") in caplog.text
    with pytest.raises(DataError, match="grid-crop needs all teachers on one token grid"):
        train(config(cache, real_image_dir, tmp_path / "run", "loss.standardize=ema"))


def test_missing_statistics_are_refused_before_any_model_is_built(tmp_path, real_image_dir, tiny_checkpoint,
                                                                  no_model):
    cache = tmp_path / "cache.zarr"
    extract(real_image_dir, cache, tiny_checkpoint, "32")
    with pytest.raises(DataError, match=r"loss.standardize=channel needs cache statistics for \['tiny_test_teacher'\]"):
        train(config(cache, real_image_dir, tmp_path / "run"))


def test_config_json_records_the_resolved_values_and_loads_back(tmp_path, real_image_dir, tiny_checkpoint, caplog):
    cache = tmp_path / "cache.zarr"
    extract(real_image_dir, cache, tiny_checkpoint, "32")
    run = tmp_path / "run"
    settings = ["loss.standardize=ema", "data.resolution=0", "data.num_workers=-1", "data.holdout=2", "steps=1",
                "device=cpu"]
    with caplog.at_level("INFO"):
        train(config(cache, real_image_dir, run, *settings))
    saved = json.loads((run / "config.json").read_text())
    backend = saved[RESOLVED].pop("data.reader_backend")
    assert backend in BACKENDS
    assert saved[RESOLVED] == {"data.resolution": 32, "data.teachers": ["tiny_test_teacher"], "data.num_workers": 1,
                               "student.attention": "sdpa", "device": "cpu"}
    assert (f"student input 32x32, 4 training images, 2 held out, reader backend {backend}, attention sdpa, "
            "1 loader workers") in caplog.text
    assert saved["data"]["resolution"] == 0  # the config as given, as the checkpoint keeps it for resuming
    assert config_to_dict(load_config(run / "config.json")) == config_to_dict(config(cache, real_image_dir, run,
                                                                                      *settings))
    resumed = train(config(cache, real_image_dir, run, *settings))  # the same config resumes the finished run
    assert (resumed.steps, resumed.session_steps) == (1, 0)
