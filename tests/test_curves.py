"""Training curves: curves.png from metrics.jsonl, held-out fidelity during training, never fatal."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import dune_student.evaluation.curves as curves
from dune_student.cli import app
from dune_student.errors import ConfigError
from dune_student.config import load_config
from dune_student.evaluation.curves import DPI, PANEL_INCHES, plot_curves, read_metrics, write_curves_safely
from dune_student.training.trainer import Trainer, train

from test_train import cache, config  # noqa: F401  (the tiny-teacher cache fixture and run config)

PANEL = (int(PANEL_INCHES[0] * DPI), int(PANEL_INCHES[1] * DPI))


def check_png(path: Path, panels: int) -> None:
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (PANEL[1], panels * PANEL[0], 3)
    assert image.std() > 0
    for k in range(panels):  # every panel has something drawn on it
        assert image[:, k * PANEL[0]:(k + 1) * PANEL[0]].std() > 0


def test_training_writes_curves_with_held_out_fidelity(tmp_path, cache, real_image_dir):  # noqa: F811
    run = tmp_path / "run"
    train(config(cache, real_image_dir, run, "data.holdout=2", "eval_every=2", "checkpoint_every=4"))
    train_records, held_out = read_metrics(run)
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in held_out] == [2, 4, 6]
    assert all(-1 <= r[f"fidelity/tiny_test_teacher/{kind}"] <= 1 for r in held_out for kind in ("patch", "cls"))
    check_png(run / "curves.png", panels=3)

    (run / "curves.png").unlink()
    result = CliRunner().invoke(app, ["curves", str(run)])
    assert result.exit_code == 0, result.output
    check_png(run / "curves.png", panels=3)


def test_held_out_evaluation_draws_no_random_numbers(tmp_path, cache, real_image_dir):  # noqa: F811
    trainer = Trainer(config(cache, real_image_dir, tmp_path / "run", "data.holdout=2", "eval_every=2"))
    before = torch.get_rng_state()
    record = trainer.held_out_fidelity()
    assert torch.equal(before, torch.get_rng_state()) and trainer.model.training
    assert set(record) == {"step", "fidelity/tiny_test_teacher/patch", "fidelity/tiny_test_teacher/cls"}


def test_held_out_evaluation_needs_held_out_images(tmp_path):
    with pytest.raises(ConfigError, match="eval_every.*data.holdout"):
        load_config(None, ["data.cache=c", "data.images=i", "eval_every=5"])


def test_last_record_of_a_step_wins_and_two_panels_without_fidelity(tmp_path):
    lines = [{"step": 1, "lr": 1e-3, "loss": 0.9, "loss/a": 0.8}, {"step": 2, "lr": 2e-3, "loss": 5.0, "loss/a": 5.0},
             {"step": 2, "lr": 2e-3, "loss": 0.7, "loss/a": 0.6},  # the same step again after a resume
             {"step": 3, "lr": 1e-3, "loss": 0.5, "loss/a": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in lines))
    records, held_out = read_metrics(tmp_path)
    assert [r["loss"] for r in records] == [0.9, 0.7, 0.5] and held_out == []
    check_png(plot_curves(tmp_path), panels=2)


def test_plotting_failures_never_stop_training(tmp_path, cache, real_image_dir, monkeypatch, caplog):  # noqa: F811
    (tmp_path / "metrics.jsonl").write_text("{not json\n")
    with caplog.at_level(logging.WARNING):
        assert write_curves_safely(tmp_path) is None
    assert "not a JSON line" in caplog.text

    def broken(run_dir):
        raise RuntimeError("no plotting today")

    monkeypatch.setattr(curves, "plot_curves", broken)
    result = train(config(cache, real_image_dir, tmp_path / "run"))
    assert result.steps == 6 and (tmp_path / "run" / "checkpoint.pt").exists()
    assert not (tmp_path / "run" / "curves.png").exists() and "no plotting today" in caplog.text


def test_curves_command_without_a_run(tmp_path):
    result = CliRunner().invoke(app, ["curves", str(tmp_path)])
    assert result.exit_code == 2 and "no metrics.jsonl" in result.output
