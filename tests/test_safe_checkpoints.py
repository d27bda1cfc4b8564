"""Teacher checkpoints load without running code (docs/security.md): a booby-trapped pickle handed to each command
that reads one is refused, naming what it holds and `dune-cache convert-checkpoint ... --trust-this-file`; release
files' plain types (argparse.Namespace, numpy scalars) still load; a converted file loads like the original."""
from __future__ import annotations

import argparse
import json
import zipfile

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from dune_cache.cli import app
from dune_cache.errors import CheckpointError
from dune_cache.format.constants import ATTR_KEY
from dune_cache.format.store import TeacherStore
from dune_cache.teachers import create_teacher
from dune_cache.teachers.base import read_checkpoint
from dune_cache.teachers.checkpoint_io import TREE_KEY
from dune_cache.utils.hashing import file_sha256
from test_repair import GROUP, extract, truncate
from test_repair import images  # noqa: F401 - fixture
from test_teachers_radio import release_args, release_state
from test_train_errors import assert_one_paragraph_error
from traps import Trap, assert_not_fired, save_trapped

runner = CliRunner()
WAY_OUT = "--trust-this-file"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_a_trapped_checkpoint_is_refused_naming_its_contents_and_the_way_out(tmp_path, legacy):
    marker = tmp_path / "fired"
    path = save_trapped(tmp_path / "trapped.pth", marker, legacy=legacy)
    with pytest.raises(CheckpointError) as refused:
        read_checkpoint(path)
    assert_not_fired(marker)
    message = str(refused.value)
    assert f"checkpoint {path} holds objects of type io.open" in message
    assert f"dune-cache convert-checkpoint {path} {tmp_path / 'trapped.safetensors'} {WAY_OUT}" in message


def test_release_files_plain_types_load_safely(tmp_path):
    """Multi-HMR's layout (args Namespace, a numpy scalar best_val, a scaler dict), and a numpy scalar as numpy 1
    pickles it (``numpy.core.multiarray.scalar``, rewritten into the file's pickle)."""
    ckpt = {"epoch": 3, "iter": 7, "model_state_dict": {"w": torch.ones(2)}, "scaler": {"scale": 1024.0},
            "args": argparse.Namespace(backbone="dinov2_vitl14", img_size=[896], dtype=torch.bfloat16),
            "best_val": np.float64(0.25)}
    torch.save(ckpt, tmp_path / "multiHMR.pt")
    loaded = read_checkpoint(tmp_path / "multiHMR.pt")
    assert loaded["args"] == ckpt["args"] and loaded["best_val"] == 0.25 and loaded["scaler"] == ckpt["scaler"]
    with zipfile.ZipFile(tmp_path / "multiHMR.pt") as file:
        entries = [(info, file.read(info.filename)) for info in file.infolist()]
    with zipfile.ZipFile(tmp_path / "numpy1.pt", "w") as file:
        for info, data in entries:
            file.writestr(info, data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert read_checkpoint(tmp_path / "numpy1.pt")["best_val"] == 0.25


def test_extract_refuses_a_trapped_checkpoint_in_one_line(tmp_path, real_image_dir):
    marker, out = tmp_path / "fired", tmp_path / "cache.zarr"
    path = save_trapped(tmp_path / "tiny.pth", marker)
    result = runner.invoke(app, ["extract", "--teacher", "tiny_test_teacher", "--checkpoint", str(path), "--images",
                                 str(real_image_dir), "--out", str(out), "--no-progress", "--num-workers", "0"])
    assert_one_paragraph_error(result, f"checkpoint {path} holds objects of type io.open", WAY_OUT)
    assert_not_fired(marker)
    assert not out.exists()


def test_repair_refuses_a_trapped_checkpoint_the_cache_points_at_before_writing(tmp_path, images, tiny_checkpoint,
                                                                                 snapshot):
    """A cache from someone else's bucket whose provenance names (and hashes) a trapped checkpoint."""
    out, marker = tmp_path / "cache.zarr", tmp_path / "fired"
    extract(images, out, tiny_checkpoint)
    truncate(out / GROUP / "cls" / "c" / "2" / "0")  # something to repair
    trapped = save_trapped(tmp_path / "their.pth", marker, torch.load(tiny_checkpoint))
    store = TeacherStore.open(str(out), GROUP, mode="a")
    meta = dict(store.provenance)
    meta["checkpoint"] = {"file": trapped.name, "sha256": file_sha256(trapped), "bytes": trapped.stat().st_size}
    meta["source"] = {**meta["source"], "checkpoint": str(trapped)}
    store.group.attrs[ATTR_KEY] = meta
    before = snapshot(out)
    result = runner.invoke(app, ["repair", str(out), "--no-progress", "--num-workers", "0"])
    assert_one_paragraph_error(result, f"checkpoint {trapped} holds objects of type io.open", WAY_OUT)
    assert_not_fired(marker)
    assert snapshot(out) == before


def test_convert_checkpoint_needs_the_flag_then_writes_a_file_the_loader_reads_like_the_original(tmp_path):
    """A RADIO release (its args Namespace holds lists of dicts, None, bools) with a trapped extra object."""
    marker, source, out = tmp_path / "fired", tmp_path / "radio.pth.tar", tmp_path / "radio.safetensors"
    clean = tmp_path / "clean.pth.tar"
    torch.save({"args": release_args(), "state_dict": release_state()}, clean)
    torch.save({"args": release_args(), "state_dict": release_state(), "optimizer": Trap(marker), "epoch": 4}, source)
    with pytest.raises(CheckpointError, match=WAY_OUT):
        create_teacher("c_radio_v3_b", source)
    assert_not_fired(marker)

    refused = runner.invoke(app, ["convert-checkpoint", str(source), str(out)])
    assert_one_paragraph_error(refused, f"loads {source} with full unpickling", WAY_OUT)
    assert_not_fired(marker)
    assert not out.exists()

    converted = runner.invoke(app, ["convert-checkpoint", str(source), str(out), WAY_OUT])
    assert converted.exit_code == 0, converted.output
    assert marker.exists()  # the user vouched for the file: it was unpickled in full, once, by this command
    assert "dropped /optimizer: _io.TextIOWrapper has no plain form" in converted.output
    with safe_open(str(out), framework="pt") as file:
        description = json.loads(file.metadata()[TREE_KEY])
    assert description["source"] == {"file": source.name, "sha256": file_sha256(source),
                                     "bytes": source.stat().st_size}
    assert description["dropped"] == [{"path": "/optimizer", "type": "_io.TextIOWrapper"}]
    loaded = read_checkpoint(out)
    assert loaded["args"] == release_args() and loaded["epoch"] == 4 and "optimizer" not in loaded
    pixels = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        ours, theirs = (create_teacher("c_radio_v3_b", out).eval()(pixels),
                        create_teacher("c_radio_v3_b", clean).eval()(pixels))
    assert torch.equal(ours.patch, theirs.patch) and torch.equal(ours.cls, theirs.cls)


def test_extract_from_a_converted_file_records_the_file_it_read(tmp_path, real_image_dir, tiny_checkpoint):
    marker, converted, out = tmp_path / "fired", tmp_path / "tiny.safetensors", tmp_path / "cache.zarr"
    trapped = save_trapped(tmp_path / "tiny.pth", marker, torch.load(tiny_checkpoint))
    assert runner.invoke(app, ["convert-checkpoint", str(trapped), str(converted), WAY_OUT]).exit_code == 0
    marker.unlink()
    result = runner.invoke(app, ["extract", "--teacher", "tiny_test_teacher", "--checkpoint", str(converted),
                                 "--images", str(real_image_dir), "--out", str(out), "--no-progress",
                                 "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    assert_not_fired(marker)
    recorded = TeacherStore.open(str(out), "tiny_test_teacher").provenance["checkpoint"]
    assert {key: recorded[key] for key in ("file", "sha256", "bytes")} == {
        "file": converted.name, "sha256": file_sha256(converted), "bytes": converted.stat().st_size}
    expected = {"file": converted.name, "sha256": file_sha256(converted), "bytes": converted.stat().st_size}
    assert recorded["files"] == [expected]


def test_convert_checkpoint_names_a_wrong_output(tmp_path, tiny_checkpoint):
    same = runner.invoke(app, ["convert-checkpoint", str(tiny_checkpoint), str(tmp_path / "x.pth"), WAY_OUT])
    assert_one_paragraph_error(same, "must end in .safetensors")
    missing = runner.invoke(app, ["convert-checkpoint", str(tmp_path / "nope.pth"), str(tmp_path / "x.safetensors"),
                                  WAY_OUT])
    assert_one_paragraph_error(missing, f"checkpoint not found: {tmp_path / 'nope.pth'}")
