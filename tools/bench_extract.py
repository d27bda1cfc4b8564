"""Extraction throughput vs. bare teacher-forward throughput, side by side in one run.

    python tools/bench_extract.py                      # real offline DINOv2 ViT-S/14 on the demo's photos
    python tools/bench_extract.py --teacher mast3r --random-weights --device cuda --batch-size 64 --images DIR

Bare forward: images decoded and resized once, kept in memory as uint8; timed = host->device copy +
teacher forward (inference_mode, bf16 autocast on CUDA) + synchronise. Extraction: the full
``dune-cache extract`` pipeline (decode in DataLoader workers, forward, checks, compressed Zarr writes)
into a fresh cache. Same images, batch size, device and teacher; rounds alternate A/B and the median
of each is reported, with ratio = extraction img/s / forward img/s.

CPU: CPU-seconds per image of each (this process's threads, plus the DataLoader workers once reaped), their
ratio (``cpu_ratio``, the figure a loaded machine disturbs least) and the extraction's CPU per image by thread
(``workers``: image decoding; ``MainThread`` and ``native``: the loop and torch's intra-op threads;
``dune-cache-writer*`` and ``zarr_pool``: encoding, compression and writes), with the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import torch

import dune_cache.extract.pipeline as extract_module
from dune_cache.config import ExtractConfig
from dune_cache.extract.pipeline import teacher_features
from dune_cache.extract.run import run_extraction
from dune_cache.utils.runtime import default_num_workers, pick_device
from dune_cache.teachers.geometry import resolve_geometry
from dune_cache.images.manifest import load_manifest
from dune_cache.images.decode import load_pixels
from dune_cache.offline.catalogue import AUTO, resolve_checkpoint_option
from dune_cache.config import StorageConfig
from dune_cache.teachers import create_teacher


def replicate_images(src: Path, count: int, out: Path) -> Path:
    """A folder of ``count`` symlinks cycling over the images of ``src`` (distinct ids, same pixels)."""
    manifest = load_manifest(src)
    out.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        source = manifest.path(k % len(manifest))
        (out / f"{k:06d}{source.suffix}").symlink_to(source.resolve())
    return out


def cpu_seconds() -> float:
    """CPU seconds of this process's threads and of its finished children (the DataLoader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class ThreadCpu:
    """CPU seconds per thread name between :meth:`start` and :meth:`stop`: polls ``/proc/self/task/*/stat`` (a
    thread that ends between two polls loses at most one interval). Python threads by their name (``MainThread``:
    the loop and the forward's first thread), the others (torch's intra-op threads, ...) as ``native``."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.seen, self.first = interval, {}, {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, name="bench-thread-cpu", daemon=True)

    def start(self) -> None:
        self._sample()
        self.first = dict(self.seen)
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()
        self._sample()

    def _poll(self) -> None:
        while not self.done.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        names = {t.native_id: t.name for t in threading.enumerate()}
        for task in Path("/proc/self/task").iterdir():
            try:
                text = (task / "stat").read_text()
            except OSError:  # the thread ended
                continue
            fields = text[text.rindex(")") + 2:].split()
            name = names.get(int(task.name), self.seen.get(task.name, ("native",))[0])
            self.seen[task.name] = (name, (int(fields[11]) + int(fields[12])) / tick)

    def by_name(self) -> dict[str, float]:
        """CPU seconds, summed over threads whose names differ only in a trailing number."""
        totals: Counter = Counter()
        for tid, (name, cpu) in self.seen.items():
            totals[name.rstrip("0123456789_-")] += cpu - self.first.get(tid, (name, 0.0))[1]
        return {name: cpu for name, cpu in totals.most_common() if cpu > 0}


class TimedWriter(extract_module.FeatureWriter):
    """The extraction's writer, also timing CPU over the window ``ExtractResult.seconds`` covers: from the writer's
    creation to its close (the DataLoader workers have ended and been reaped by then)."""

    window: dict = {}

    def __init__(self, *args, **kwargs):
        TimedWriter.window = {"cpu": cpu_seconds(), "threads": ThreadCpu()}
        TimedWriter.window["threads"].start()
        super().__init__(*args, **kwargs)

    def close(self) -> None:
        super().close()
        self.window["threads"].stop()
        self.window["cpu"] = cpu_seconds() - self.window["cpu"]


def bare_forward_rate(teacher, pixels: torch.Tensor, batch_size: int, device: torch.device,
                      amp: bool) -> tuple[float, float]:
    """(images/s, CPU-s per image) of host->device + forward + sync over in-memory uint8 ``pixels`` ``(N, 3, H, W)``."""
    if device.type == "cuda":
        pixels = pixels.pin_memory()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start, cpu = time.perf_counter(), cpu_seconds()
    for lo in range(0, len(pixels), batch_size):
        teacher_features(teacher, pixels[lo:lo + batch_size], device, amp)
    sync()
    return len(pixels) / (time.perf_counter() - start), (cpu_seconds() - cpu) / len(pixels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="dinov2_vits14")
    parser.add_argument("--checkpoint", type=Path, default=Path(AUTO),
                        help="teacher checkpoint (default: the offline one, `dune-cache teachers --offline`)")
    parser.add_argument("--random-weights", action="store_true", help="ignore --checkpoint (speed only)")
    parser.add_argument("--images", type=Path, default=Path("demo/train/photos"),
                        help="image folder, cycled (default: the demo's photos, made by `make demo`)")
    parser.add_argument("--count", type=int, default=96, help="images per round (source images are cycled)")
    parser.add_argument("--resolution", default="224")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=None, help="default: as dune-cache extract")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--codec", default=StorageConfig.codec)
    parser.add_argument("--writer-threads", type=int, default=ExtractConfig.writer_threads)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="intra-op threads for the forward in both measurements (CPU); default: torch's")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    extract_module.FeatureWriter = TimedWriter
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = pick_device(args.device)
    checkpoint = None if args.random_weights else resolve_checkpoint_option(args.teacher, args.checkpoint)
    teacher = create_teacher(args.teacher, checkpoint).to(device)
    geometry = resolve_geometry(teacher.spec, args.resolution)
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        images = replicate_images(args.images, args.count, work / "images")
        manifest = load_manifest(images)
        pixels = torch.stack([torch.from_numpy(load_pixels(manifest.path(i), geometry.resolution, geometry.resize))
                              for i in range(len(manifest))])
        bare_forward_rate(teacher, pixels[: args.batch_size], args.batch_size, device, True)  # warm-up
        forward, extract, threads, loads = [], [], [], [os.getloadavg()[0]]
        for r in range(args.rounds):
            forward.append(bare_forward_rate(teacher, pixels, args.batch_size, device, True))
            cfg = ExtractConfig(teacher=args.teacher, images=images, out=str(work / f"cache{r}"),
                                checkpoint=checkpoint, random_weights=checkpoint is None,
                                resolution=args.resolution, batch_size=args.batch_size,
                                num_workers=args.num_workers, writer_threads=args.writer_threads,
                                device=str(device), progress=False, storage=StorageConfig(codec=args.codec))
            rate = run_extraction(cfg).images_per_s
            extract.append((rate, TimedWriter.window["cpu"] / args.count))
            per_thread = TimedWriter.window["threads"].by_name()
            threads.append({"workers": round((TimedWriter.window["cpu"] - sum(per_thread.values())) / args.count, 4),
                            **{name: round(cpu / args.count, 4) for name, cpu in per_thread.items()}})
            loads.append(os.getloadavg()[0])
            print(f"round {r}: forward {forward[-1][0]:.2f} img/s ({forward[-1][1]:.3f} CPU-s/img), extraction "
                  f"{extract[-1][0]:.2f} img/s ({extract[-1][1]:.3f} CPU-s/img; per thread {threads[-1]}), "
                  f"load {loads[-1]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fwd, ext = statistics.median(f for f, _ in forward), statistics.median(e for e, _ in extract)
    fwd_cpu, ext_cpu = statistics.median(c for _, c in forward), statistics.median(c for _, c in extract)
    result = {
        "teacher": args.teacher, "weights": "random" if checkpoint is None else str(checkpoint),
        "resolution": list(geometry.resolution), "images_per_round": args.count, "batch_size": args.batch_size,
        "num_workers": args.num_workers if args.num_workers is not None else default_num_workers(device),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "codec": args.codec,
        "writer_threads": args.writer_threads,
        "forward_img_s": round(fwd, 3), "extract_img_s": round(ext, 3), "ratio": round(ext / fwd, 3),
        "forward_cpu_s_per_img": round(fwd_cpu, 4), "extract_cpu_s_per_img": round(ext_cpu, 4),
        "cpu_ratio": round(fwd_cpu / ext_cpu, 3), "extract_cpu_s_per_img_by_thread": threads,
        "load_average": [round(min(loads), 2), round(max(loads), 2)], "rounds": args.rounds,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
