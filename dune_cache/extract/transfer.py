"""A batch's encoded features on their way from the extraction device to the writer, without stalling the device.

The main thread encodes a batch on the device (:meth:`Scheme.encode_tensor`), starts non-blocking copies of the
parts into pinned host memory, records a CUDA event and hands the batch to the writer thread, then runs the next
forward at once; the writer thread waits on the event (:meth:`HostCopy.numpy`) before it checks and stores the
batch. The check for non-finite features is computed on the device with the batch and read there too, so the main
thread never reads a device value. On the CPU the copies are the tensors themselves.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import NonFiniteFeaturesError
from ..format.rows import ViewRows
from .writer import Rows

PART = "|"  # joins a feature name and a part suffix in a HostCopy's keys: ``levels/b5/patch|_scale``


class HostCopy:
    """``tensors`` (name -> tensor on one device) copied to the host: started here, waited for in :meth:`numpy`."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        device = next(iter(tensors.values())).device
        self.event = None
        if device.type == "cpu":
            self.tensors = tensors
            return
        self.tensors = {name: torch.empty(value.shape, dtype=value.dtype, pin_memory=True).copy_(value,
                                                                                                   non_blocking=True)
                        for name, value in tensors.items()}
        self.event = torch.cuda.Event()
        self.event.record()

    def numpy(self) -> dict[str, np.ndarray]:
        """The tensors on the host, as numpy arrays, once their copies have landed."""
        if self.event is not None:
            self.event.synchronize()
        return {name: value.numpy() for name, value in self.tensors.items()}


@dataclass
class DeviceRows:
    """A batch's features as the device left them: ``copy`` holds ``bad`` ``(B,)`` (rows with non-finite values or
    values beyond the storage dtype) and, per feature name (``cls``, ``patch``, levels), its encoded parts ``(B, 1 + K,
    ...)`` (index 0 the whole image, then its K cached views: ``boxes``/``flips`` from the loader, ``None`` without
    views). ``teacher``, ``dtype``: for the error message; ``ids``: the manifest's ids."""

    indices: np.ndarray
    copy: HostCopy
    names: list[str]
    boxes: np.ndarray | None
    flips: np.ndarray | None
    failures: list[tuple[int, str, str]]
    teacher: str
    dtype: str
    ids: tuple[str, ...]

    def rows(self) -> Rows:
        """The batch as :class:`Rows` to store (in the writer thread); a :class:`NonFiniteFeaturesError` naming the
        images whose features are not finite or beyond the storage dtype: nothing of the batch is stored."""
        host = self.copy.numpy()
        bad = host.pop("bad")
        if bad.any():
            names = [self.ids[i] for i in self.indices[bad]]
            raise NonFiniteFeaturesError(
                f"teacher {self.teacher} gave non-finite features or values beyond {self.dtype} range "
                f"for {len(names)} image(s): {', '.join(names[:20])}. Nothing was written for this batch (nor, in a "
                "sharded group, for the rest of its shard); what was written before is kept. Try --dtype float32 or "
                "--no-amp.")
        parts: dict[str, dict[str, np.ndarray]] = {}
        for key, values in host.items():
            name, _, suffix = key.partition(PART)
            parts.setdefault(name, {})[suffix] = values
        whole = {name: {s: v[:, 0] for s, v in parts[name].items()} for name in self.names}
        views = None
        if self.boxes is not None:
            seen = {name: {s: v[:, 1:] for s, v in parts[name].items()} for name in self.names}
            views = ViewRows(cls=seen.pop("cls"), patch=seen.pop("patch"), boxes=self.boxes,
                             flip=self.flips.astype(np.uint8), levels=seen)
        cls, patch = whole.pop("cls"), whole.pop("patch")
        return Rows(self.indices, cls, patch, views, self.failures, whole)
