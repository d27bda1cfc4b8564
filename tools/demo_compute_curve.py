"""How far CPU goes: the demo's student trained for several CPU budgets, its held-out fidelity and probe scores
plotted against the CPU time it took, so that a user sees whether more compute keeps helping.

    python tools/run_demo.py --out demo                  # first: images, caches and probe data
    python tools/demo_compute_curve.py --demo demo --minutes 1 2 5 10 20 --png docs/img/demo_compute_curve.png

Each budget trains a fresh student with the demo's configuration (tools/run_demo.py: TRAIN, the same caches),
for the number of steps that fills the budget at the CPU seconds per step measured on a short calibration run
(the first budget's run on this machine), then runs `dune-student eval --baselines` and `dune-student probe`
on the demo's held-out images and probe data. The x axis is the CPU time the training process really used
(user + system, children included), not the budget asked for; wall time is recorded too. Results (JSON) go
beside the PNG. On a machine shared with other jobs the CPU time per step is inflated (threads contend).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import time
from pathlib import Path

from demo_summary import RANDOM_INIT, score_table  # tools/ is on sys.path when this script runs
from run_demo import RESOLUTION, STUDENT_PATCH, TEACHERS, TRAIN, executable

CALIBRATION_STEPS = 20


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(command: list[str], stdout: Path | None = None) -> tuple[float, float]:
    """Run ``command`` (printed first) to its end; returns ``(CPU seconds, wall seconds)`` it took."""
    print("$ " + " ".join(command), flush=True)
    cpu, wall = children_cpu_seconds(), time.perf_counter()
    with open(stdout, "w") if stdout else open("/dev/null", "w") as sink:
        subprocess.run(executable(command), check=True, stdout=sink if stdout else None)
    return children_cpu_seconds() - cpu, time.perf_counter() - wall


def train_command(demo: Path, out: Path, steps: int, seed: int) -> list[str]:
    """The demo's `dune-student train` with ``steps`` and ``seed``."""
    overrides = {**TRAIN, "steps": steps, "seed": seed, "log_every": max(steps // 5, 1)}
    return ["dune-student", "train", "--cache", str(demo / "train.zarr"), "--images", str(demo / "train"), "--out",
            str(out), "--no-progress", *(f"{k}={v}" for k, v in overrides.items()),
            f"student.patch_size={STUDENT_PATCH}", f"student.img_size={RESOLUTION}", f"data.resolution={RESOLUTION}"]


def score(demo: Path, run_dir: Path) -> tuple[dict, dict]:
    """Held-out fidelity (with baselines) and probe report of a trained run; the teachers' probe rows, which do
    not depend on the run, are taken from the demo's own report (DEMO/run/probe.json) instead of re-probed."""
    checkpoint = run_dir / "checkpoint.pt"
    run(["dune-student", "eval", "--checkpoint", str(checkpoint), "--cache", str(demo / "heldout.zarr"), "--images",
         str(demo / "heldout"), "--json", "--baselines"], stdout=run_dir / "eval_heldout.json")
    run(["dune-student", "probe", "--checkpoint", str(checkpoint), "--data", str(demo / "probe"), "--out",
         str(run_dir / "probe.json")], stdout=run_dir / "probe_table.md")
    probe = json.loads((run_dir / "probe.json").read_text())
    demo_probe = json.loads((demo / "run" / "probe.json").read_text())
    probe["models"] += [m for m in demo_probe["models"] if m["kind"] == "teacher"]
    return json.loads((run_dir / "eval_heldout.json").read_text()), probe


def point(minutes: float, steps: int, cpu: float, wall: float, fidelity: dict, probe: dict) -> dict:
    """One budget's record: what it cost, and every table row's values with their 95 % intervals."""
    _, rows = score_table(list(TEACHERS), fidelity, probe)
    values = {}
    for name, row in rows.items():
        for column, value in (("CLS", row.cls), ("patch", row.patch), *row.probes.items()):
            if value is not None:
                values[f"{name} | {column}"] = {"value": value.value, "ci95": value.interval()}
    return {"budget_minutes": minutes, "steps": steps, "cpu_minutes": cpu / 60, "wall_minutes": wall / 60,
            "values": values}


def plot(points: list[dict], png: Path) -> None:
    """Held-out fidelity (left) and probe scores (right) of the student against CPU minutes, with 95 % intervals;
    dashed: the baselines and teachers, which do not depend on the budget (those of the last run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [p["cpu_minutes"] for p in points]
    last = points[-1]["values"]
    panels = {"held-out fidelity (cosine, standardised space)": [
                  (f"student → {t} | {kind}",
                   [f"{RANDOM_INIT} → {t} | {kind}", f"mean training target → {t} | {kind}"])
                  for t in TEACHERS for kind in ("CLS", "patch")],
              f"probes of the student's projection for {TEACHERS[0]} (PCK as a share, R²)": [
                  (f"student → {TEACHERS[0]} | {column}", [f"teacher {TEACHERS[0]} | {column}",
                                                           f"random-init student (its own tokens) | {column}"])
                  for column in ("warp PCK ≤1 patch %", "disparity R²")]}
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for axis, (title, series) in zip(axes, panels.items()):
        for k, (key, references) in enumerate(series):
            if key not in last:
                continue
            colour = f"C{k}"
            values = [p["values"][key] for p in points]
            low = [v["value"] - v["ci95"][0] for v in values]
            high = [v["ci95"][1] - v["value"] for v in values]
            axis.errorbar(x, [v["value"] for v in values], yerr=[low, high], marker="o", color=colour, capsize=3,
                          label=key.replace(" | ", " ").replace("student → ", "student→"))
            for style, reference in zip(("--", ":"), references):
                if reference in last:
                    axis.axhline(last[reference]["value"], color=colour, linestyle=style, linewidth=1,
                                 label=reference.replace(" | ", " "))
        axis.set_xscale("log")
        axis.set_xlabel("training CPU minutes (user + system)")
        axis.set_title(title)
        axis.legend(fontsize=6)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("demo"), help="a finished `tools/run_demo.py --out` folder")
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 2, 5, 10, 20], help="CPU budgets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="run folders (default: DEMO/compute_curve)")
    parser.add_argument("--png", type=Path, default=Path("docs/img/demo_compute_curve.png"))
    args = parser.parse_args()
    work = args.work or args.demo / "compute_curve"
    calibration = work / "calibration"
    cpu, _ = run(train_command(args.demo, calibration, CALIBRATION_STEPS, args.seed))
    per_step = cpu / CALIBRATION_STEPS  # includes start-up, so budgets come out short by about that, never long
    print(f"calibration: {per_step:.2f} CPU s per step ({CALIBRATION_STEPS} steps)", flush=True)
    points = []
    for minutes in sorted(args.minutes):
        steps = max(int(minutes * 60 / per_step), 1)
        run_dir = work / f"cpu_{minutes:g}min"
        cpu, wall = run(train_command(args.demo, run_dir, steps, args.seed))
        points.append(point(minutes, steps, cpu, wall, *score(args.demo, run_dir)))
        print(f"{minutes:g} CPU-min budget: {steps} steps, {cpu / 60:.2f} CPU-min, {wall / 60:.2f} min wall",
              flush=True)
        results = {"demo": str(args.demo), "seed": args.seed, "cpu_seconds_per_step": per_step, "points": points}
        args.png.with_suffix(".json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        plot(points, args.png)
    print(f"wrote {args.png} and {args.png.with_suffix('.json')}")


if __name__ == "__main__":
    main()
