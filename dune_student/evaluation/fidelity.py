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
from torch.utils.data import DataLoader, Dataset

from dune_cache import CacheReader, TargetBatch, load_pixels, pick_device

from ..data.batches import image_paths
from ..loss.distill import use_cls_from_provenance
from ..runs.loading import LoadedRun, check_same_teachers, load_run, project


class HeldOutBatches(Dataset):
    """Item ``k`` -> the ``k``-th batch of samples ``indices`` of ``reader``: uint8 pixels ``(B, 3, S, S)`` (the whole
    image, squashed to ``resolution``) and their :class:`TargetBatch`, made in DataLoader workers (the reader
    pickles; each worker opens its own handles)."""

    def __init__(self, reader: CacheReader, paths, indices: np.ndarray, batch_size: int, resolution: int):
        self.reader, self.paths, self.indices = reader, paths, np.asarray(indices)
        self.batch_size, self.size = batch_size, (resolution, resolution)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, TargetBatch]:
        batch = self.indices[k * self.batch_size:(k + 1) * self.batch_size]
        pixels = torch.stack([torch.from_numpy(load_pixels(self.paths[i], self.size, "squash")) for i in batch])
        return pixels, self.reader.read(batch)


@torch.inference_mode()
def fidelity(run: LoadedRun, reader: CacheReader, paths: list[Path], indices: np.ndarray,
             batch_size: int = 16, workers: int = 0) -> dict[str, dict[str, float]]:
    """``{teacher: {"cls": mean cosine, "patch": mean cosine, "images": n}}`` over samples ``indices`` of
    ``reader`` (``paths[i]``: image of sample ``i``), the modules as they are (call ``.eval()`` first).
    ``cls`` is None for teachers whose CLS was not distilled (e.g. a mean-of-patches CLS). Images are decoded and
    targets read in ``workers`` DataLoader workers (0: here); sums stay on the device, read once at the end."""
    dev = next(run.student.parameters()).device
    sums = torch.zeros(len(run.teachers), 3, dtype=torch.float64, device=dev)  # per teacher: cls, patch, images
    batches = DataLoader(HeldOutBatches(reader, paths, indices, batch_size, run.resolution), batch_size=None,
                         num_workers=workers, pin_memory=dev.type == "cuda",
                         multiprocessing_context="forkserver" if workers else None,
                         generator=torch.Generator())  # its seed draw leaves the training's random stream alone
    for pixels, targets in batches:
        preds = project(run, pixels.to(dev, non_blocking=True), reader.grids)
        for k, t in enumerate(run.teachers):
            have = targets.mask[:, k].to(dev, non_blocking=True)
            cls_t, patch_t = run.standardizer.standardize(t, targets.cls[t].to(dev, non_blocking=True),
                                                          targets.patch[t].to(dev, non_blocking=True))
            cls_cos = F.cosine_similarity(preds[t][0].float(), cls_t, dim=-1)
            patch_cos = F.cosine_similarity(preds[t][1].float(), patch_t, dim=-1).flatten(1).mean(dim=1)
            sums[k] += torch.stack([torch.where(have, cls_cos, 0).sum(), torch.where(have, patch_cos, 0).sum(),
                                    have.sum()]).double()
    distilled_cls = use_cls_from_provenance(run.provenance)
    totals = dict(zip(run.teachers, sums.tolist()))
    return {t: {"cls": cls / max(n, 1) if distilled_cls[t] else None, "patch": patch / max(n, 1), "images": int(n)}
            for t, (cls, patch, n) in totals.items()}


def evaluate(checkpoint: str | Path, cache: str, images: str, batch_size: int = 16, device: str = "auto",
             backend: str = "auto", workers: int = 0) -> dict[str, dict[str, float]]:
    """:func:`fidelity` of a run's checkpoint over all images of the eval ``cache`` (files in ``images``) on
    ``device`` (``auto``: the GPU when there is one)."""
    run = load_run(checkpoint, pick_device(device))
    reader = CacheReader(cache, run.teachers, backend)
    check_same_teachers(run, reader)
    return fidelity(run, reader, image_paths(reader, images), np.arange(len(reader)), batch_size, workers)
