"""One GPU check: what docs/scale.md derives, measured on the machine it runs on.

    python tools/gpu_check.py                       # on one H100: DUNE's shapes, ~6 min;
                                                    # writes docs/results/gpu_check.json
    python tools/gpu_check.py --tiny --out /tmp/gc  # tiny shapes on the CPU (the test suite runs this)

Every figure is measured in this run, on this machine (recorded in the JSON: device, torch, CUDA, CPU cores):

1. **training steps/s, cached vs live** at DUNE's shapes: a ViT-B/14 student at 336 px with one transformer projector
   per teacher, three random-weight ViT-L teachers (``dinov2_vitl14_reg4``, ``mast3r``, ``multihmr``, on the shared
   24×24 grid) read from a cache, against the same teachers run live on every step (``live_teachers=true``);
2. **host syncs per training step** on the device: ``torch.cuda.set_sync_debug_mode("warn")`` during the steady-state
   steps (the loader's fetch and the read points left out, as the test suite counts them on the CPU);
3. **host→device copies**: of the copies the profiler sees in two steps, how many come from pinned memory (they can
   overlap compute) and how many from pageable memory (they block);
4. **attention**: xformers against SDPA in the student, same weights: largest difference and forward+backward time;
5. **extraction** images/s of a random-weight ViT-L teacher at 448 px through the real pipeline and writer, and the
   process's CPU-seconds per image (the writer's host share);
6. **on-device JPEG decode** images/s (torchvision's batched ``decode_jpeg``, nvJPEG) of 500 px JPEGs;
7. **lowrank encode/decode** images/s (``lowrank:image_rank=64,basis=int8`` on ViT-L-shaped 32×32×1024 features).

A stage whose package is missing (xformers) or that needs CUDA (nvJPEG) is reported as not run, with the reason.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dune_cache.commands.stats import compute_stats
from dune_cache.config import EncodingConfig, ExtractConfig, StorageConfig
from dune_cache.encodings import Encoding
from dune_cache.extract.run import run_extraction
from dune_cache.format.stats import write_stats
from dune_student.config import load_config
from dune_student.model.attention import xformers_import_error
from dune_student.model.student import Student
from dune_student.training.trainer import Trainer


@dataclass(frozen=True)
class Shapes:
    """What one run measures at: the student, its teachers (each on the student's grid), batch and step counts."""

    student: str
    patch: int
    resolution: int
    teachers: tuple[str, ...]
    images: int
    batch: int
    steps: int
    extract_teacher: str
    extract_resolution: int
    extract_images: int
    feature_grid: int
    feature_dim: int
    jpeg_side: int


DUNE = Shapes(student="vit_base", patch=14, resolution=336, teachers=("dinov2_vitl14_reg4", "mast3r", "multihmr"),
              images=512, batch=64, steps=30, extract_teacher="dinov2_vitl14_reg4", extract_resolution=448,
              extract_images=512, feature_grid=32, feature_dim=1024, jpeg_side=500)
TINY = Shapes(student="vit_tiny", patch=14, resolution=56, teachers=("dinov2_vits14",), images=12, batch=4, steps=4,
              extract_teacher="dinov2_vits14", extract_resolution=56, extract_images=8, feature_grid=4,
              feature_dim=64, jpeg_side=64)


def synthetic_jpegs(folder: Path, count: int, side: int, seed: int = 0) -> Path:
    """``count`` smooth random JPEGs of ``side`` px (content does not matter for speed)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((side, side), Image.BICUBIC).save(folder / f"img{i:05d}.jpg", quality=90)
    return folder


def seconds_of(work) -> tuple[float, float]:
    """(wall s, process CPU s) of ``work()``, the device drained before and after."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def extract(images: Path, out: Path, teacher: str, shapes: Shapes, resolution: str, device: str) -> dict:
    """One random-weight teacher over ``images`` into ``out``; images/s and CPU-s per image of the whole run."""
    cfg = ExtractConfig(teacher=teacher, images=images, out=str(out), checkpoint=None, device=device,
                        batch_size=shapes.batch, progress=False, student_patch=shapes.patch,
                        student_resolution=resolution, random_weights=True, storage=StorageConfig())
    result = {}
    wall, cpu = seconds_of(lambda: result.setdefault("r", run_extraction(cfg)))
    processed = result["r"].processed
    return {"teacher": teacher, "images": processed, "images_per_s": processed / wall,
            "cpu_s_per_image": cpu / processed}


def build_cache(work: Path, shapes: Shapes, device: str) -> tuple[Path, Path]:
    """Images and a cache of every teacher of ``shapes`` on the student's grid, with statistics."""
    images = synthetic_jpegs(work / "images", shapes.images, shapes.jpeg_side)
    cache = work / "cache.zarr"
    for teacher in shapes.teachers:
        extract(images, cache, teacher, shapes, str(shapes.resolution), device)
        name = teacher.replace(":", "-")
        write_stats(str(cache), name, compute_stats(str(cache), name))
    return images, cache


def train_config(cache: Path, images: Path, out: Path, shapes: Shapes, device: str, *extra: str):
    return load_config(None, [f"data.cache={cache}", f"data.images={images}", f"out={out}", f"device={device}",
                              f"student.arch={shapes.student}", f"student.patch_size={shapes.patch}",
                              f"data.resolution={shapes.resolution}", f"data.batch_size={shapes.batch}",
                              f"steps={shapes.steps}", f"log_every={shapes.steps // 2}",
                              f"checkpoint_every={shapes.steps}", "progress=false", *extra])


def steady_steps_per_s(out: Path) -> float:
    """Steps/s of the second half of a run (its last logged interval): images/s ÷ batch."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "images_per_s" in r][-1]
    return last["images_per_s"]


def training(cache: Path, images: Path, work: Path, shapes: Shapes, device: str) -> dict:
    """Cached and live training side by side: steady-state images/s and steps/s of each, and their ratio."""
    rows = {}
    for mode, extra in (("cached", ()), ("live", ("live_teachers=true",))):
        out = work / f"run_{mode}"
        Trainer(train_config(cache, images, out, shapes, device, *extra)).run()
        rate = steady_steps_per_s(out)
        rows[mode] = {"images_per_s": rate, "steps_per_s": rate / shapes.batch}
    rows["cached_over_live"] = rows["cached"]["images_per_s"] / rows["live"]["images_per_s"]
    return rows


@contextlib.contextmanager
def sync_counting(enabled: bool):
    """While active, every device→host synchronisation emits a warning (CUDA's sync debug mode); yields the list of
    them."""
    seen: list[str] = []
    if not enabled:
        yield seen
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode("default")
            seen.extend(str(w.message) for w in caught if "synchroniz" in str(w.message).lower())


def syncs_and_copies(cache: Path, images: Path, work: Path, shapes: Shapes, device: str) -> dict:
    """Host syncs per steady-state step (CUDA only) and the host→device copies of two steps by memory kind."""
    cuda = torch.device(device).type == "cuda"
    trainer = Trainer(train_config(cache, images, work / "run_syncs", shapes, device))
    per_step, copies = [], {"pinned": 0, "pageable": 0}
    real_step = Trainer.train_step

    def counted_step(self, batch):
        with sync_counting(cuda) as seen:
            real_step(self, batch)
            if cuda:
                torch.cuda.synchronize()  # the step's own work, not the next step's, is what the mode saw
        per_step.append(len(seen) - (1 if cuda else 0))  # the synchronize above is ours

    Trainer.train_step = counted_step
    try:
        trainer.run()
    finally:
        Trainer.train_step = real_step
    result = {"syncs_per_step": per_step[2:] if cuda else None,
              "syncs_note": None if cuda else "needs CUDA (the suite counts them on the CPU: tests/test_hot_path.py)"}
    if cuda:
        from torch.profiler import ProfilerActivity, profile

        trainer = Trainer(train_config(cache, images, work / "run_profile", replace(shapes, steps=4), device))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            trainer.run()
        for event in prof.events():
            name = event.name.lower()
            if "memcpy htod" in name:
                copies["pinned" if "pinned" in name else "pageable"] += 1
        result["host_to_device_copies"] = copies
    return result


def attention(shapes: Shapes, device: str) -> dict:
    """xformers vs SDPA in the student: same weights, largest output difference, forward+backward ms."""
    missing = xformers_import_error()
    if missing or torch.device(device).type != "cuda":
        return {"run": False, "why": missing or "xformers runs on CUDA only"}
    cfg = load_config(None, [f"student.arch={shapes.student}", f"student.patch_size={shapes.patch}"]).student
    x = torch.randn(shapes.batch, 3, shapes.resolution, shapes.resolution, device=device)
    outputs, times = {}, {}
    torch.manual_seed(0)
    reference = Student(replace(cfg, attention="sdpa"), device=device).to(device)
    for backend in ("sdpa", "xformers"):
        student = Student(replace(cfg, attention=backend), device=device).to(device)
        student.load_state_dict(reference.state_dict())
        with torch.autocast("cuda", torch.bfloat16):
            outputs[backend] = student(x).patch.float()

        def step():
            with torch.autocast("cuda", torch.bfloat16):
                student(x).patch.float().square().mean().backward()

        step()
        times[backend] = min(seconds_of(step)[0] for _ in range(5)) * 1e3
    return {"run": True, "max_abs_difference": float((outputs["sdpa"] - outputs["xformers"]).abs().max()),
            "forward_backward_ms": times}


def jpeg_decode(images: Path, device: str) -> dict:
    """Images/s of torchvision's batched ``decode_jpeg`` on the device (nvJPEG)."""
    if torch.device(device).type != "cuda":
        return {"run": False, "why": "nvJPEG needs CUDA"}
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in sorted(images.glob("*.jpg"))]
    decode_jpeg(data[:8], mode=ImageReadMode.RGB, device=device)
    wall, _ = seconds_of(lambda: decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    return {"run": True, "images": len(data), "images_per_s": len(data) / wall}


def lowrank(shapes: Shapes, device: str) -> dict:
    """Images/s of the recommended lowrank encoding's encode and decode on the device, ViT-L-shaped features."""
    g, d = shapes.feature_grid, shapes.feature_dim
    generator = torch.Generator().manual_seed(0)
    spectrum = torch.arange(1, d + 1, dtype=torch.float32) ** -0.7
    basis = torch.linalg.qr(torch.randn(d, d, generator=generator)).Q
    x = ((torch.randn(shapes.batch, g * g, d, generator=generator) * spectrum) @ basis.T).reshape(
        shapes.batch, g, g, d).to(device)
    config = EncodingConfig.parse("lowrank:image_rank=64,basis=int8")
    scheme = Encoding.calibrate(config, d, "float16", {"cls": x[:, 0, 0].cpu().numpy(),
                                                      "patch": x.cpu().numpy()}).schemes["patch"]
    parts = scheme.encode_tensor(x)
    encode_s, _ = seconds_of(lambda: scheme.encode_tensor(x))
    decode_s, _ = seconds_of(lambda: scheme.decode(parts, device))
    return {"images": shapes.batch, "encode_images_per_s": shapes.batch / encode_s,
            "decode_images_per_s": shapes.batch / decode_s}


def machine(device: str) -> dict:
    info = {"device": device, "torch": torch.__version__, "cpu_cores": os.cpu_count(), "platform": platform.platform()}
    if torch.device(device).type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return info


def table(result: dict) -> str:
    """The measurements as a markdown table."""
    rows = [("machine", json.dumps(result["machine"]))]
    t = result["training"]
    rows += [("training images/s cached / live", f"{t['cached']['images_per_s']:.1f} / {t['live']['images_per_s']:.1f}"
              f" ({t['cached_over_live']:.2f}x)")]
    s = result["syncs"]
    rows += [("host syncs per steady-state step", str(s["syncs_per_step"]) if s["syncs_per_step"] is not None
              else s["syncs_note"])]
    if "host_to_device_copies" in s:
        rows += [("host→device copies (2 steps): pinned / pageable",
                  f"{s['host_to_device_copies']['pinned']} / {s['host_to_device_copies']['pageable']}")]
    a = result["attention"]
    rows += [("xformers vs SDPA", f"max |diff| {a['max_abs_difference']:.3g}, fwd+bwd ms {a['forward_backward_ms']}"
              if a["run"] else f"not run: {a['why']}")]
    e = result["extraction"]
    rows += [(f"extraction {e['teacher']} at {result['shapes']['extract_resolution']} px",
              f"{e['images_per_s']:.1f} images/s, {1e3 * e['cpu_s_per_image']:.1f} CPU ms per image")]
    j = result["jpeg_decode"]
    rows += [("on-device JPEG decode", f"{j['images_per_s']:.0f} images/s" if j["run"] else f"not run: {j['why']}")]
    lr = result["lowrank"]
    rows += [("lowrank rank 64 basis=int8 encode / decode",
              f"{lr['encode_images_per_s']:.0f} / {lr['decode_images_per_s']:.0f} images/s")]
    return "| measured | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU; the suite runs this)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("docs/results"),
                        help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = TINY if args.tiny else DUNE
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        work = args.work or Path(scratch)
        images, cache = build_cache(work, shapes, device)
        extraction_images = synthetic_jpegs(work / "extract_images", shapes.extract_images, shapes.jpeg_side, seed=1)
        result = {"shapes": shapes.__dict__, "machine": machine(device),
                  "training": training(cache, images, work, shapes, device),
                  "syncs": syncs_and_copies(cache, images, work, shapes, device),
                  "attention": attention(shapes, device),
                  "extraction": extract(extraction_images, work / "extract.zarr", shapes.extract_teacher, shapes,
                                        str(shapes.extract_resolution), device),
                  "jpeg_decode": jpeg_decode(extraction_images, device),
                  "lowrank": lowrank(shapes, device)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = table(result)
    (args.out / "gpu_check.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
