"""A cache from someone else's bucket is data, never code, and cannot exhaust the machine (docs/security.md):
forged metadata (absurd shapes, chunks, dtypes, codecs, statistics, record arrays, image-copy offsets) is refused
before anything is allocated -- each case runs in a subprocess whose address space is capped a few GiB above what it
has mapped, so an allocation the metadata asks for fails instead of swapping the machine; manifest ids that are
absolute or hold ``..`` never make ``show`` (either CLI), ``repair`` or ``add-images`` read outside the image folder
or write outside the output folder; images over the pixel limit are recorded as failed, never decoded (also on the
training device)."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from typer.testing import CliRunner

import dune_cache.commands.add_images as add_images_module
import dune_cache.commands.show as show_module
import dune_student.evaluation.show as student_show_module
from dune_cache.cli import app
from dune_cache.commands.add_images import add_images
from dune_cache.commands.stats import compute_stats
from dune_cache.config import ExtractConfig, StorageConfig
from dune_cache.errors import ImageDecodeError
from dune_cache.extract.run import run_extraction
from dune_cache.format.stats import write_stats
from dune_cache.format.store import TeacherStore
from dune_cache.images.decode import MAX_IMAGE_PIXELS, open_rgb
from dune_student.cli import app as student_app
from dune_student.data.batches import EncodedImages, decode_crops
from dune_student.data.augment import full_grid_crop
from dune_student.errors import DataError
from dune_student.training.trainer import train
from test_train import config
from test_train_errors import assert_one_paragraph_error

TEACHER = "tiny_test_teacher"
runner = CliRunner()


@pytest.fixture(scope="module")
def clean(tmp_path_factory, real_image_dir, tiny_checkpoint) -> Path:
    """A tiny-teacher cache of the six photos with statistics and an image copy, on the student's 4x4 grid."""
    out = tmp_path_factory.mktemp("clean") / "cache.zarr"
    run_extraction(ExtractConfig(teacher=TEACHER, images=real_image_dir, out=str(out), checkpoint=tiny_checkpoint,
                                 student_patch=8, student_resolution="32", batch_size=6, num_workers=0,
                                 progress=False, storage=StorageConfig(unit_size=4)))
    write_stats(str(out), TEACHER, compute_stats(str(out), TEACHER))
    add_images(str(out), str(real_image_dir), 32, workers=1)
    return out


@pytest.fixture
def forged(tmp_path, clean) -> Path:
    """A copy of the clean cache to forge."""
    shutil.copytree(clean, tmp_path / "forged.zarr")
    return tmp_path / "forged.zarr"


def edit_json(path: Path, change) -> None:
    """Apply ``change(meta)`` to the ``zarr.json`` at ``path`` (a node folder)."""
    meta = json.loads((path / "zarr.json").read_text())
    change(meta)
    (path / "zarr.json").write_text(json.dumps(meta))


def shaped(shape: list[int], chunks: list[int] | None = None):
    """A change setting an array's shape (and chunk shape)."""
    def change(meta: dict) -> None:
        meta["shape"] = shape
        if chunks is not None:
            meta["chunk_grid"]["configuration"]["chunk_shape"] = chunks
    return change


def provenance(change):
    """A change of the group's provenance (its ``dune_cache`` attributes)."""
    return lambda meta: change(meta["attributes"]["dune_cache"])


# ---------------------------------------------------------------------------------------
# Metadata: refused before any allocation (run under a capped address space)
# ---------------------------------------------------------------------------------------
CAPPED = """
import resource, sys
import numpy, torch, zarr, zarr.codecs
import dune_cache.cli, dune_cache.read.reader, dune_cache.format.stats
import dune_cache.commands.verify, dune_cache.commands.info
mapped = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmSize"))) * 1024
resource.setrlimit(resource.RLIMIT_AS, (mapped + (3 << 30), resource.RLIM_INFINITY))  # 3 GiB more, at most
try:
    exec(sys.argv[1])
    print("RESULT completed")
except SystemExit as exc:
    print("RESULT exit", exc.code)
except BaseException as exc:
    print("RESULT raised", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
"""


def run_capped(code: str) -> tuple[str, str]:
    """Run ``code`` in a fresh interpreter whose address space may grow by at most 3 GiB: (its RESULT line, all it
    printed)."""
    done = subprocess.run([sys.executable, "-c", CAPPED, code], capture_output=True, text=True, timeout=300)
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert result, done.stderr[-3000:]
    return result[-1], done.stdout + done.stderr


def cli(*args: str) -> str:
    return f"from dune_cache.cli import app; app({list(args)!r}, prog_name='dune-cache')"


FORGED_METADATA = {  # what is forged -> (node to edit, change, the one-line refusal names)
    "status of 10**12 images": ("status", shaped([10 ** 12]), "status: declares shape (1000000000000,)"),
    "a manifest of 10**12 bytes": ("manifest", shaped([10 ** 12], [10 ** 12]), "manifest: the array decodes to"),
    "10**12 images": ("", provenance(lambda p: p["images"].update(count=10 ** 12)),
                      "provenance images.count is 1000000000000, not an integer in [0, 2147483648]"),
    "a chunk of a million images": ("cls", shaped([6, 16], [10 ** 6, 16]), "cls: declares shape (6, 16), chunks "
                                                                             "(1000000, 16)"),
    "a grid of a million tokens a side": ("", provenance(lambda p: p["geometry"].update(grid=[10 ** 6, 10 ** 6])),
                                          "provenance geometry.grid h is 1000000, not an integer in [1, 4096]"),
    "float64 features": ("cls", lambda m: m.update(data_type="float64"), "dtype float64; its provenance implies"),
    "metadata zarr cannot parse": ("cls", lambda m: m["codecs"].insert(1, {"name": "zstd"}),
                                   "cls: its metadata does not parse"),
    "a codec the format never writes": ("cls", lambda m: m["codecs"].insert(1, {"name": "numcodecs.lzma",
                                                                                "configuration": {}}),
                                        "codecs numcodecs.lzma are not among those the format writes"),
}


@pytest.mark.parametrize("forgery", list(FORGED_METADATA))
def test_forged_array_metadata_is_refused_before_any_allocation(forged, forgery):
    """``verify`` reports the refusal as the group's problem (exit 1); the reader (training, eval, show) raises it."""
    node, change, refusal = FORGED_METADATA[forgery]
    edit_json(forged / TEACHER / node, change)
    result, printed = run_capped(cli("verify", str(forged)))
    assert result == "RESULT exit 1" and refusal in printed, (result, printed[-2000:])
    result, printed = run_capped(f"from dune_cache import CacheReader; CacheReader({str(forged)!r})")
    assert result.startswith("RESULT raised StoreError") and refusal in result, (result, printed[-2000:])


def test_info_refuses_forged_metadata_in_one_line(forged):
    edit_json(forged / TEACHER / "status", shaped([10 ** 12]))
    result, printed = run_capped(cli("info", str(forged)))
    lines = [line for line in printed.splitlines() if line.startswith("error: ")]
    assert result == "RESULT exit 2" and len(lines) == 1 and "status: declares shape (1000000000000,)" in lines[0]


def test_forged_statistics_are_refused_before_they_are_read(forged):
    edit_json(forged / TEACHER / "stats" / "phis_matrix", shaped([10 ** 6, 10 ** 6], [10 ** 6, 10 ** 6]))
    result, printed = run_capped(f"from dune_cache import read_stats; read_stats({str(forged)!r}, {TEACHER!r})")
    assert result.startswith("RESULT raised StoreError") and "phis_matrix: declares shape (1000000, 1000000), " \
                                                              "expected (16, 16)" in result, (result, printed[-2000:])


def test_a_forged_failure_record_array_is_refused_before_it_is_read(forged):
    """An earlier version's record array (read where no records group exists) declaring 10**12 bytes."""
    group = zarr.open_group(str(forged / TEACHER / "failures"), mode="r+")
    group.create_array("unit_00000000", shape=(10 ** 12,), chunks=(10 ** 12,), dtype="uint8", compressors=())
    result, printed = run_capped(cli("verify", str(forged)))
    assert result == "RESULT exit 1" and "failures/unit_00000000: the array decodes to 1000000000000 bytes" \
        in printed, (result, printed[-2000:])


def test_forged_image_copy_offsets_are_refused_before_the_bytes_are_read(forged):
    offsets = zarr.open_array(str(forged / "images" / "offsets"), mode="r+")
    offsets[1] = 10 ** 12  # image 0 would span a terabyte
    code = (f"from dune_cache import CacheReader\nimport numpy as np\nr = CacheReader({str(forged)!r})\n"
            "r.image_bytes(np.array([0]))")
    result, printed = run_capped(code)
    assert result.startswith("RESULT raised ImageCopyError") and "point outside its bytes" in result, \
        (result, printed[-2000:])


# ---------------------------------------------------------------------------------------
# Manifest ids that leave the image folder
# ---------------------------------------------------------------------------------------
ESCAPING_IDS = ("../outside.png", "/{root}/outside_too.png")


def forge_manifest(cache: Path, ids: list[str]) -> None:
    """Replace the group's manifest by ``ids`` (as a cache maker could)."""
    group = zarr.open_group(str(cache / TEACHER), mode="r+")
    attributes = dict(group["manifest"].attrs)
    text = np.frombuffer("".join(f"{i}\n" for i in ids).encode("utf-8"), dtype=np.uint8)
    del group["manifest"]
    group.create_array("manifest", data=text, chunks=(len(text),), attributes=attributes)


@pytest.fixture
def escaping(tmp_path, forged, real_image_dir) -> tuple[Path, Path, list[str]]:
    """The forged cache with its first two ids leaving its image folder (a copy of the photos) for real images
    there; (cache, image folder, ids)."""
    images = tmp_path / "images"
    shutil.copytree(real_image_dir, images)
    ids = list(TeacherStore.open(str(forged), TEACHER).manifest().ids)
    ids[:2] = [ESCAPING_IDS[0], ESCAPING_IDS[1].format(root=str(tmp_path).strip("/"))]
    for name in ("outside.png", "outside_too.png"):
        Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / name)
    forge_manifest(forged, ids)
    store = TeacherStore.open(str(forged), TEACHER, mode="a")
    store.group.attrs["dune_cache"] = {**store.provenance,
                                       "source": {**store.provenance["source"], "images": str(images)},
                                       "images": {**store.provenance["images"],
                                                  "manifest_sha256": store.manifest().sha256}}
    return forged, images, ids


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_cache_show_reads_nothing_outside_the_image_folder_and_writes_only_into_out(tmp_path, escaping, monkeypatch):
    cache, images, ids = escaping
    read = []
    monkeypatch.setattr(show_module, "open_rgb", lambda path, *a, **k: read.append(Path(path)) or open_rgb(path))
    before = files_under(tmp_path)
    result = runner.invoke(app, ["show", str(cache), "--out", str(tmp_path / "pics"), "--first", "6", "--cell", "32"])
    assert result.exit_code == 0, result.output
    assert read and all(images in path.parents for path in read), read
    for image_id in ids[:2]:
        assert f"{image_id}: input image not drawn: {image_id!r} is not under the image folder" in result.output
    written = files_under(tmp_path) - before
    assert written and all((tmp_path / "pics") in path.parents for path in written), written


def test_student_show_refuses_an_id_outside_the_image_folder(tmp_path, escaping, clean, real_image_dir,
                                                             monkeypatch):
    cache, images, ids = escaping
    train(config(clean, real_image_dir, tmp_path / "run", "steps=1"))
    read = []
    real_load = student_show_module.load_pixels
    monkeypatch.setattr(student_show_module, "load_pixels",
                        lambda path, *a: read.append(Path(path)) or real_load(path, *a))
    result = runner.invoke(student_app, ["show", str(tmp_path / "run"), "--cache", str(cache), "--images", ids[0],
                                         "--out", str(tmp_path / "pics")])
    assert_one_paragraph_error(result, f"{ids[0]!r} is not under the image folder", "--image-root")
    assert not read and not (tmp_path / "pics").exists()


def test_show_takes_absolute_ids_from_a_list_file_of_the_users_own(tmp_path, clean, real_image_dir):
    """A cache made from a list of absolute paths: show reads them through the user's list (--image-root)."""
    listing = tmp_path / "mine.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted(real_image_dir.iterdir())))
    cache = tmp_path / "abs.zarr"
    run_extraction(ExtractConfig(teacher=TEACHER, images=listing, out=str(cache), checkpoint=None,
                                 random_weights=True, student_patch=8, student_resolution="32", batch_size=6,
                                 num_workers=0, progress=False))
    without = runner.invoke(app, ["show", str(cache), "--out", str(tmp_path / "a"), "--first", "1", "--cell", "32"])
    assert without.exit_code == 0 and "is not under the image folder" in without.output
    listed = runner.invoke(app, ["show", str(cache), "--out", str(tmp_path / "b"), "--first", "2", "--cell", "32",
                                 "--image-root", str(listing)])
    assert listed.exit_code == 0 and "not drawn" not in listed.output, listed.output


def test_repair_refuses_a_recorded_image_list_that_leaves_its_folder(tmp_path, real_image_dir, tiny_checkpoint,
                                                                     snapshot):
    """The damaged image is the one outside the list's folder: re-extracting it would read it."""
    folder = tmp_path / "list"
    shutil.copytree(real_image_dir, folder)
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "outside.png")
    listing = folder / "list.txt"
    listing.write_text("../outside.png\n" + "".join(f"{p.name}\n" for p in sorted(real_image_dir.iterdir())))
    cache = tmp_path / "cache.zarr"
    run_extraction(ExtractConfig(teacher=TEACHER, images=listing, out=str(cache), checkpoint=tiny_checkpoint,
                                 batch_size=1, num_workers=0, progress=False))
    (cache / TEACHER / "cls" / "c" / "0" / "0").write_bytes(b"damaged")
    before = snapshot(cache)
    result = runner.invoke(app, ["repair", str(cache), "--no-progress", "--num-workers", "0"])
    assert_one_paragraph_error(result, f"the image list its provenance names ({listing}) lists 1 image(s) outside "
                                       "its folder (e.g. '../outside.png'", "pass --images")
    assert snapshot(cache) == before
    vouched = runner.invoke(app, ["repair", str(cache), "--no-progress", "--num-workers", "0", "--images",
                                  str(listing)])
    assert vouched.exit_code == 0 and "repaired: 1 of 1 images re-extracted" in vouched.output, vouched.output


def test_add_images_reads_only_the_users_images(tmp_path, escaping, monkeypatch):
    """Ids come from the user's --images, which must list exactly the cache's manifest: a forged one is refused
    before any image is read (safe before this issue too: a guard)."""
    cache, images, _ = escaping
    read = []
    real_load = add_images_module.load_pixels
    monkeypatch.setattr(add_images_module, "load_pixels", lambda path, *a: read.append(path) or real_load(path, *a))
    result = runner.invoke(app, ["add-images", str(cache), "--images", str(images), "--resolution", "32",
                                 "--overwrite"])
    assert_one_paragraph_error(result, f"--images {images} is not the image set cache {cache} was extracted from")
    assert not read


# ---------------------------------------------------------------------------------------
# Decompression bombs
# ---------------------------------------------------------------------------------------
def png_bomb(path: Path, width: int, height: int) -> bytes:
    """A valid 1-bit PNG of ``width x height`` black pixels, a few kB on disk (what it costs decoded: 3 bytes a
    pixel once converted to RGB)."""
    row = b"\0" * (1 + (width + 7) // 8)
    compressor, data = zlib.compressobj(9), b""
    for _ in range(height):
        data += compressor.compress(row)
    data += compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
           + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    path.write_bytes(png)
    return png


@pytest.mark.parametrize("side", [10_000, 30_000], ids=["warning-range", "error-range"])  # PIL: 1x, 2x its limit
def test_a_decompression_bomb_is_recorded_too_large_not_decoded(tmp_path, real_image_dir, tiny_checkpoint,
                                                                monkeypatch, side):
    """Also when another library switched PIL's own check off (``Image.MAX_IMAGE_PIXELS = None``)."""
    images = tmp_path / "images"
    shutil.copytree(real_image_dir, images)
    png_bomb(images / "bomb.png", side, side)
    assert side * side > MAX_IMAGE_PIXELS
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageDecodeError, match="too_large|more than"):
        open_rgb(images / "bomb.png")
    run_extraction(ExtractConfig(teacher=TEACHER, images=images, out=str(tmp_path / "c.zarr"),
                                 checkpoint=tiny_checkpoint, batch_size=7, num_workers=0, progress=False))
    [record] = TeacherStore.open(str(tmp_path / "c.zarr"), TEACHER).read_failures()
    assert (record["image_id"], record["reason"]) == ("bomb.png", "too_large")


def test_pil_refuses_a_bomb_by_itself_in_the_warning_range(tmp_path):
    """PIL's DecompressionBombWarning (between 1x and 2x its limit) is an error in open_rgb, not a warning."""
    png_bomb(tmp_path / "bomb.png", 10_000, 10_000)
    with pytest.raises(ImageDecodeError) as refused:
        open_rgb(tmp_path / "bomb.png")
    assert refused.value.reason == "too_large"


def test_device_decoding_checks_the_header_before_torchvision_allocates(tmp_path):
    """data.image_decode=device hands file bytes (maybe a cache's image copy) to torchvision: a bomb is a DataError
    naming the image, decoded by nobody."""
    bomb = png_bomb(tmp_path / "bomb.png", 10_000, 10_000)
    images = EncodedImages(data=[torch.frombuffer(bytearray(bomb), dtype=torch.uint8)],
                           crops=[full_grid_crop((4, 4))], grid=(4, 4), size=(32, 32), names=["bomb.png (cache copy)"])
    with pytest.raises(DataError, match=r"training image bomb.png \(cache copy\): .*100000000 pixels"):
        decode_crops(images, "cpu")
