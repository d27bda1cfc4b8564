"""Stopping a run on SIGINT/SIGTERM: a checkpoint at the step it stopped at, a prompt exit, an exact resume;
checkpoints on wall time (checkpoint_minutes)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dune_cache.errors import Interrupted
from dune_student.cli import app
from dune_student.runs.checkpoint import Checkpointer
from dune_student.runs.control import CheckpointSchedule
from dune_student.training.trainer import Trainer
from test_train import TINY_STUDENT, cache, config  # noqa: F401 - cache: the tiny-teacher cache fixture

STEPS = 12
LONG_RUN = [f"steps={STEPS}", "checkpoint_every=1000"]  # one checkpoint, at the end, unless stopped


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Model, heads, standardiser and optimiser moments of two checkpoints are bit for bit equal."""
    assert a["step"] == b["step"]
    for part in ("student", "heads", "standardizer"):
        torch.testing.assert_close(a[part], b[part], rtol=0, atol=0, msg=part)
    torch.testing.assert_close(a["optimizer"]["state"], b["optimizer"]["state"], rtol=0, atol=0)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache, real_image_dir) -> dict:
    """The final checkpoint of the run, trained without a stop."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    Trainer(config(cache, real_image_dir, out, *LONG_RUN)).run()
    return checkpoint(out)


@pytest.mark.parametrize("signum, workers", [(signal.SIGINT, 1), (signal.SIGTERM, 0)])  # 1: a worker to shut down
def test_a_signal_to_the_cli_checkpoints_the_step_exits_at_once_and_the_same_command_resumes(
        tmp_path, cache, real_image_dir, uninterrupted, signum, workers):
    out = tmp_path / "run"
    args = ["train", "--cache", str(cache), "--images", str(real_image_dir), "--out", str(out), "--no-progress",
            *TINY_STUDENT, *LONG_RUN, f"data.num_workers={workers}"]
    proc = subprocess.Popen([sys.executable, "-m", "dune_student.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if f"step 1/{STEPS}:" in line:  # the log line of the first step
            break
    sent = time.monotonic()
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    seconds = time.monotonic() - sent
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert seconds < 10, f"{seconds:.1f}s to exit"
    step = checkpoint(out)["step"]
    assert 1 <= step < STEPS
    assert (f"interrupted by {signal.Signals(signum).name} at step {step} of {STEPS}; checkpoint saved to "
            f"{out / 'checkpoint.pt'}; re-run the same command to resume") in stderr
    assert "Traceback" not in stderr

    resumed = CliRunner().invoke(app, args)
    assert resumed.exit_code == 0, resumed.output
    assert f"trained {STEPS - step} steps in this session ({STEPS} of {STEPS} in total)" in resumed.stdout
    assert_same_training_state(checkpoint(out), uninterrupted)

    finished = CliRunner().invoke(app, args)  # nothing left to train: the loss of the last step, not nan
    last_loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert f"trained 0 steps in this session ({STEPS} of {STEPS} in total)" in finished.stdout
    assert f"final loss {last_loss:.4f};" in finished.stdout


def test_a_signal_during_a_step_finishes_it_checkpoints_it_and_the_resumed_run_is_exact(
        tmp_path, cache, real_image_dir, uninterrupted, monkeypatch):
    real_step = Trainer.train_step
    calls = {"n": 0}

    def signalled_in_third_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "training does not handle SIGTERM"
            os.kill(os.getpid(), signal.SIGTERM)  # handled while the step runs
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", signalled_in_third_step)
    with pytest.raises(Interrupted, match=f"SIGTERM at step 3 of {STEPS}") as stopped:
        Trainer(config(cache, real_image_dir, tmp_path / "run", *LONG_RUN)).run()
    assert stopped.value.exit_code == 143
    assert checkpoint(tmp_path / "run")["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the trainer's handler is gone
    monkeypatch.setattr(Trainer, "train_step", real_step)
    result = Trainer(config(cache, real_image_dir, tmp_path / "run", *LONG_RUN)).run()
    assert (result.steps, result.session_steps) == (STEPS, STEPS - 3)
    assert_same_training_state(checkpoint(tmp_path / "run"), uninterrupted)


def test_a_second_signal_stops_at_once_but_lets_a_checkpoint_being_written_finish(
        tmp_path, cache, real_image_dir, monkeypatch):
    real_step, real_write = Trainer.train_step, Checkpointer.write
    calls = {"n": 0}

    def signalled_in_second_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "training does not handle SIGTERM"
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, batch)

    def signalled_again_while_writing(self, state):
        os.kill(os.getpid(), signal.SIGTERM)
        real_write(self, state)

    monkeypatch.setattr(Trainer, "train_step", signalled_in_second_step)
    monkeypatch.setattr(Checkpointer, "write", signalled_again_while_writing)
    with pytest.raises(Interrupted, match="SIGTERM again: stopped at once; the run directory keeps its last "
                                          "checkpoint") as stopped:
        Trainer(config(cache, real_image_dir, tmp_path / "run", *LONG_RUN)).run()
    assert stopped.value.exit_code == 143
    assert checkpoint(tmp_path / "run")["step"] == 2  # written whole
    assert not (tmp_path / "run" / "checkpoint.pt.tmp").exists()


def test_checkpoint_schedule_counts_wall_time_since_the_last_checkpoint():
    now = [0.0]
    schedule = CheckpointSchedule(every=100, minutes=2, last=1000, clock=lambda: now[0])
    now[0] = 119.0
    assert not schedule.due(7)
    now[0] = 120.0
    assert schedule.due(8)
    schedule.saved()
    now[0] = 239.0
    assert not schedule.due(9) and schedule.due(100) and schedule.due(1000)
    assert not CheckpointSchedule(every=100, minutes=0, last=1000, clock=lambda: now[0] + 1e9).due(7)


def test_checkpoint_minutes_writes_checkpoints_between_checkpoint_every(tmp_path, cache, real_image_dir, monkeypatch):
    saved = []
    real_save = Trainer.save

    def remember_step(self, **kwargs):
        saved.append(self.step)
        real_save(self, **kwargs)

    monkeypatch.setattr(Trainer, "save", remember_step)
    Trainer(config(cache, real_image_dir, tmp_path / "timed", "steps=3", "checkpoint_every=1000",
                   "checkpoint_minutes=1e-9")).run()
    assert saved == [1, 2, 3]  # the time was always up
    saved.clear()
    Trainer(config(cache, real_image_dir, tmp_path / "stepped", "steps=3", "checkpoint_every=1000")).run()
    assert saved == [3]


def test_a_checkpoint_older_than_a_field_resumes_only_with_the_fields_former_value():
    from dune_student.config import TrainConfig, config_to_dict
    from dune_student.runs.control import ADDED_FIELDS, config_changes

    ours = config_to_dict(TrainConfig())
    saved = json.loads(json.dumps(ours))
    del saved["data"]["jpeg_draft"], saved["augment"]["photometric_on"]  # written before these fields existed
    changes = config_changes(saved, ours)
    # photometric_on: the former "loader" and today's "auto" place it alike on the CPU, on CUDA they do not
    assert changes == ["data.jpeg_draft: checkpoint has 'double', this run has 'crop'"]
    assert len(config_changes(saved, ours, on_cuda=True)) == 2
    former = config_to_dict(TrainConfig())
    former["data"]["jpeg_draft"], former["augment"]["photometric_on"] = ADDED_FIELDS["data.jpeg_draft"], "loader"
    assert config_changes(saved, former) == []
