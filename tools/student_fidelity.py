"""Student-level fidelity of cache encodings: the same student trained on fp16 targets and on encoded targets.

Issue 12's last question: does a student trained from a compressed cache (``lowrank``, ``int8-*``) end as good as
one trained from the fp16 cache? Feature-level fidelity (docs/benchmarks.md) says how close the targets are; this
says whether the difference survives training. Steps (resumable: a step whose outputs exist is skipped):

1. ``dune-cache extract`` of DINOv2 ViT-S/14 (the offline real weights) over ``DEMO/train`` and ``DEMO/heldout``
   on the student's grid (``--resolution / 14``), fp16 (``none``); ``dune-cache stats``.
2. ``dune-cache recompress`` of the training cache into each encoding (no teacher run: the same features, encoded),
   then ``dune-cache stats`` on it (a user of that cache standardises with its own statistics).
3. ``dune-student train`` per (encoding, seed): the same recipe, images, steps and seed for every encoding.
4. ``dune-student eval`` of every run against the **fp16** held-out cache (the exact targets): mean cosine of the
   projected student tokens, CLS and patch. With ``--probe``, ``dune-student probe`` on ``DEMO/probe`` too.

Prints a markdown table: per encoding, the mean over seeds, its difference to fp16 and the seed spread, the
seed-by-seed (paired) patch differences to fp16 with 2 x their standard error, and the smallest difference of
unpaired means this setup resolves (2 x the standard error of a difference of means, pooled seed std); with ``--probe``
a second table of the probes' means over seeds. Writes ``OUT/fidelity.json``. ``--include`` pools the runs of earlier
invocations of the same setup: their runs are not retrained (more seeds, or another encoding next to the
recorded fp16 runs).

    python tools/student_fidelity.py --demo demo --out runs/fidelity --steps 300 --batch-size 8 --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from compare_heads import probe_headline, step, tool  # noqa: E402  (tools/, run as a script)

TEACHER = "dinov2_vits14"
PATCH = 14


def encoding_slug(encoding: str) -> str:
    """A folder name for ``encoding`` (``lowrank:image_rank=48`` -> ``lowrank-image_rank-48``)."""
    return encoding.replace(":", "-").replace("=", "-").replace(",", "_")


def prepare_caches(demo: Path, out: Path, resolution: int, encodings: list[str]) -> dict[str, Path]:
    """fp16 train/held-out caches, then one recompressed training cache per encoding; ``{encoding: train cache}``."""
    for split in ("train", "heldout"):
        step([], [tool("dune-cache"), "extract", "--teacher", TEACHER, "--checkpoint", "auto", "--images",
                  str(demo / split), "--out", str(out / f"{split}.zarr"), "--student-patch", str(PATCH),
                  "--student-resolution", str(resolution), "--batch-size", "16", "--no-progress"])
    caches = {"none": out / "train.zarr"}
    for encoding in encodings:
        if encoding != "none":
            caches[encoding] = out / f"train-{encoding_slug(encoding)}.zarr"
            step([caches[encoding] / TEACHER / "zarr.json"],
                 [tool("dune-cache"), "recompress", str(out / "train.zarr"), "--out", str(caches[encoding]),
                  "--encoding", encoding, "--no-progress"])
    for cache in caches.values():
        step([cache / TEACHER / "stats"], [tool("dune-cache"), "stats", str(cache)])
    return caches


def train_and_score(demo: Path, out: Path, cache: Path, run: Path, seed: int, args: argparse.Namespace) -> dict:
    """Train one student on ``cache``; its fidelity to the fp16 held-out cache (and probes with ``--probe``)."""
    recipe = ["student.arch=vit_tiny", f"student.patch_size={PATCH}", f"student.img_size={args.resolution}",
              f"data.resolution={args.resolution}", f"data.batch_size={args.batch_size}", "optim.base_lr=8e-3",
              "log_every=25", f"seed={seed}", f"steps={args.steps}"]
    step([run / "checkpoint.pt"], [tool("dune-student"), "train", "--cache", str(cache), "--images",
                                             str(demo / "train"), "--out", str(run), "--no-progress",
                                             "--device", args.device, *recipe])
    step([run / "eval_heldout.json"], [tool("dune-student"), "eval", "--checkpoint", str(run / "checkpoint.pt"),
                                       "--cache", str(out / "heldout.zarr"), "--images", str(demo / "heldout"),
                                       "--device", args.device, "--json"], stdout=run / "eval_heldout.json")
    result = {"fidelity": json.loads((run / "eval_heldout.json").read_text())[TEACHER]}
    if args.probe:
        step([run / "probe.json"], [tool("dune-student"), "probe", "--checkpoint", str(run / "checkpoint.pt"),
                                    "--data", str(demo / "probe"), "--no-heads", "--out", str(run / "probe.json")])
        result["probe"] = probe_headline(json.loads((run / "probe.json").read_text()))
    return result


def summarise(runs: dict[str, dict[int, dict]]) -> dict:
    """Per encoding and metric (cls, patch): seed values, mean, difference to ``none`` over the same seeds, spread,
    paired differences; and the smallest difference of means the setup resolves (2 x the standard error of a
    difference of independent means, pooled seed std)."""
    summary: dict = {}
    for metric in ("cls", "patch"):
        values = {enc: {seed: r["fidelity"][metric] for seed, r in by_seed.items()} for enc, by_seed in runs.items()}
        variances = [statistics.variance(v.values()) for v in values.values() if len(v) > 1]
        pooled = math.sqrt(statistics.mean(variances)) if variances else None
        fp16 = values["none"]
        summary[metric] = {"pooled_seed_std": pooled, "encodings": {}}
        for enc, by_seed in values.items():
            common = [seed for seed in by_seed if seed in fp16]
            summary[metric]["encodings"][enc] = {
                "seeds": list(by_seed), "values": list(by_seed.values()), "mean": statistics.mean(by_seed.values()),
                "minus_fp16": statistics.mean(by_seed[s] - fp16[s] for s in common),
                "spread": max(by_seed.values()) - min(by_seed.values()),
                "resolvable_difference": None if pooled is None else
                2 * pooled * math.sqrt(1 / len(by_seed) + 1 / len(fp16)),
                **paired([by_seed[s] for s in common], [fp16[s] for s in common])}
    probed = {enc: [r for r in by_seed.values() if "probe" in r] for enc, by_seed in runs.items()}
    if all(probed.values()):
        summary["probes"] = {enc: {"runs": len(results), **probe_means(results)} for enc, results in probed.items()}
    return summary


def paired(values: list[float], fp16: list[float]) -> dict:
    """Seed-by-seed differences to the fp16-trained student (same seed: same initialisation and batches, only the
    targets differ) and 2 x their standard error (``None`` with one seed)."""
    diffs = [v - b for v, b in zip(values, fp16)]
    error = 2 * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return {"paired_differences": diffs, "paired_2se": error}


def probe_means(results: list[dict]) -> dict[str, float]:
    """Mean over seeds of the headline probe scores (``probe_headline`` of each run)."""
    picks = {"cls_knn": ("cls", "knn"), "cls_linear": ("cls", "linear"), "mean_patch_knn": ("mean_patch", "knn"),
             "mean_patch_linear": ("mean_patch", "linear"), "disparity_rmse": ("disparity", "rmse"),
             "within_1_patch": ("correspondence", "within_1_patch")}
    return {name: statistics.mean(r["probe"][a][b] for r in results) for name, (a, b) in picks.items()}


def markdown(summary: dict, steps: int, batch: int, resolution: int) -> str:
    seeds = {enc: row["seeds"] for enc, row in summary["patch"]["encodings"].items()}
    lines = [f"ViT-Tiny/{PATCH} at {resolution} px, {steps} steps of batch {batch}; held-out fidelity to the fp16 "
             f"targets of {TEACHER} (mean cosine); seeds: " + "; ".join(f"{e} {s}" for e, s in seeds.items()) + ".",
             "",
             "| training targets | CLS mean (− fp16) | patch mean (− fp16) | CLS / patch seed spread | "
             "patch − fp16 per seed (± 2 SE, paired) |", "|---|---|---|---|---|"]
    cls, patch = summary["cls"]["encodings"], summary["patch"]["encodings"]
    for enc in cls:
        lines.append(f"| {enc} | {cls[enc]['mean']:.4f} ({cls[enc]['minus_fp16']:+.4f}) | {patch[enc]['mean']:.4f} "
                     f"({patch[enc]['minus_fp16']:+.4f}) | {cls[enc]['spread']:.4f} / {patch[enc]['spread']:.4f} | "
                     f"{'—' if enc == 'none' else paired_cell(patch[enc])} |")
    if "probes" in summary:
        lines += ["", "| training targets | CLS kNN / linear % | mean-patch kNN / linear % | disparity RMSE px | "
                      "match ≤ 1 patch % |", "|---|---|---|---|---|"]
        for enc, p in summary["probes"].items():
            lines.append(f"| {enc} ({p['runs']} runs) | {100 * p['cls_knn']:.1f} / {100 * p['cls_linear']:.1f} | "
                         f"{100 * p['mean_patch_knn']:.1f} / {100 * p['mean_patch_linear']:.1f} | "
                         f"{p['disparity_rmse']:.2f} | {100 * p['within_1_patch']:.1f} |")
    resolvable = {enc: (cls[enc]["resolvable_difference"], patch[enc]["resolvable_difference"])
                  for enc in cls if enc != "none" and None not in (cls[enc]["resolvable_difference"],
                                                                   patch[enc]["resolvable_difference"])}
    if resolvable:
        lines.append("\nSmallest difference of unpaired means resolved (2 standard errors, pooled seed std), CLS / "
                     "patch: " + "; ".join(f"{enc} {c:.4f} / {p:.4f}" for enc, (c, p) in resolvable.items()) + ".")
    return "\n".join(lines)


def paired_cell(row: dict) -> str:
    """``+a, +b, +c (mean ± 2 SE)`` of one encoding's paired patch differences."""
    seeds = ", ".join(f"{d:+.4f}" for d in row["paired_differences"])
    error = "" if row["paired_2se"] is None else f" ± {row['paired_2se']:.4f}"
    return f"{seeds} (mean {statistics.mean(row['paired_differences']):+.4f}{error})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("demo"), help="demo folder (train/, heldout/, probe/)")
    parser.add_argument("--out", type=Path, default=Path("runs/fidelity"))
    parser.add_argument("--encodings", default="none,lowrank:image_rank=48,lowrank:image_rank=24",
                        help="comma-separated; 'none' (the fp16 cache) is always included. Encodings with commas "
                             "in their parameters: separate with ';' instead")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224, help="student input px (multiple of 14)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument("--probe", action="store_true", help="also run dune-student probe on DEMO/probe")
    parser.add_argument("--include", type=Path, action="append", default=[],
                        help="fidelity.json of an earlier invocation with the same setup (teacher, steps, batch size, "
                             "resolution): its runs are pooled with this invocation's, paired by seed, and are not "
                             "retrained (repeatable; two files holding the same run are refused)")
    args = parser.parse_args()
    separator = ";" if ";" in args.encodings else ","
    encodings = list(dict.fromkeys(["none", *args.encodings.split(separator)]))
    seeds = [int(s) for s in args.seeds.split(",")]
    setup = {"teacher": TEACHER, "steps": args.steps, "batch_size": args.batch_size, "resolution": args.resolution}
    earlier: dict[str, dict[int, dict]] = {}
    for path in args.include:  # read and checked before any training
        earlier = pooled(earlier, recorded_runs(path, setup))
    # every encoding at one seed before the next seed: a partial run is still a comparison
    to_train = [(seed, enc) for seed in seeds for enc in encodings if seed not in earlier.get(enc, {})]
    taken = [f"{enc} seed {seed}" for seed in seeds for enc in encodings if seed in earlier.get(enc, {})]
    if taken:
        print(f"taken from --include, not retrained: {', '.join(taken)}")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    trained = list(dict.fromkeys(enc for _, enc in to_train))
    caches = prepare_caches(args.demo, args.out, args.resolution, trained) if to_train else {}
    runs: dict[str, dict[int, dict]] = {}
    for seed, enc in to_train:
        run = args.out / encoding_slug(enc) / f"seed{seed}"
        runs.setdefault(enc, {})[seed] = train_and_score(args.demo, args.out, caches[enc], run, seed, args)
        (args.out / "fidelity.json").write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    runs = pooled(runs, earlier)
    summary = summarise(runs)
    record = {**setup, "seeds": seeds, "included": [str(p) for p in args.include], "runs": runs, "summary": summary,
              "wall_seconds_this_invocation": round(time.perf_counter() - start, 1)}
    (args.out / "fidelity.json").write_text(json.dumps(record, indent=1) + "\n")
    print(markdown(summary, args.steps, args.batch_size, args.resolution))


def recorded_runs(path: Path, setup: dict) -> dict[str, dict[int, dict]]:
    """The runs of an earlier ``fidelity.json``; refuses one made with another setup, naming what differs."""
    record = json.loads(path.read_text())
    differ = [f"{key}: {record.get(key)!r} there, {value!r} here" for key, value in setup.items()
              if record.get(key) != value]
    if differ:
        raise SystemExit(f"--include {path}: another setup ({'; '.join(differ)}); only runs of one setup pool")
    return {enc: {int(seed): result for seed, result in by_seed.items()} for enc, by_seed in record["runs"].items()}


def pooled(first: dict[str, dict[int, dict]], second: dict[str, dict[int, dict]]) -> dict[str, dict[int, dict]]:
    """Both sets of runs, seeds in order; refuses an (encoding, seed) run present in both, naming it."""
    both = [f"{enc} seed {seed}" for enc, by_seed in second.items() for seed in by_seed if seed in first.get(enc, {})]
    if both:
        raise SystemExit(f"runs given twice (two --include files): {', '.join(both)}")
    encodings = sorted({**first, **second}, key=lambda enc: enc != "none")  # fp16 first, the others as they came
    merged = {enc: {**first.get(enc, {}), **second.get(enc, {})} for enc in encodings}
    return {enc: dict(sorted(by_seed.items())) for enc, by_seed in merged.items()}


if __name__ == "__main__":
    main()
