"""``dune-student eval``: per-teacher cosine fidelity of the projected student features on held-out images.

Fidelity = mean cosine similarity between the student's projected tokens and the teacher's cached
tokens, both in the run's standardised target space (what the loss optimises), for CLS and for
patch tokens (averaged over tokens, then images). Held-out images come from a cache extracted with
the same teachers and checkpoints (refused otherwise) over images the run did not train on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dune_cache import CacheReader, load_pixels

from ..data.batches import image_paths
from ..loss.distill import use_cls_from_provenance
from ..runs.loading import LoadedRun, check_same_teachers, load_run, project


@torch.inference_mode()
def fidelity(run: LoadedRun, reader: CacheReader, paths: list[Path], indices: np.ndarray,
             batch_size: int = 16) -> dict[str, dict[str, float]]:
    """``{teacher: {"cls": mean cosine, "patch": mean cosine, "images": n}}`` over samples ``indices`` of
    ``reader`` (``paths[i]``: image of sample ``i``), the modules as they are (call ``.eval()`` first).
    ``cls`` is None for teachers whose CLS was not distilled (e.g. a mean-of-patches CLS)."""
    dev = next(run.student.parameters()).device
    sums = {t: {"cls": 0.0, "patch": 0.0, "images": 0} for t in run.teachers}
    size = (run.resolution, run.resolution)
    for lo in range(0, len(indices), batch_size):
        batch = np.asarray(indices[lo:lo + batch_size])
        pixels = torch.stack([torch.from_numpy(load_pixels(paths[i], size, "squash")) for i in batch]).to(dev)
        targets = reader.read(batch)
        preds = project(run, pixels, reader.grids)
        for k, t in enumerate(run.teachers):
            have = targets.mask[:, k].to(dev)
            cls_t, patch_t = run.standardizer.standardize(t, targets.cls[t].to(dev), targets.patch[t].to(dev))
            cls_cos = F.cosine_similarity(preds[t][0].float(), cls_t, dim=-1)
            patch_cos = F.cosine_similarity(preds[t][1].float(), patch_t, dim=-1).flatten(1).mean(dim=1)
            sums[t]["cls"] += float(cls_cos[have].sum())
            sums[t]["patch"] += float(patch_cos[have].sum())
            sums[t]["images"] += int(have.sum())
    distilled_cls = use_cls_from_provenance(run.provenance)
    return {t: {"cls": s["cls"] / max(s["images"], 1) if distilled_cls[t] else None,
                "patch": s["patch"] / max(s["images"], 1), "images": s["images"]} for t, s in sums.items()}


def evaluate(checkpoint: str | Path, cache: str, images: str, batch_size: int = 16, device: str = "cpu",
             backend: str = "auto") -> dict[str, dict[str, float]]:
    """:func:`fidelity` of a run's checkpoint over all images of the eval ``cache`` (files in ``images``)."""
    run = load_run(checkpoint, torch.device(device))
    reader = CacheReader(cache, run.teachers, backend)
    check_same_teachers(run, reader)
    return fidelity(run, reader, image_paths(reader, images), np.arange(len(reader)), batch_size)
