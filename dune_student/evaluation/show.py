"""``dune-student show``: the student's projected patch features beside each teacher's, as PCA-RGB maps.

For a few images of a cache made by the run's teachers (same checkpoints; by default the run's training
cache, a held-out cache tells more), one PNG row per image plus ``grid.png``: the student's input (the
image squashed to the run's resolution, exactly what ``dune-student eval`` feeds it), then for every
teacher its cached patch tokens and the student's projection for that teacher.

Both are drawn in the space the loss and ``dune-student eval`` compare them in: the teacher's tokens
**standardised** by the run's standardiser (``loss.standardize``; ``none`` leaves them raw), the
projector's outputs as they come (they predict standardised targets). Every token is then L2-normalised,
so the maps show directions, which is what the cosine fidelity measures, not magnitudes (an undertrained
student predicts short vectors near the mean). The PCA of a teacher is fitted jointly over that teacher's
and the student's tokens of all shown images, so equal colours mean similar features; each student label
carries the image's mean patch cosine (eval's patch fidelity).
Maps are drawn as in ``dune-cache show`` (:mod:`dune_cache.commands.show`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dune_cache import (
    CacheReader,
    ImageDecodeError,
    Panel,
    ShowError,
    ShowResult,
    feature_columns,
    load_pixels,
    pick_device,
    sample_paths,
    select_samples,
    unreachable,
    write_pictures,
)

from ..runs.layout import CHECKPOINT
from ..runs.loading import LoadedRun, check_same_teachers, load_run, project


def checkpoint_path(run: str | Path) -> Path:
    """``RUN/checkpoint.pt`` for a run directory, the file itself for a checkpoint file."""
    path = Path(run)
    path = path / CHECKPOINT if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no run directory with a {CHECKPOINT} and no checkpoint file")
    return path


def student_pixels(path: Path | None, image_id: str, resolution: int) -> torch.Tensor:
    """uint8 ``(3, S, S)``: the image squashed to the student's resolution (evaluation's preprocessing); ``path``
    ``None``: the image is not reachable (an id that would leave the image folder is never read)."""
    if path is None:
        raise ShowError(f"the student needs the input image: {unreachable(image_id)}")
    try:
        return torch.from_numpy(load_pixels(path, (resolution, resolution), "squash"))
    except ImageDecodeError as exc:
        raise ShowError(f"the student needs the input image: {exc}; pass --image-root to point at the images") from exc


@torch.inference_mode()
def teacher_and_student(run: LoadedRun, reader: CacheReader, indices: Sequence[int], pixels: torch.Tensor
                        ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """teacher -> (standardised cached patches ``(B, h, w, D)``, projected student patches ``(B, h, w, D)``,
    has-features mask ``(B,)``), float32 on the CPU, for samples ``indices`` whose pixels are ``(B, 3, S, S)``."""
    dev = next(run.student.parameters()).device
    preds = project(run, pixels.to(dev), reader.grids)
    targets = reader.read(np.asarray(indices))
    result = {}
    for k, t in enumerate(run.teachers):
        _, patch = run.standardizer.standardize(t, targets.cls[t].to(dev), targets.patch[t].to(dev))
        result[t] = (patch.float().cpu(), preds[t][1].float().cpu(), targets.mask[:, k])
    return result


def comparison_panels(teacher: str, cached: torch.Tensor, student: torch.Tensor, have: torch.Tensor
                      ) -> list[list[Panel]]:
    """Two columns of panels (teacher, student) for one teacher: patches ``(B, h, w, D)`` L2-normalised,
    coloured by one joint PCA, only rows that ``have`` ``(B,)`` the teacher's features."""
    cosine = F.cosine_similarity(student, cached, dim=-1).flatten(1).mean(dim=1)
    cached, student = F.normalize(cached, dim=-1), F.normalize(student, dim=-1)
    rows = [r for r in range(len(have)) if have[r]]
    columns = [{r: cached[r].numpy() for r in rows}, {r: student[r].numpy() for r in rows}]
    labels = [[teacher] * len(have), [f"student, cos {float(c):.2f}" for c in cosine]]
    return feature_columns(columns, labels, len(have))


def show_run(run: str | Path, out: str | Path, cache: str | None = None, images: Sequence[str] | None = None,
             first: int | None = None, image_root: str | Path | None = None, cell: int = 224,
             device: str = "auto") -> ShowResult:
    """Write the comparison pictures of a run (directory or checkpoint) for ``images`` (ids) or the ``first``
    images of ``cache`` (default: the run's ``data.cache``) to ``out``.

    Row layout: ``[student input, teacher 1, student for teacher 1, ..., teacher T, student for teacher T]``,
    each panel ``cell x cell`` under a label.
    """
    loaded = load_run(checkpoint_path(run), pick_device(device))
    reader = CacheReader(cache or loaded.cfg.data.cache, loaded.teachers, allow_partial=True)
    check_same_teachers(loaded, reader)
    indices = select_samples(reader, images, first)
    ids = [reader.image_ids[i] for i in indices]
    pixels = torch.stack([student_pixels(path, image_id, loaded.resolution)
                          for path, image_id in zip(sample_paths(reader, indices, image_root), ids)])
    columns = []
    for teacher, (cached, student, have) in teacher_and_student(loaded, reader, indices, pixels).items():
        columns += comparison_panels(teacher, cached, student, have)
    rows = [[Panel(pixels[r].permute(1, 2, 0).numpy(), image_id, nearest=False), *(c[r] for c in columns)]
            for r, image_id in enumerate(ids)]
    return write_pictures(rows, ids, out, (cell, cell), [])
