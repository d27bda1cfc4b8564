"""``dune-student eval --baselines``: a random-init student and the mean training target scored in the run's
standardised space beside the student, per image."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from dune_cache import CacheReader
from dune_cache.commands.stats import compute_stats
from dune_cache.config import ExtractConfig
from dune_cache.extract.run import run_extraction
from dune_cache.format.stats import write_stats
from dune_student.cli import app
from dune_student.config import load_config
from dune_student.evaluation.fidelity import mean_targets
from dune_student.runs.loading import load_run
from dune_student.training.trainer import train

TINY_RUN = ["student.arch=vit_tiny", "student.patch_size=8", "student.img_size=32", "student.num_registers=1",
            "data.resolution=32", "data.batch_size=4", "data.num_workers=0", "data.shuffle_block=2",
            "data.shuffle_buffer=4", "progress=false", "steps=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, real_image_dir, tiny_checkpoint) -> tuple[Path, Path]:
    """(checkpoint, cache) of a two-step run on a tiny-teacher cache of six real photos."""
    root = tmp_path_factory.mktemp("baselines")
    cache = root / "cache.zarr"
    run_extraction(ExtractConfig(teacher="tiny_test_teacher", images=real_image_dir, out=str(cache),
                                 checkpoint=tiny_checkpoint, student_patch=8, student_resolution="32", batch_size=6,
                                 num_workers=0, progress=False))
    write_stats(str(cache), "tiny_test_teacher", compute_stats(str(cache), "tiny_test_teacher"))
    train(load_config(None, [f"data.cache={cache}", f"data.images={real_image_dir}", f"out={root / 'run'}",
                             *TINY_RUN]))
    return root / "run" / "checkpoint.pt", cache


def test_baselines_are_scored_per_image_in_the_standardised_space(run, real_image_dir):
    checkpoint, cache = run
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(checkpoint), "--cache", str(cache), "--images",
                                      str(real_image_dir), "--json", "--baselines"])
    assert result.exit_code == 0, result.output
    teacher = json.loads(result.output)["tiny_test_teacher"]
    baselines = teacher["baselines"]
    assert list(baselines) == ["random-init student (seed 0)", "mean training target"]
    for row in (teacher, *baselines.values()):
        assert row["images"] == 6 and len(row["patch_per_image"]) == len(row["cls_per_image"]) == 6
        assert np.isclose(np.mean(row["patch_per_image"]), row["patch"])
    # channel standardisation: the mean CLS target is the origin, which has no direction: cosine exactly 0
    assert baselines["mean training target"]["cls_per_image"] == [0.0] * 6
    # the mean patch target at each position, scored by hand on the (training) images themselves
    loaded = load_run(checkpoint, torch.device("cpu"))
    reader = CacheReader(str(cache), loaded.teachers)
    _, mean_patch = mean_targets(loaded, reader)["tiny_test_teacher"]
    batch = reader.read(np.arange(6))
    _, patch = loaded.standardizer.standardize("tiny_test_teacher", batch.cls["tiny_test_teacher"],
                                               batch.patch["tiny_test_teacher"])
    by_hand = F.cosine_similarity(mean_patch.expand_as(patch), patch, dim=-1).flatten(1).mean(1)
    np.testing.assert_allclose(baselines["mean training target"]["patch_per_image"], by_hand.numpy(), atol=1e-5)
    assert by_hand.mean() > 0  # the positional mean is a real baseline: positive on the images it averages
