"""Training from a cache: config errors, exact resume, live-teacher baseline, eval, export."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dune_cache.config import ExtractConfig
from dune_cache.extract.run import run_extraction
from dune_cache.commands.stats import compute_stats
from dune_cache.format.stats import write_stats
from dune_student.cli import app
from dune_student.errors import ConfigError
from dune_student.config import load_config
from dune_student.errors import DataError
from dune_student.training.trainer import Trainer, train

from conftest import free_port

TINY_STUDENT = ["student.arch=vit_tiny", "student.patch_size=8", "student.img_size=32", "student.num_registers=1",
                "data.resolution=32", "data.batch_size=4", "data.num_workers=0", "data.shuffle_block=2",
                "data.shuffle_buffer=4", "log_every=1", "progress=false", "optim.base_lr=0.05"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, real_image_dir, tiny_checkpoint) -> Path:
    """Tiny-teacher cache of six real photos on the student's 4x4 grid, with statistics."""
    out = tmp_path_factory.mktemp("cache") / "cache.zarr"
    run_extraction(ExtractConfig(teacher="tiny_test_teacher", images=real_image_dir, out=str(out),
                                 checkpoint=tiny_checkpoint, student_patch=8, student_resolution="32",
                                 batch_size=6, num_workers=0, progress=False))
    write_stats(str(out), "tiny_test_teacher", compute_stats(str(out), "tiny_test_teacher"))
    return out


def config(cache: Path, images: Path, out: Path, *extra: str):
    return load_config(None, [f"data.cache={cache}", f"data.images={images}", f"out={out}", "steps=6",
                              "checkpoint_every=3", *TINY_STUDENT, *extra])


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="unknown config field 'optim.lrr'"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="data.batch_size: expected int"):
        load_config(None, ["data.batch_size=many"])
    with pytest.raises(ConfigError, match="loss.sharing: 'mine' is not one of"):
        load_config(None, ["loss.sharing=mine"])
    with pytest.raises(ConfigError, match="data.cache: required"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="data.chunk_cache_limit_gb: must be 0 .* with data.chunk_cache set"):
        load_config(None, ["data.cache=c", "data.images=i", "data.chunk_cache_limit_gb=50"])
    toml = tmp_path / "run.toml"
    toml.write_text('steps = 7\n[data]\ncache = "c"\nimages = "i"\n[optim]\nbetas = [0.8, 0.9]\n')
    cfg = load_config(toml, ["optim.base_lr=1e-4"])
    assert (cfg.steps, cfg.data.cache, cfg.optim.betas, cfg.optim.base_lr) == (7, "c", (0.8, 0.9), 1e-4)
    assert cfg.optim.weight_decay == 0.03 and cfg.loss.drop_p == 0.5  # DUNE defaults kept


def test_training_writes_metrics_and_checkpoint(tmp_path, cache, real_image_dir):
    result = train(config(cache, real_image_dir, tmp_path / "run"))
    assert result.steps == 6 and np.isfinite(result.final_loss)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in lines] == [1, 2, 3, 4, 5, 6]
    assert all("loss/tiny_test_teacher" in record and record["lr"] > 0 for record in lines)
    assert (tmp_path / "run" / "checkpoint.pt").exists()


class Stop(Exception):
    pass


def test_resume_continues_bit_for_bit(tmp_path, cache, real_image_dir, monkeypatch):
    straight = Trainer(config(cache, real_image_dir, tmp_path / "straight", "student.drop_path=0.1"))
    straight.run()

    real_step = Trainer.train_step
    calls = {"n": 0}

    def crash_after_four(self, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Stop
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", crash_after_four)
    with pytest.raises(Stop):
        Trainer(config(cache, real_image_dir, tmp_path / "resumed", "student.drop_path=0.1")).run()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = Trainer(config(cache, real_image_dir, tmp_path / "resumed", "student.drop_path=0.1"))
    resumed.run()  # continues from the step-3 checkpoint
    assert resumed.step == 6
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["optimizer"]["state"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)


def test_resume_refuses_another_config(tmp_path, cache, real_image_dir):
    train(config(cache, real_image_dir, tmp_path / "run"))
    with pytest.raises(ValueError, match="optim.*base_lr|optim"):
        train(config(cache, real_image_dir, tmp_path / "run", "optim.base_lr=0.1"))


def test_cache_that_does_not_fit_is_refused(tmp_path, cache, real_image_dir):
    with pytest.raises(DataError, match="student patch 8.*student.patch_size is 16"):
        train(config(cache, real_image_dir, tmp_path / "run", "student.patch_size=16"))
    with pytest.raises(Exception, match="nope"):
        train(config(cache, real_image_dir, tmp_path / "run2", "data.teachers=nope"))
    no_stats = tmp_path / "no_stats.zarr"
    run_extraction(ExtractConfig(teacher="tiny_test_teacher", images=real_image_dir, out=str(no_stats),
                                 random_weights=True, student_patch=8, student_resolution="32", num_workers=0,
                                 progress=False))
    with pytest.raises(DataError, match="dune-cache stats"):
        train(config(no_stats, real_image_dir, tmp_path / "run3"))


def test_live_teachers_baseline_trains_and_checks_the_checkpoint(tmp_path, cache, real_image_dir, tiny_checkpoint):
    result = train(config(cache, real_image_dir, tmp_path / "live", "live_teachers=true",
                          f"teacher_checkpoints=tiny_test_teacher:{tiny_checkpoint}"))
    assert result.steps == 6 and np.isfinite(result.final_loss)
    other = tmp_path / "other.pth"
    state = torch.load(tiny_checkpoint)
    state["scale"] = state["scale"] + 1
    torch.save(state, other)
    with pytest.raises(DataError, match="not the checkpoint the cache was made with"):
        train(config(cache, real_image_dir, tmp_path / "live2", "live_teachers=true",
                     f"teacher_checkpoints=tiny_test_teacher:{other}"))


def test_eval_and_export_through_the_cli(tmp_path, cache, real_image_dir):
    train(config(cache, real_image_dir, tmp_path / "run"))
    runner = CliRunner()
    ckpt = tmp_path / "run" / "checkpoint.pt"
    result = runner.invoke(app, ["eval", "--checkpoint", str(ckpt), "--cache", str(cache), "--images",
                                 str(real_image_dir), "--json"])
    assert result.exit_code == 0, result.output
    fidelity = json.loads(result.output)["tiny_test_teacher"]
    assert fidelity["images"] == 6 and -1 <= fidelity["patch"] <= 1 and -1 <= fidelity["cls"] <= 1
    exported = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "enc.safetensors")])
    assert exported.exit_code == 0, exported.output
    from dune_student.runs.loading import load_run
    from dune_student.model.export import load_exported

    run = load_run(ckpt, torch.device("cpu"))
    model = load_exported(tmp_path / "enc.safetensors")
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        tokens = model.forward_features(x)
        out = run.student(x)
    torch.testing.assert_close(tokens[:, 0], out.cls)


def test_data_workers_do_not_change_the_result(tmp_path, cache, real_image_dir):
    """Batches come from forkserver workers or the main process alike: same seed, same model."""
    runs = [Trainer(config(cache, real_image_dir, tmp_path / f"w{w}", "steps=2", f"data.num_workers={w}"))
            for w in (0, 1)]
    for run in runs:
        run.run()
    for (name, a), (_, b) in zip(runs[0].model.state_dict().items(), runs[1].model.state_dict().items()):
        assert torch.equal(a, b), name


def test_live_teachers_on_a_random_weights_cache_warn_that_it_is_a_speed_run(tmp_path, real_image_dir, caplog):
    cache = tmp_path / "random.zarr"
    run_extraction(ExtractConfig(teacher="tiny_test_teacher", images=real_image_dir, out=str(cache),
                                 random_weights=True, student_patch=8, student_resolution="32", num_workers=0,
                                 progress=False))
    with caplog.at_level("WARNING"):
        result = train(config(cache, real_image_dir, tmp_path / "run", "live_teachers=true",
                              "loss.standardize=ema"))
    assert result.steps == 6 and np.isfinite(result.final_loss)
    assert "extracted with random weights (speed tests only)" in caplog.text


def test_ddp_under_torchrun_on_cpu(tmp_path, cache, real_image_dir):
    """Two processes (gloo) split each global batch; rank 0 writes the metrics and the checkpoint."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    args = [f"data.cache={cache}", f"data.images={real_image_dir}", f"out={out}", "steps=3", "checkpoint_every=3",
            *TINY_STUDENT, "data.num_workers=0"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), "-m", "dune_student.cli", "train", *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
