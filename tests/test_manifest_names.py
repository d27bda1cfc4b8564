"""Every file name the OS allows survives the stored manifest; old raw manifests read as before; dangling links fail."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from typer.testing import CliRunner

from dune_cache.cli import app
from dune_cache.config import ExtractConfig
from dune_cache.extract.run import run_extraction
from dune_cache.errors import ImageDecodeError, ManifestError
from dune_cache.images.manifest import ImageManifest, escape_field, load_manifest, unescape_field
from dune_cache.images.decode import load_pixels, open_rgb
from dune_cache.commands.verify import verify_cache
from dune_cache.format.constants import STATUS_DONE
from dune_cache.format.store import TeacherStore
from dune_cache.config import StorageConfig
from dune_cache.teachers import create_teacher

SPEC = Path(__file__).parents[1] / "docs" / "cache-format.md"
TEACHER = "tiny_test_teacher"
NON_UTF8 = os.fsdecode(b"caf\xe9 latin-1.png")  # not valid UTF-8: surrogate-escaped, as os/pathlib give it
ODD_NAMES = ["new\nline.jpg", "tab\there.png", "carriage\rreturn.jpg", "back\\slash.png", "#hash.jpg",
             "sub/#nested.png", "ünïcödé 日本.jpg", NON_UTF8, "form\x0cfeed.png", "para\u2029sep.jpg",
             "looks\\x41escaped.png", "plain.jpg"]
runner = CliRunner()


def manifest_recipe() -> str:
    """The python snippet of the ``manifest`` section of docs/cache-format.md."""
    section = SPEC.read_text().split("### `manifest`", 1)[1].split("\n### ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def write_photos(folder: Path, names: list[str]) -> None:
    """A different real photo (crops of scikit-image's) under each of ``names`` below ``folder``."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    for k, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        crop = photos[k % len(photos)][k * 9:, k * 7:]
        Image.fromarray(crop).save(path, format="JPEG" if name.endswith(".jpg") else "PNG")


def extract(images: Path, out: Path, checkpoint: Path):
    return run_extraction(ExtractConfig(teacher=TEACHER, images=images, out=str(out), checkpoint=checkpoint,
                                        batch_size=3, num_workers=0, progress=False,
                                        storage=StorageConfig(unit_size=4)))


def stored_text(out: Path) -> tuple[str, dict]:
    array = zarr.open_group(str(out), mode="r")[TEACHER]["manifest"]
    return bytes(array[:]).decode("utf-8"), dict(array.attrs)


def test_escaping_round_trips_every_name_and_keeps_ordinary_text_and_hash():
    manifest = ImageManifest(ids=tuple(ODD_NAMES), tags=("", "a\tb", "", "x\\y", "#t", *[""] * 7), base=None)
    text = manifest.to_text()
    assert len(text.splitlines()) == len(ODD_NAMES)  # no name or tag breaks a line
    assert ImageManifest.from_text(text) == manifest
    assert text.splitlines()[4] == "\\#hash.jpg\t#t" and text.splitlines()[1] == "tab\\there.png\ta\\tb"
    assert escape_field(NON_UTF8) == "caf\\xe9 latin-1.png"
    assert escape_field("para\u2029sep.jpg") == "para\\xe2\\x80\\xa9sep.jpg"
    assert [unescape_field(escape_field(name)) for name in ODD_NAMES] == ODD_NAMES
    ordinary = ImageManifest(ids=("a.jpg", "b/c d.png"), tags=("", "mast3r"), base=None)
    assert ordinary.to_text() == "a.jpg\nb/c d.png\tmast3r\n"  # what caches made before escaping hold
    assert ordinary.sha256 == hashlib.sha256(b"a.jpg\nb/c d.png\tmast3r\n").hexdigest()
    with pytest.raises(ManifestError, match="starts no escape"):
        ImageManifest.from_text("bad\\q.jpg\n")
    with pytest.raises(ManifestError, match="upgrade dune_cache"):
        ImageManifest.from_text("a.jpg\n", escaping="backslash-v9")


def test_every_file_name_round_trips_through_an_extracted_cache(tmp_path, tiny_checkpoint):
    images = tmp_path / "images"
    write_photos(images, ODD_NAMES)
    result = extract(images, tmp_path / "cache", tiny_checkpoint)
    assert (result.processed, result.failed, result.total) == (len(ODD_NAMES), 0, len(ODD_NAMES))

    store = TeacherStore.open(str(tmp_path / "cache"), TEACHER)
    manifest = store.manifest()
    assert manifest.ids == tuple(sorted(ODD_NAMES)) == load_manifest(images).ids
    assert manifest.sha256 == store.provenance["images"]["manifest_sha256"]
    assert all((images / image_id).is_file() for image_id in manifest.ids)
    assert os.fsencode(manifest.ids[manifest.ids.index(NON_UTF8)]) == b"caf\xe9 latin-1.png"
    text, attributes = stored_text(tmp_path / "cache")
    assert attributes == {"escaping": "backslash-v1"} and "new\\nline.jpg\n" in text

    teacher = create_teacher(TEACHER, tiny_checkpoint)
    pixels = torch.stack([torch.from_numpy(load_pixels(images / name, (32, 48), "squash")) for name in manifest.ids])
    with torch.inference_mode():
        direct = teacher(pixels)
    assert (store.read_status() == STATUS_DONE).all()
    np.testing.assert_allclose(store.cls[:], direct.cls.numpy(), rtol=2e-3, atol=2e-3)  # row i is image ids[i]
    np.testing.assert_allclose(store.patch[:], direct.patch.numpy(), rtol=2e-3, atol=2e-3)
    assert all(report.ok for report in verify_cache(str(tmp_path / "cache")))

    scope = {"CACHE": str(tmp_path / "cache"), "TEACHER": TEACHER}
    exec(manifest_recipe(), scope)
    assert tuple(scope["ids"]) == manifest.ids and tuple(scope["tags"]) == manifest.tags


def test_a_cache_written_before_escaping_reads_its_raw_manifest_as_before(tmp_path, tiny_checkpoint):
    names = ["back\\slash.png", "looks\\x41escaped.png", "plain.jpg"]
    write_photos(tmp_path / "images", names)
    out = tmp_path / "cache"
    extract(tmp_path / "images", out, tiny_checkpoint)
    text, attributes = stored_text(out)
    assert text == "back\\\\slash.png\nlooks\\\\x41escaped.png\nplain.jpg\n" and attributes

    raw = "".join(name + "\n" for name in names).encode("utf-8")  # what the code before escaping stored
    group = zarr.open_group(str(out), mode="r+")[TEACHER]
    del group["manifest"]
    group.create_array("manifest", data=np.frombuffer(raw, dtype=np.uint8), chunks=(len(raw),))
    provenance = group.attrs["dune_cache"]
    group.attrs["dune_cache"] = {**provenance, "images": {**provenance["images"],
                                                          "manifest_sha256": hashlib.sha256(raw).hexdigest()}}

    manifest = TeacherStore.open(str(out), TEACHER).manifest()
    assert manifest.ids == tuple(names)  # a backslash of a raw manifest is part of the name
    assert all(report.ok for report in verify_cache(str(out)))  # its hash still matches the provenance
    scope = {"CACHE": str(out), "TEACHER": TEACHER}
    exec(manifest_recipe(), scope)
    assert scope["ids"] == names


def test_a_dangling_symlink_is_recorded_missing_and_info_counts_add_up(tmp_path, tiny_checkpoint):
    images = tmp_path / "images"
    write_photos(images, ["a.jpg", "b.png"])
    (images / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (images / "folder.jpg").mkdir()
    (images / "folder-link.png").symlink_to(images / "folder.jpg")
    (images / "photo-link.png").symlink_to(images / "b.png")
    with pytest.raises(ImageDecodeError) as raised:
        open_rgb(images / "gone.jpg")
    assert raised.value.reason == "missing"

    out = tmp_path / "cache"
    result = runner.invoke(app, ["extract", "--teacher", TEACHER, "--checkpoint", str(tiny_checkpoint),
                                 "--images", str(images), "--out", str(out), "--no-progress", "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    store = TeacherStore.open(str(out), TEACHER)
    assert store.manifest().ids == ("a.jpg", "b.png", "gone.jpg", "photo-link.png")
    assert {r["image_id"]: r["reason"] for r in store.read_failures()} == {"gone.jpg": "missing"}
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0, info.output
    assert "4 total, 3 done, 1 failed, 0 pending" in info.output


def test_list_files_are_raw_and_ambiguous_lines_are_refused_by_number(tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_bytes(b"# comment\r\nback\\slash.png\tmast3r\r\n./#hash.jpg\ncaf\xe9 latin-1.png\n")
    manifest = load_manifest(listed)
    assert manifest.ids == ("back\\slash.png", "./#hash.jpg", NON_UTF8)
    assert manifest.tags == ("mast3r", "", "")
    assert manifest.path(2) == tmp_path.resolve() / NON_UTF8

    listed.write_bytes(b"ok.jpg\nname\twith\ttabs.jpg\tgeneric\nbare\rreturn.jpg\nfine.png\nform\x0cfeed.jpg\n")
    with pytest.raises(ManifestError) as raised:
        load_manifest(listed)
    message = str(raised.value)
    assert str(listed) in message and "3 ambiguous lines" in message and "pass the folder" in message
    assert all(f"line {n}:" in message for n in (2, 3, 5)) and "line 1:" not in message and "line 4:" not in message
