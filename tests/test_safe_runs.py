"""Student runs load without running code and malformed ones are one line (docs/security.md): a booby-trapped
checkpoint handed to every command that reads a run (train's resume, eval, export, show, route, probe) and to the
live-teacher baseline is refused, naming the way out; a resume from a trapped or malformed checkpoint changes no byte
of the run folder; runs written before the format marker still load."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dune_cache.format.constants import ATTR_KEY
from dune_cache.format.store import TeacherStore
from dune_cache.utils.hashing import file_sha256
from dune_student.cli import app
from dune_student.config import load_config
from dune_student.runs.checkpoint import RUN_FORMAT, RUN_FORMAT_VERSION
from dune_student.training.trainer import train
from test_probe import write_noise_probe_data
from test_train import TINY_STUDENT, cache, config  # noqa: F401 - cache: the tiny-teacher cache fixture
from test_train_errors import assert_one_paragraph_error, train_args
from traps import assert_not_fired, save_trapped

runner = CliRunner()
CONVERT_RUN = "dune-student convert-run"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache, real_image_dir) -> Path:
    """A finished 6-step run (the run train_args resumes)."""
    out = tmp_path_factory.mktemp("run") / "run"
    train(config(cache, real_image_dir, out))
    return out


def saved(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def test_a_run_checkpoint_is_plain_and_marked(run_dir):
    ckpt = saved(run_dir)  # weights_only=True: tensors and plain values only
    assert (ckpt["format"], ckpt["format_version"]) == (RUN_FORMAT, RUN_FORMAT_VERSION)


def command_args(command: str, checkpoint: Path, tmp_path: Path, cache: Path, images: Path) -> list[str]:
    """The command line of each command that reads a run checkpoint."""
    return {
        "eval": ["eval", "--checkpoint", str(checkpoint), "--cache", str(cache), "--images", str(images)],
        "export": ["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out" / "e.safetensors")],
        "show": ["show", str(checkpoint.parent), "--out", str(tmp_path / "out")],
        "route": ["route", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "probe"), "--out",
                  str(tmp_path / "out")],
        "probe": ["probe", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "probe"), "--out",
                  str(tmp_path / "out" / "probe.json")],
    }[command]


@pytest.mark.parametrize("command", ["eval", "export", "show", "route", "probe"])
def test_every_command_that_reads_a_run_refuses_a_trapped_checkpoint(tmp_path, run_dir, cache, real_image_dir,
                                                                      command):
    marker = tmp_path / "fired"
    trapped = save_trapped(tmp_path / "shared" / "checkpoint.pt", marker, saved(run_dir))
    write_noise_probe_data(tmp_path / "probe", per_class=4, splits=("train", "train", "test"))
    result = runner.invoke(app, command_args(command, trapped, tmp_path, cache, real_image_dir))
    assert_one_paragraph_error(result, f"{trapped} holds objects of type io.open", "it was not loaded",
                               f"{CONVERT_RUN} {trapped}", "--trust-this-file")
    assert_not_fired(marker)
    assert not (tmp_path / "out").exists()


def test_resume_from_a_trapped_checkpoint_is_refused_and_changes_nothing(tmp_path, run_dir, cache, real_image_dir,
                                                                        snapshot):
    out, marker = tmp_path / "run", tmp_path / "fired"
    shutil.copytree(run_dir, out)
    save_trapped(out / "checkpoint.pt", marker, saved(run_dir))
    before = snapshot(out)
    result = runner.invoke(app, train_args(cache, real_image_dir, out))
    assert_one_paragraph_error(result, f"{out / 'checkpoint.pt'} holds objects of type io.open", CONVERT_RUN)
    assert_not_fired(marker)
    assert snapshot(out) == before


def test_the_live_teacher_baseline_refuses_a_trapped_teacher_checkpoint(tmp_path, cache, real_image_dir,
                                                                        tiny_checkpoint):
    """The cache's provenance names the trapped file's sha256 (a cache and checkpoint from someone's bucket)."""
    marker, shared = tmp_path / "fired", tmp_path / "shared.zarr"
    shutil.copytree(cache, shared)
    trapped = save_trapped(tmp_path / "their.pth", marker, torch.load(tiny_checkpoint))
    store = TeacherStore.open(str(shared), "tiny_test_teacher", mode="a")
    store.group.attrs[ATTR_KEY] = {**store.provenance, "checkpoint": {
        "file": trapped.name, "sha256": file_sha256(trapped), "bytes": trapped.stat().st_size}}
    result = runner.invoke(app, train_args(shared, real_image_dir, tmp_path / "run", "live_teachers=true",
                                           f"teacher_checkpoints=tiny_test_teacher:{trapped}"))
    assert_one_paragraph_error(result, f"checkpoint {trapped} holds objects of type io.open",
                               "dune-cache convert-checkpoint", "--trust-this-file")
    assert_not_fired(marker)
    assert not (tmp_path / "run").exists()


def edited(ckpt: dict, change: str) -> dict:
    """``ckpt`` damaged as ``change`` says."""
    ckpt = dict(ckpt)
    if change == "missing":
        del ckpt["step"], ckpt["optimizer"]
    elif change == "newer":
        ckpt["format_version"] = RUN_FORMAT_VERSION + 1
    elif change == "other format":
        ckpt["format"] = "someone-elses-run"
    elif change == "wrong kind":
        ckpt["torch_rng"] = ckpt["torch_rng"].tolist()
    elif change == "rng":
        ckpt["torch_rng"] = ckpt["torch_rng"][:10]
    return ckpt


MALFORMED = {  # change -> what the one line says
    "missing": "this run checkpoint lacks step, optimizer",
    "newer": f"was written by a newer dune-student (run format version {RUN_FORMAT_VERSION + 1}",
    "other format": "is not a training checkpoint: its format is 'someone-elses-run'",
    "wrong kind": "holds fields of the wrong kind (torch_rng is a list, not a Tensor)",
    "rng": "torch_rng is a torch.uint8 tensor of shape (10,), not uint8",
    "truncated": "is not a training checkpoint: torch.load cannot read it",
    "teacher weights": "is not a training checkpoint (RUN/checkpoint.pt of `dune-student train`): it holds a dict with "
                       "keys proj.weight, without config, step",
}


def write_malformed(path: Path, good: dict, change: str) -> None:
    if change == "truncated":
        torch.save(good, path)
        path.write_bytes(path.read_bytes()[:5000])
    elif change == "teacher weights":
        torch.save({"proj.weight": torch.zeros(4, 4)}, path)
    else:
        torch.save(edited(good, change), path)


@pytest.mark.parametrize("change", list(MALFORMED))
def test_resume_from_a_malformed_checkpoint_is_one_line_and_changes_nothing(tmp_path, run_dir, cache,
                                                                           real_image_dir, snapshot, change):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    write_malformed(out / "checkpoint.pt", saved(run_dir), change)
    before = snapshot(out)
    result = runner.invoke(app, train_args(cache, real_image_dir, out))
    assert_one_paragraph_error(result, str(out / "checkpoint.pt"), MALFORMED[change])
    assert snapshot(out) == before


@pytest.mark.parametrize("change", ["missing", "newer", "other format", "truncated"])
def test_eval_of_a_malformed_checkpoint_is_one_line(tmp_path, run_dir, cache, real_image_dir, change):
    path = tmp_path / "checkpoint.pt"
    write_malformed(path, saved(run_dir), change)
    result = runner.invoke(app, command_args("eval", path, tmp_path, cache, real_image_dir))
    expected = MALFORMED[change].replace("lacks step, optimizer", "lacks step")  # eval needs no optimizer
    assert_one_paragraph_error(result, str(path), expected)


def test_a_run_written_before_the_format_marker_still_loads_and_resumes(tmp_path, run_dir, cache, real_image_dir):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    old = {k: v for k, v in saved(run_dir).items() if k not in ("format", "format_version")}
    old["config"] = {**old["config"], "out": str(out)}  # the run's own folder (a resume compares it)
    torch.save(old, out / "checkpoint.pt")
    evaluated = runner.invoke(app, command_args("eval", out / "checkpoint.pt", tmp_path, cache, real_image_dir)
                              + ["--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["tiny_test_teacher"]["images"] == 6
    more = train(load_config(None, [f"data.cache={cache}", f"data.images={real_image_dir}", f"out={out}",
                                    "steps=6", "checkpoint_every=3", *TINY_STUDENT]))
    assert (more.steps, more.session_steps) == (6, 0)


def test_convert_run_needs_the_flag_and_keeps_the_plain_contents(tmp_path, run_dir, cache, real_image_dir):
    marker, trapped = tmp_path / "fired", tmp_path / "theirs.pt"
    save_trapped(trapped, marker, saved(run_dir))
    refused = runner.invoke(app, ["convert-run", str(trapped), str(tmp_path / "mine.pt")])
    assert_one_paragraph_error(refused, "--trust-this-file")
    assert_not_fired(marker)
    converted = runner.invoke(app, ["convert-run", str(trapped), str(tmp_path / "mine.pt"), "--trust-this-file"])
    assert converted.exit_code == 0, converted.output
    assert "dropped /trap: _io.TextIOWrapper has no plain form" in converted.output
    marker.unlink()  # it fired once, in the command the user vouched for the file with
    evaluated = runner.invoke(app, command_args("eval", tmp_path / "mine.pt", tmp_path, cache, real_image_dir))
    assert evaluated.exit_code == 0, evaluated.output
    assert_not_fired(marker)
