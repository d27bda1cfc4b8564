"""Reading teacher checkpoint files without executing anything they hold (docs/security.md).

Two formats are read:

- **safetensors** (``safetensors.torch``): tensors only. A file written by ``dune-cache convert-checkpoint`` also
  carries, in its metadata (:data:`TREE_KEY`), a JSON tree that rebuilds the nested structure of the file it was
  converted from (dicts, lists, ``argparse.Namespace``, numbers, strings, torch dtypes), so that every teacher loader
  reads it as it reads the original.
- **torch pickles** (``.pth``, ``.pt``, ``.bin``, ``.pth.tar``): ``torch.load(weights_only=True)`` only, with
  :func:`allowed_globals` allowed besides torch's own defaults: the plain types that release files hold. A file
  that needs any other global is refused with a :class:`CheckpointError` naming it and the way out
  (``dune-cache convert-checkpoint IN OUT --trust-this-file``); there is no fallback to full unpickling.

Light on purpose: torch, numpy and safetensors are imported inside the functions.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Callable

from ..errors import CheckpointError

TREE_KEY = "dune_cache.checkpoint"  # safetensors metadata key of a converted file's JSON description
CONVERTED_FORMAT = "dune-cache-converted-checkpoint"
CONVERTED_VERSION = 1
CONVERT_COMMAND = "dune-cache convert-checkpoint"


def way_out(path: Path) -> str:
    """What to do with a checkpoint that needs full unpickling: the opt-in command, spelled out."""
    return (f"if you trust this file (it can run code when unpickled), convert it once with `{CONVERT_COMMAND} "
            f"{path} {path.with_suffix('.safetensors')} --trust-this-file` and pass the .safetensors file instead")


# ---------------------------------------------------------------------------------------
# torch pickles: weights_only with the plain types release files hold
# ---------------------------------------------------------------------------------------
def numpy_scalar_globals() -> list:
    """What a pickled numpy scalar needs, as the torch.load documentation allows it: the ``scalar`` reconstructor
    under the names numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) write, ``numpy.dtype`` and the concrete
    dtype classes of booleans, integers, floats and complex numbers (no object, string or structured dtype)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    names = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")
    codes = "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]
    return [*((scalar, name) for name in names), np.dtype, *sorted({type(np.dtype(c)) for c in codes}, key=str)]


def allowed_globals() -> list:
    """Globals ``torch.load(weights_only=True)`` may build besides torch's defaults (tensors, containers, dtypes).

    What the upstream code that writes teacher release files pickles (no real files are available offline, so each
    from its writer): DINOv2, DINOv3, SAM, Depth Anything V2, DINO, iBOT and torchvision save plain state dicts.
    ``argparse.Namespace``: MASt3R/DUSt3R/CroCo (``{'model', 'args'}``: naver/dust3r ``dust3r/model.py``,
    naver/mast3r ``mast3r/model.py`` load ``ckpt['args']``), RADIO ``.pth.tar`` (``{'arch', 'epoch', 'state_dict',
    'args'}``, NVlabs/RADIO ``radio/enable_spectral_reparam.py``; ``args.dtype`` is a torch dtype, allowed by
    default), Multi-HMR ``multiHMR_896_L.pt`` (``epoch, iter, model_state_dict, args, scaler, best_val``: naver/
    multi-hmr issue #25) and unstripped MAE-style DeiT-III/dBOT saves. Numpy scalars (:func:`numpy_scalar_globals`):
    Multi-HMR's ``best_val`` may be one (unverified)."""
    return [argparse.Namespace, *numpy_scalar_globals()]


def unsafe_globals(path: Path) -> list[str]:
    """The globals of a torch zip checkpoint that :func:`allowed_globals` and torch's defaults do not allow (read
    statically from its pickle, nothing executed); ``[]`` when they cannot be listed (legacy, non-zip files)."""
    import torch

    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - a legacy (non-zip) pickle, or no pickle at all
        return []


def load_torch_file(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU with :func:`allowed_globals`; a file needing more is a
    :class:`CheckpointError` naming the object types found and the way out (never loaded otherwise)."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names, reason = weights_only_refusal(exc)
        names = unsafe_globals(path) or names
        if not names:
            raise CheckpointError(f"cannot read checkpoint {path}: not a checkpoint torch can read ({reason})") \
                from None
        raise CheckpointError(f"checkpoint {path} holds objects of type {', '.join(names)}, beyond the tensors, "
                              "containers, numbers and argparse.Namespace a weights file needs; it was not loaded "
                              f"(loading it would run code from the file): {way_out(path)}") from None


def weights_only_refusal(exc: Exception) -> tuple[list[str], str]:
    """What torch's weights-only unpickler says in its (several paragraphs long) error: the globals or classes it
    names (``GLOBAL io.open was not``, ``but got <class 'x.Y'>``; how a legacy non-zip file, whose globals cannot be
    listed statically, is described), and its reason line (e.g. ``Unsupported operand 110`` for a file that is no
    pickle)."""
    import re

    text = str(exc)
    found = re.findall(r"GLOBAL (\S+) was not|but got <class '([^']+)'>", text)
    _, marker, rest = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (rest if marker else text).splitlines() if line.strip()]
    return sorted({a or b for a, b in found}), (lines[0] if lines else type(exc).__name__)


# ---------------------------------------------------------------------------------------
# The JSON tree of a converted file: nested structure + tensors by name
# ---------------------------------------------------------------------------------------
def is_plain(value: Any) -> bool:
    """A JSON scalar: ``None``, bool, int, str, or a finite float."""
    return value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value))


class TreeEncoder:
    """Turns a loaded checkpoint into (tensors by name, JSON tree); what has no plain form is dropped and listed.

    Tree nodes: JSON scalars as they are; ``{"$float": "nan"|"inf"|"-inf"}``; ``{"$tensor": name}``;
    ``{"$dtype": "float16"}`` (a torch dtype); ``{"$dict": [[key node, value node], ...]}``, ``{"$list": [...]}``,
    ``{"$tuple": [...]}``, ``{"$namespace": [[name, value node], ...]}`` (an ``argparse.Namespace``). A numpy scalar
    becomes its Python number, a numpy array a tensor, an ``nn.Module`` its ``state_dict()`` (listed as converted)."""

    def __init__(self) -> None:
        self.tensors: dict[str, Any] = {}
        self.dropped: list[dict[str, str]] = []  # {"path", "type"} of each object left out
        self.converted: list[dict[str, str]] = []  # {"path", "type", "as"} of each object kept in another form
        self._storages: set[tuple[int, int]] = set()

    def encode(self, value: Any, path: str = "") -> Any:
        """The tree node of ``value`` at ``path`` (``/``-separated keys; ``""``: the top)."""
        import numpy as np
        import torch

        if isinstance(value, float) and not math.isfinite(value):
            return {"$float": repr(value)}
        if is_plain(value):
            return value
        if isinstance(value, np.generic):
            return self.encode(value.item(), path)
        if isinstance(value, np.ndarray):
            return self.tensor(torch.from_numpy(np.ascontiguousarray(value)), path)
        if isinstance(value, torch.Tensor):
            return self.tensor(value, path)
        if isinstance(value, torch.dtype):
            return {"$dtype": str(value).removeprefix("torch.")}
        if isinstance(value, torch.nn.Module):
            self.converted.append({"path": path or "/", "type": qualified_name(value), "as": "its state_dict()"})
            return self.encode(value.state_dict(), path)
        if isinstance(value, argparse.Namespace):
            return {"$namespace": [[k, self.encode(v, f"{path}/{k}")] for k, v in vars(value).items()
                                   if self.keep(v, f"{path}/{k}")]}
        if isinstance(value, dict):
            return {"$dict": [[k, self.encode(v, f"{path}/{k}")] for k, v in value.items()
                              if self.keep_key(k, path) and self.keep(v, f"{path}/{k}")]}
        if isinstance(value, (list, tuple)):
            items = [self.encode(v, f"{path}/{i}") if self.keep(v, f"{path}/{i}") else None
                     for i, v in enumerate(value)]
            return {"$tuple" if isinstance(value, tuple) else "$list": items}
        raise AssertionError(f"unreachable: {path} was kept without a plain form")  # keep() filters first

    def keep(self, value: Any, path: str) -> bool:
        """Whether ``value`` has a plain form (:meth:`encode`); if not it is recorded as dropped."""
        import numpy as np
        import torch

        plain = (is_plain(value) or isinstance(value, (float, dict, list, tuple, argparse.Namespace, torch.dtype,
                                                       torch.nn.Module))
                 or (isinstance(value, torch.Tensor) and value.layout == torch.strided and not value.is_quantized
                     and value.device.type != "meta")
                 or (isinstance(value, (np.generic, np.ndarray)) and value.dtype.kind in "biuf"))
        if not plain:
            self.dropped.append({"path": path or "/", "type": qualified_name(value)})
        return plain

    def keep_key(self, key: Any, path: str) -> bool:
        """Whether dict key ``key`` is a JSON scalar; if not, its entry is recorded as dropped."""
        if not is_plain(key):
            self.dropped.append({"path": f"{path}/{key!r}", "type": f"dict key of type {qualified_name(key)}"})
        return is_plain(key)

    def tensor(self, value: Any, path: str) -> dict:
        """Store tensor ``value`` under a name made from ``path`` (unique), contiguous and owning its storage."""
        name = path.strip("/") or "tensor"
        base, n = name, 1
        while name in self.tensors:
            name, n = f"{base}#{n}", n + 1
        value = value.detach().cpu()
        storage = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
        shared = storage in self._storages and value.numel() > 0
        self._storages.add(storage)
        self.tensors[name] = value.clone() if shared or not value.is_contiguous() else value
        return {"$tensor": name}


def plain_copy(obj: Any) -> tuple[Any, list[dict[str, str]], list[dict[str, str]]]:
    """``obj`` rebuilt from its plain form (:class:`TreeEncoder`): only tensors (contiguous, unshared), containers,
    numbers, strings, dtypes and namespaces; with the lists of what was dropped and converted."""
    encoder = TreeEncoder()
    tree = encoder.encode(obj) if encoder.keep(obj, "") else None
    return decode_tree(tree, encoder.tensors), encoder.dropped, encoder.converted


def qualified_name(value: Any) -> str:
    """``module.Class`` of ``value``'s type."""
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def decode_tree(node: Any, tensors: dict[str, Any]) -> Any:
    """Rebuild the object a :class:`TreeEncoder` node describes, its tensors taken from ``tensors``."""
    if not isinstance(node, dict):
        return node
    (tag, value), = node.items()
    builders: dict[str, Callable[[Any], Any]] = {
        "$float": float,
        "$tensor": lambda name: tensors[name],
        "$dtype": lambda name: torch_dtype(name),
        "$dict": lambda items: {decode_tree(k, tensors): decode_tree(v, tensors) for k, v in items},
        "$list": lambda items: [decode_tree(v, tensors) for v in items],
        "$tuple": lambda items: tuple(decode_tree(v, tensors) for v in items),
        "$namespace": lambda items: argparse.Namespace(**{k: decode_tree(v, tensors) for k, v in items}),
    }
    if tag not in builders:
        raise CheckpointError(f"unknown node {tag!r} in a converted checkpoint's tree (written by a newer version?)")
    return builders[tag](value)


def torch_dtype(name: str):
    """The torch dtype called ``name`` (``float16``); a :class:`CheckpointError` for anything else."""
    import torch

    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{name!r} is not a torch dtype")
    return dtype


# ---------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------
def read_safetensors(path: Path) -> Any:
    """The tensors of a safetensors file; a file ``convert-checkpoint`` wrote comes back as the structure it was
    converted from (:func:`decode_tree`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as file:
        meta = file.metadata() or {}
    tensors = load_file(str(path))
    if TREE_KEY not in meta:
        return tensors
    description = json.loads(meta[TREE_KEY])
    if description.get("format") != CONVERTED_FORMAT or description.get("format_version", 0) > CONVERTED_VERSION:
        raise CheckpointError(f"checkpoint {path}: converted by a newer dune_cache (format "
                              f"{description.get('format')!r} version {description.get('format_version')}); upgrade")
    return decode_tree(description["tree"], tensors)


def write_converted(obj: Any, out: Path, source: dict) -> TreeEncoder:
    """Write ``obj`` (a checkpoint loaded from ``source`` = ``{"file", "sha256", "bytes"}``) to ``out`` as one
    safetensors file: its tensors plus the JSON tree, the source and what was dropped or converted in the metadata.
    Returns the encoder (its ``dropped`` and ``converted`` lists). Written to a temporary file, then renamed."""
    import os

    from safetensors.torch import save_file

    encoder = TreeEncoder()
    tree = encoder.encode(obj) if encoder.keep(obj, "") else None
    description = {"format": CONVERTED_FORMAT, "format_version": CONVERTED_VERSION, "tree": tree, "source": source,
                   "dropped": encoder.dropped, "converted": encoder.converted}
    tmp = out.with_name(out.name + ".tmp")
    save_file(encoder.tensors, str(tmp), metadata={TREE_KEY: json.dumps(description)})
    os.replace(tmp, out)
    return encoder
