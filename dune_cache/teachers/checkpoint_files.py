"""Which files a ``--checkpoint`` path stands for, without torch: one file, or a Hugging Face model folder.

A Hugging Face model folder is what ``save_pretrained`` writes and the Hub serves: ``config.json`` and either
``model.safetensors`` or shards ``model-0000i-of-0000n.safetensors`` listed by ``model.safetensors.index.json``
(its ``weight_map``: tensor name -> shard file). Only safetensors are read: a folder holding only
``pytorch_model.bin`` (a pickle) is refused. The files of a folder, or a folder's ``model.safetensors`` given
alone together with the ``config.json`` beside it, are :func:`checkpoint_files`; provenance records the sha256 of
each (:func:`checkpoint_section`).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable

from ..errors import CheckpointError

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
HF_SHARD = re.compile(r"^model-\d+-of-\d+\.safetensors$")
RANDOM_WEIGHTS = "random-weights"  # provenance checkpoint.sha256 of a group extracted without a checkpoint


def is_hf_folder(path: Path) -> bool:
    """Whether ``path`` is a folder with ``model.safetensors`` or ``model.safetensors.index.json``."""
    return path.is_dir() and ((path / HF_WEIGHTS).is_file() or (path / HF_INDEX).is_file())


def check_checkpoint_path(path: str | Path) -> Path:
    """``path`` as a :class:`Path`: a file or a Hugging Face model folder; a one-line :class:`CheckpointError`
    saying what is wrong and what to give otherwise."""
    path = Path(path)
    if path.is_file() or is_hf_folder(path):
        return path
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    pickled = [name for name in HF_PICKLE_WEIGHTS if (path / name).is_file()]
    if pickled:
        raise CheckpointError(
            f"checkpoint folder {path} has only {pickled[0]} (a pickle, not read); a Hugging Face folder must hold "
            f"{HF_WEIGHTS} or {HF_INDEX}: re-save it with save_pretrained(..., safe_serialization=True)")
    raise CheckpointError(f"checkpoint folder {path} is not a Hugging Face model folder: it has neither {HF_WEIGHTS} "
                          f"nor {HF_INDEX}; give a checkpoint file or such a folder")


def hf_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of Hugging Face folder ``folder``: ``model.safetensors``, else the shards its index
    lists (sorted); a :class:`CheckpointError` naming the index when it is unreadable or a shard is absent."""
    if (folder / HF_WEIGHTS).is_file():
        return [folder / HF_WEIGHTS]
    index = folder / HF_INDEX
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read the shard index {index}: {exc!r}; expected a JSON object with a "
                              "'weight_map' of tensor name -> shard file") from exc
    absent = [name for name in shards if not (folder / name).is_file() or Path(name).name != name]
    if absent or not shards:
        raise CheckpointError(f"shard index {index} lists {len(shards)} shard(s); missing in {folder}: "
                              f"{', '.join(absent) or 'none listed'} (download every shard the index names)")
    return [folder / name for name in shards]


def hf_config_beside(path: Path) -> Path | None:
    """``config.json`` of the Hugging Face folder ``path`` is (or whose weights file ``path`` is), if present."""
    folder = path if path.is_dir() else path.parent
    is_weights = path.is_dir() or path.name == HF_WEIGHTS or HF_SHARD.match(path.name) is not None
    config = folder / HF_CONFIG
    return config if is_weights and config.is_file() else None


def checkpoint_files(path: Path) -> list[Path]:
    """Every file read for checkpoint ``path``: itself, or a folder's ``config.json``, index and weight files; a
    folder's ``model.safetensors`` (or shard) given alone comes with the ``config.json`` beside it."""
    path = check_checkpoint_path(path)
    config = hf_config_beside(path)
    if path.is_file():
        return [f for f in (config, path) if f is not None]
    index = path / HF_INDEX if not (path / HF_WEIGHTS).is_file() else None
    return [f for f in (config, index) if f is not None] + hf_weight_files(path)


def read_hf_config(path: Path) -> dict | None:
    """The parsed ``config.json`` of :func:`hf_config_beside` ``path`` (``None`` without one); a
    :class:`CheckpointError` naming the file when it is not a JSON object."""
    config = hf_config_beside(path)
    if config is None:
        return None
    try:
        parsed = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {config}: {exc}; a Hugging Face config.json is a JSON object") from exc
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{config} is not a JSON object (a Hugging Face config.json is)")
    return parsed


def checkpoint_sha256(path: Path, hash_file: Callable[[Path], str]) -> str:
    """Provenance ``checkpoint.sha256``: of the file for a file (as before folders were read), else the sha256 of
    the folder's ``sha256sum``-style listing (``<sha256>  <name>\\n`` per file of :func:`checkpoint_files`)."""
    files = [path] if path.is_file() else checkpoint_files(path)
    return _checkpoint_digest(path, {f: hash_file(f) for f in files})


def _checkpoint_digest(path: Path, hashes: dict[Path, str]) -> str:
    """:func:`checkpoint_sha256` of ``path`` from the sha256 of each of its files, ``hashes``."""
    if path.is_file():
        return hashes[path]
    listing = "".join(f"{digest}  {f.relative_to(path).as_posix()}\n" for f, digest in hashes.items())
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def checkpoint_section(path: Path | None, hash_file: Callable[[Path], str], weights: tuple[str, str] | None = None
                       ) -> dict:
    """The provenance ``checkpoint`` section (docs/cache-format.md) of ``path`` (``None``: random weights).

    ``file``/``sha256``/``bytes`` are the given path's (for a folder: its name, :func:`checkpoint_sha256`, the bytes
    of its files read); ``files`` lists every file read with its own sha256 and bytes. ``weights`` = ``(format,
    weights_sha256)`` of the loaded teacher (:meth:`Teacher.checkpoint_identity`), when known, adds ``format``
    (``release``, ``timm`` or ``hf``) and ``weights_sha256``, which is what identity compares when both sides have it.
    """
    if path is None:
        return {"file": None, "sha256": RANDOM_WEIGHTS, "bytes": 0}
    hashes = {f: hash_file(f) for f in checkpoint_files(path)}  # each file read once
    base = path if path.is_dir() else path.parent
    section = {
        "file": path.name,
        "sha256": _checkpoint_digest(path, hashes),
        "bytes": path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in hashes),
        "files": [{"file": f.relative_to(base).as_posix(), "sha256": digest, "bytes": f.stat().st_size}
                  for f, digest in hashes.items()],
    }
    if weights is not None:
        section["format"], section["weights_sha256"] = weights
    return section
