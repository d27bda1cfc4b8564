"""Training throughput from the cache vs. live teachers vs. targets already in memory, side by side.

    python tools/bench_train.py --cache e2e/train.zarr --images e2e/train \
        --teacher-checkpoint dinov2_vits14=$(dune-cache teachers --path dinov2_vits14) \
        --teacher-checkpoint mobilenet_v2=$(dune-cache teachers --path mobilenet_v2)

Same student, teachers, images, batch, augmentation and seed in every mode; rounds alternate the
modes and medians are reported. Throughput is the steady state: steps/s from the trainer's metrics
between log points, the first interval (worker start-up, warm-up) dropped.
- cached: targets read through ``CacheReader`` (backend ``auto``) in DataLoader workers;
- memory: the same with ``reader_backend=memory`` (whole cache decoded into RAM first);
- live: the teachers run in the loop on the same crops (``live_teachers``).
Ratios: cached/live (target >= 3 for a DUNE-like setup) and cached/memory (target >= 0.90).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from dune_student.config import load_config
from dune_student.runs.layout import METRICS
from dune_student.training.trainer import train

MODES = {"cached": [], "memory": ["data.reader_backend=memory"], "live": ["live_teachers=true"]}


def steady_steps_per_s(run_dir: Path, batch_size: int) -> float:
    """Median steps/s over the logged intervals after the first."""
    records = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]
    rates = [r["images_per_s"] / batch_size for r in records[1:]]
    if not rates:
        raise RuntimeError("run too short: increase --steps relative to --log-every")
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--teacher-checkpoint", action="append", default=[], metavar="GROUP=PATH")
    parser.add_argument("--arch", default="vit_tiny")
    parser.add_argument("--patch", type=int, default=14)
    parser.add_argument("--resolution", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=-1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--modes", default="cached,memory,live")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    checkpoints = ",".join(item.replace("=", ":", 1) for item in args.teacher_checkpoint)
    common = [f"data.cache={args.cache}", f"data.images={args.images}", f"steps={args.steps}",
              f"student.arch={args.arch}", f"student.patch_size={args.patch}", f"student.img_size={args.resolution}",
              f"data.resolution={args.resolution}", f"data.batch_size={args.batch_size}",
              f"data.num_workers={args.workers}", f"log_every={args.log_every}", f"checkpoint_every={10 ** 9}",
              "progress=false", f"device={args.device}"] + ([f"teacher_checkpoints={checkpoints}"]
                                                            if checkpoints else [])
    modes = args.modes.split(",")
    rates: dict[str, list[float]] = {m: [] for m in modes}
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        for r in range(args.rounds):
            for mode in modes:
                out = work / f"{mode}{r}"
                train(load_config(None, common + MODES[mode] + [f"out={out}"]))
                rates[mode].append(steady_steps_per_s(out, args.batch_size))
                print(f"round {r} {mode}: {rates[mode][-1]:.3f} steps/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    median = {m: statistics.median(v) for m, v in rates.items()}
    result = {
        "steps_per_s": {m: round(v, 4) for m, v in median.items()},
        "cached_over_live": round(median["cached"] / median["live"], 3) if {"cached", "live"} <= set(modes) else None,
        "cached_over_memory": (round(median["cached"] / median["memory"], 3) if {"cached", "memory"} <= set(modes)
                               else None),
        "setup": {"cache": args.cache, "student": args.arch, "patch": args.patch, "resolution": args.resolution,
                  "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
                  "device": args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"),
                  "cpu_count": os.cpu_count(), "machine": platform.machine()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
