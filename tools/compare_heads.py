"""SAK student vs DUNE transformer heads vs UNIC ladder, same steps, on the real offline teachers.

Runs (resumable: a step whose outputs exist is skipped) on the demo's images (``make demo`` or
``python tools/prepare_demo.py --out demo`` and ``python tools/prepare_probe_data.py --out demo/probe`` first):

1. ``dune-cache extract`` of DINOv2 ViT-S/14 **with ``--blocks sak``** (levels [2, 5, 8, 11]) and MobileNetV2 (a CNN:
   no levels, distilled on its final features) over ``demo/train`` and ``demo/heldout`` on the shared 8 x 8 grid
   (student ViT-Tiny/14 at 112 px) into ``OUT/train.zarr`` / ``OUT/heldout.zarr``; ``dune-cache stats``.
2. ``dune-student train`` three times, the demo's recipe and seed, ``--heads transformer|ladder|sak``.
3. ``dune-student eval`` (held-out fidelity of the final prediction), the per-level held-out fidelity of the SAK
   student (this script: each level's prediction against the teacher's stored block, in the run's standardised
   target space), and ``dune-student probe`` on ``demo/probe`` for each.
4. ``dune-student route`` on the SAK run (routers + light heads per task), picture ``docs/img/sak_router_weights.png``.

Writes ``OUT/compare.json`` and prints a markdown summary (docs/training.md, "SAK", quotes it with the command).
Usage: ``python tools/compare_heads.py --demo demo --out runs/compare --steps 250`` (the demo recipe)
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HEADS = ("transformer", "ladder", "sak")
TEACHERS = {"dinov2_vits14": ["--blocks", "sak"], "mobilenet_v2": []}
GRID = ["--student-patch", "14", "--student-resolution", "112"]
RECIPE = ["student.arch=vit_tiny", "student.patch_size=14", "student.img_size=112", "data.resolution=112",
          "data.batch_size=16", "optim.base_lr=8e-3", "log_every=10", "seed=0"]  # the demo's (tools/run_demo.py)


def tool(name: str) -> str:
    """The console script ``name`` of this interpreter's environment."""
    found = Path(sys.executable).parent / name
    return str(found) if found.exists() else shutil.which(name)


def step(outputs: list[Path], command: list[str], stdout: Path | None = None) -> float:
    """Run ``command`` unless every output exists; returns its wall seconds (0 when skipped)."""
    if outputs and all(p.exists() for p in outputs):
        return 0.0
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    with open(stdout, "w") if stdout else open("/dev/null", "w") as sink:
        subprocess.run(command, check=True, stdout=sink if stdout else None)
    return time.perf_counter() - start


def level_fidelity(checkpoint: Path, cache: Path, images: Path) -> dict:
    """teacher -> per paired level ``{"student_block", "teacher_block", "patch", "cls"}`` mean cosines of the SAK
    run's level predictions to the held-out cache's stored blocks, in the run's standardised target space."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from dune_cache.images.decode import load_pixels
    from dune_cache.read.reader import CacheReader
    from dune_student.data.batches import image_paths
    from dune_student.runs.checkpoint import read_run_checkpoint
    from dune_student.runs.loading import load_run
    from dune_student.model.sak import at_larger_grid
    from dune_student.loss.sak import SAKObjective, level_key

    run = load_run(checkpoint, torch.device("cpu"))
    reader = CacheReader(str(cache), run.teachers, levels=True)
    objective = SAKObjective.from_config(run.cfg, reader.blocks, run.student.depth, reader.dims,
                                         {t: True for t in run.teachers})
    state = read_run_checkpoint(checkpoint)["sak_objective"]  # weights_only: nothing in the file runs
    objective.load_state_dict(state)
    paths, size = image_paths(reader, str(images)), (run.resolution, run.resolution)
    sums: dict[str, list[list[float]]] = {t: [[0.0, 0.0] for _ in p] for t, p in objective.pairs.items()}
    count = 0
    with torch.inference_mode():
        for lo in range(0, len(reader), 16):
            batch = np.arange(lo, min(lo + 16, len(reader)))
            pixels = torch.stack([torch.from_numpy(load_pixels(paths[i], size, "squash")) for i in batch])
            preds = run.heads.forward_levels(run.student(run.student.normalize(pixels), return_blocks=True))
            targets = reader.read(batch)
            for t, pairs in objective.pairs.items():
                for k, (_, block) in enumerate(pairs):
                    cls, patch = objective.level_standardizer.standardize(
                        level_key(t, block), targets.level_cls[t][block], targets.level_patch[t][block])
                    pred_patch, patch = at_larger_grid(preds[t][k][1], patch)
                    sums[t][k][0] += float(F.cosine_similarity(pred_patch, patch, dim=-1).flatten(1).mean(1).sum())
                    sums[t][k][1] += float(F.cosine_similarity(preds[t][k][0], cls, dim=-1).sum())
            count += len(batch)
    return {t: [{"student_block": s, "teacher_block": b, "patch": sums[t][k][0] / count, "cls": sums[t][k][1] / count}
                for k, (s, b) in enumerate(pairs)] for t, pairs in objective.pairs.items() if pairs}


def probe_headline(report: dict) -> dict:
    """The student's probe scores (kNN / linear accuracy, disparity and correspondence) from probe.json."""
    student = next(m for m in report["models"] if m["kind"] == "student")
    correspondence = {k: v for k, v in student["correspondence"].items() if not k.startswith("per_pair")}
    return {"name": student["name"], "cls": student["cls"], "mean_patch": student["mean_patch"],
            "disparity": student["disparity"], "correspondence": correspondence}


def save(out: Path, results: dict) -> None:
    """``OUT/compare.json`` with what is measured so far."""
    (out / "compare.json").write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("demo"), help="demo folder (train/, heldout/, probe/)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--picture", type=Path, default=Path("docs/img/sak_router_weights.png"))
    args = parser.parse_args()
    demo, out = args.demo, args.out
    seconds = {}
    for split in ("train", "heldout"):
        for teacher, extra in TEACHERS.items():
            cache = out / f"{split}.zarr"
            seconds[f"extract-{split}-{teacher}"] = step(  # always run: a finished extraction returns at once
                [],
                [tool("dune-cache"), "extract", "--teacher", teacher, "--checkpoint", "auto", "--images",
                 str(demo / split), "--out", str(cache), *GRID, *extra, "--batch-size", "16", "--no-progress"])
    seconds["stats"] = step([out / "train.zarr" / t / "stats" for t in TEACHERS],
                            [tool("dune-cache"), "stats", str(out / "train.zarr")])
    results: dict = {"steps": args.steps, "wall_seconds_this_invocation": seconds}
    for kind in HEADS:  # the three students first, then what reads them (probes last: the slowest)
        run = out / kind
        seconds[f"train-{kind}"] = step(
            [run / "checkpoint.pt"],
            [tool("dune-student"), "train", "--cache", str(out / "train.zarr"), "--images", str(demo / "train"),
             "--out", str(run), "--no-progress", "--heads", kind, f"steps={args.steps}", *RECIPE])
        seconds[f"eval-{kind}"] = step(
            [run / "eval_heldout.json"], [tool("dune-student"), "eval", "--checkpoint", str(run / "checkpoint.pt"),
                                          "--cache", str(out / "heldout.zarr"), "--images", str(demo / "heldout"),
                                          "--json"], stdout=run / "eval_heldout.json")
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        results[kind] = {"final_fidelity": json.loads((run / "eval_heldout.json").read_text()),
                         "final_loss": metrics[-1]["loss"]}
        save(out, results)
    results["sak"]["level_fidelity"] = level_fidelity(out / "sak" / "checkpoint.pt", out / "heldout.zarr",
                                                      demo / "heldout")
    seconds["route"] = step([out / "route" / "route.json"],
                            [tool("dune-student"), "route", "--checkpoint", str(out / "sak" / "checkpoint.pt"),
                             "--data", str(demo / "probe"), "--out", str(out / "route")])
    results["route"] = json.loads((out / "route" / "route.json").read_text())
    save(out, results)
    args.picture.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "route" / "router_weights.png", args.picture)
    for kind in HEADS:
        run = out / kind
        seconds[f"probe-{kind}"] = step(
            [run / "probe.json"], [tool("dune-student"), "probe", "--checkpoint", str(run / "checkpoint.pt"),
                                   "--data", str(demo / "probe"), "--no-heads", "--out", str(run / "probe.json")])
        results[kind]["probe"] = probe_headline(json.loads((run / "probe.json").read_text()))
        save(out, results)
    print(json.dumps({k: v for k, v in results.items() if k in HEADS}, indent=1))


if __name__ == "__main__":
    main()
