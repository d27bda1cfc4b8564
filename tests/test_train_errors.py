"""Errors named in one paragraph: a non-finite loss (step, images, the checkpoint kept), damaged cached features
(or left out with data.skip_damaged, counted), and eval/export of a file that is not a run checkpoint or whose
architecture does not fit its weights."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dune_student.training.trainer as train_module
from dune_cache.read.reader import CacheReader
from dune_student.cli import app
from dune_student.training.trainer import Trainer, train
from test_train import TINY_STUDENT, cache, config  # noqa: F401 - cache: the tiny-teacher cache fixture

TEACHER = "tiny_test_teacher"


def assert_one_paragraph_error(result, *fragments: str) -> None:
    """The command exited with status 2 through the CLI's error path (no exception escaped, so no traceback),
    its message one line holding every fragment."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    error = [line for line in result.output.splitlines() if line.strip()]
    assert len(error) == 1 and error[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in error[0], (fragment, error[0])
    assert "Traceback" not in result.output


def train_args(cache: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--cache", str(cache), "--images", str(images), "--out", str(out), "--no-progress",
            *TINY_STUDENT, "steps=6", "checkpoint_every=3", *extra]


def test_a_non_finite_loss_stops_naming_step_and_images_and_keeps_the_last_checkpoint(
        tmp_path, cache, real_image_dir, monkeypatch):
    out = tmp_path / "run"
    batches, checkpoints = [], {}
    real_losses, real_step, real_save = train_module.teacher_losses, Trainer.train_step, Trainer.save

    def nan_for_second_image_of_fifth_step(*args, **kwargs):
        losses = real_losses(*args, **kwargs)
        if len(batches) < 5:
            return losses
        poison = torch.zeros_like(losses)
        poison[1, 0] = float("nan")
        return losses + poison

    def remember_batch(self, batch):
        batches.append([self.reader.image_ids[i] for i in batch.indices])
        return real_step(self, batch)

    def remember_checkpoint(self, **kwargs):
        real_save(self, **kwargs)
        checkpoints[self.step] = (out / "checkpoint.pt").read_bytes()

    monkeypatch.setattr(train_module, "teacher_losses", nan_for_second_image_of_fifth_step)
    monkeypatch.setattr(Trainer, "train_step", remember_batch)
    monkeypatch.setattr(Trainer, "save", remember_checkpoint)
    result = CliRunner().invoke(app, train_args(cache, real_image_dir, out))
    fifth = batches[4]
    assert_one_paragraph_error(
        result, "step 5: the loss is nan; training stopped before applying the step.",
        f"Images with a non-finite loss: {fifth[1]} ({TEACHER}).", f"Images of the batch: {', '.join(fifth)}.",
        f"The last good checkpoint, {out / 'checkpoint.pt'} (step 3), is kept", f"`dune-cache verify {cache}`")
    assert list(checkpoints) == [3] and (out / "checkpoint.pt").read_bytes() == checkpoints[3]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


@pytest.fixture
def damaged_cache(tmp_path, cache) -> tuple[Path, int]:
    """A copy of the cache whose patch chunk of one image is lost (it reads as NaN); the image's sample index."""
    copy = tmp_path / "damaged.zarr"
    shutil.copytree(cache, copy)
    sample = 2
    row = int(CacheReader(str(copy)).rows[sample, 0])
    shutil.rmtree(copy / TEACHER / "patch" / "c" / str(row))
    return copy, sample


def test_damaged_features_are_one_paragraph_even_from_a_dataloader_worker(tmp_path, damaged_cache, real_image_dir):
    cache, sample = damaged_cache
    image = CacheReader(str(cache)).image_ids[sample]
    result = CliRunner().invoke(app, train_args(cache, real_image_dir, tmp_path / "run", "data.num_workers=1"))
    assert_one_paragraph_error(result, f"teacher {TEACHER}: patch of 1 image(s)", image, f"dune-cache repair {cache}",
                               "data.skip_damaged=true")
    assert "worker" not in result.output


def test_skip_damaged_leaves_the_targets_out_and_counts_them(tmp_path, damaged_cache, real_image_dir, monkeypatch):
    cache, sample = damaged_cache
    samples = []
    real_step = Trainer.train_step

    def remember_samples(self, batch):
        samples.extend(batch.indices.tolist())
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", remember_samples)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, train_args(cache, real_image_dir, out, "data.skip_damaged=true"))
    assert result.exit_code == 0, result.output
    dropped = samples.count(sample)  # one teacher: one target each time the image is drawn
    assert dropped > 0
    assert f"{dropped} damaged targets left out (data.skip_damaged)" in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["damaged_targets"] == dropped
    assert all(r["damaged_targets"] == samples[:r["step"] * 4].count(sample) for r in records)  # running total


def test_eval_and_export_name_a_file_that_is_no_run_checkpoint_or_does_not_fit_its_architecture(
        tmp_path, cache, real_image_dir):
    train(config(cache, real_image_dir, tmp_path / "run", "steps=1"))
    not_a_run = tmp_path / "weights.pt"
    torch.save({"proj.weight": torch.randn(4, 4)}, not_a_run)
    not_a_pickle = tmp_path / "notes.pt"
    not_a_pickle.write_text("not a checkpoint\n")
    resized = tmp_path / "resized.pt"
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    ckpt["config"]["student"]["arch"] = "vit_small"  # its weights are vit_tiny's
    torch.save(ckpt, resized)
    cases = [
        (not_a_run, [f"{not_a_run} is not a training checkpoint", "it holds a dict with keys proj.weight, without "
                     "config, step"]),
        (not_a_pickle, [f"{not_a_pickle} is not a training checkpoint: torch.load cannot read it"]),
        (resized, [f"checkpoint {resized} (student) does not match Student", "shape mismatches",
                   "blocks.0.attn.qkv.weight: checkpoint (576, 192) vs model (1152, 384)", "'arch': 'vit_small'"]),
    ]
    runner = CliRunner()
    for path, fragments in cases:
        evaluated = runner.invoke(app, ["eval", "--checkpoint", str(path), "--cache", str(cache), "--images",
                                        str(real_image_dir)])
        assert_one_paragraph_error(evaluated, *fragments)
        exported = runner.invoke(app, ["export", "--checkpoint", str(path), "--out", str(tmp_path / "e.safetensors")])
        assert_one_paragraph_error(exported, *fragments)


def test_a_full_disk_while_checkpointing_is_one_paragraph_and_keeps_the_last_checkpoint(
        tmp_path, cache, real_image_dir, monkeypatch):
    import errno

    import dune_student.runs.checkpoint as run_checkpoint

    out = tmp_path / "run"
    real_save, saves = run_checkpoint.torch.save, []

    def disk_fills_at_second_checkpoint(state, file):
        saves.append(state["step"])
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "checkpoint.pt.tmp"))
        return real_save(state, file)

    monkeypatch.setattr(run_checkpoint.torch, "save", disk_fills_at_second_checkpoint)
    result = CliRunner().invoke(app, train_args(cache, real_image_dir, out))
    assert_one_paragraph_error(result, f"no space left on the device writing {out / 'checkpoint.pt.tmp'}.",
                               "The last complete checkpoint is kept.", "re-run the same command to resume")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(run_checkpoint.torch, "save", real_save)
    resumed = CliRunner().invoke(app, train_args(cache, real_image_dir, out))
    assert resumed.exit_code == 0 and "trained 3 steps in this session (6 of 6 in total)" in resumed.output, \
        resumed.output
