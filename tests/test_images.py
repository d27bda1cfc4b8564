"""Manifests and robust image decoding."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dune_cache.errors import ImageDecodeError, ManifestError
from dune_cache.images.manifest import ImageManifest, load_manifest
from dune_cache.images.decode import load_pixels, open_rgb


def test_manifest_from_directory_is_sorted_recursive_and_filters_extensions(tmp_path):
    (tmp_path / "b").mkdir()
    for rel in ["b/z.jpg", "a.PNG", "b/a.webp", "notes.txt"]:
        (tmp_path / rel).write_bytes(b"x")
    m = load_manifest(tmp_path)
    assert m.ids == ("a.PNG", "b/a.webp", "b/z.jpg")
    assert m.path(2) == tmp_path.resolve() / "b/z.jpg"
    assert m.to_text() == "a.PNG\nb/a.webp\nb/z.jpg\n"


def test_manifest_from_list_file_keeps_order_tags_and_skips_comments(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("# header\nimgs/2.jpg\tmast3r\n\nimgs/1.jpg\n/abs/x.png\tgeneric\n")
    m = load_manifest(lst)
    assert m.ids == ("imgs/2.jpg", "imgs/1.jpg", "/abs/x.png")
    assert m.tags == ("mast3r", "", "generic")
    assert m.path(0) == tmp_path.resolve() / "imgs/2.jpg"
    assert str(m.path(2)) == "/abs/x.png"
    assert ImageManifest.from_text(m.to_text()).sha256 == m.sha256
    other = ImageManifest.from_text("imgs/2.jpg\nimgs/1.jpg\n/abs/x.png\tgeneric\n")
    assert other.sha256 != m.sha256  # tags are part of the identity


@pytest.mark.parametrize("content, message", [("", "no images"), ("a.jpg\na.jpg\n", "duplicate")])
def test_manifest_errors(tmp_path, content, message):
    lst = tmp_path / "list.txt"
    lst.write_text(content)
    with pytest.raises(ManifestError, match=message):
        load_manifest(lst)
    with pytest.raises(ManifestError, match="no such"):
        load_manifest(tmp_path / "missing")


def _rgb_gradient(h=40, w=60) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 4, y * 6, (x + y) * 2], axis=-1).astype(np.uint8)


def test_grayscale_cmyk_16bit_and_palette_become_rgb8(tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(_rgb_gradient()[..., 0]).save(gray)
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(_rgb_gradient()).convert("CMYK").save(cmyk)
    deep = tmp_path / "deep.png"
    Image.fromarray((np.arange(40 * 60).reshape(40, 60) * 27).astype(np.uint16)).save(deep)
    pal = tmp_path / "pal.gif"
    Image.fromarray(_rgb_gradient()).convert("P").save(pal)
    for path in (gray, cmyk, deep, pal):
        img = open_rgb(path)
        assert img.mode == "RGB" and img.size == (60, 40), path
    g = np.asarray(open_rgb(gray))
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    d = np.asarray(open_rgb(deep))[..., 0].astype(int)
    expected = np.round((np.arange(40 * 60).reshape(40, 60) * 27 % 65536) / 257).astype(int)
    assert np.abs(d - expected).max() <= 1  # 16-bit range mapped to 8 bits, not clipped


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, 5:, 3] = 255  # right half opaque red, left half fully transparent
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = np.asarray(open_rgb(path))
    assert (out[:, :5] == 255).all()
    assert (out[:, 5:] == [200, 0, 0]).all()


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    img = Image.fromarray(_rgb_gradient(40, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(path, exif=exif.tobytes())
    assert open_rgb(path).size == (40, 60)  # (W, H) after rotation


def test_unusable_files_raise_with_reasons(tmp_path):
    text = tmp_path / "text.jpg"
    text.write_bytes(b"hello, not a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    good = tmp_path / "good.jpg"
    Image.fromarray(_rgb_gradient(200, 200)).save(good, quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases = {text: "not_an_image", empty: "not_an_image", truncated: "truncated", tmp_path / "gone.png": "missing"}
    for path, reason in cases.items():
        with pytest.raises(ImageDecodeError) as info:
            load_pixels(path, (28, 28), "squash")
        assert info.value.reason == reason, (path, info.value)
        assert str(path) in str(info.value)


def test_load_pixels_shapes_for_both_resize_modes(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(_rgb_gradient(40, 80)).save(path)
    for mode in ("squash", "center_crop"):
        px = load_pixels(path, (28, 42), mode)
        assert px.shape == (3, 28, 42) and px.dtype == np.uint8
    squash, crop = load_pixels(path, (28, 28), "squash"), load_pixels(path, (28, 28), "center_crop")
    assert squash[0, 0, 0] < crop[0, 0, 0]  # center crop starts further right in the x-gradient
