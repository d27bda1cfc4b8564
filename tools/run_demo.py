"""The offline end-to-end demo (`make demo`): real images, the real DINOv2 ViT-S/14 and MobileNetV2 teachers,
both stages, a trained student evaluated on held-out images and probed against its teachers.

    python tools/run_demo.py --out demo

Each step prints the command a user types (`dune-cache ...`, `dune-student ...`, `python tools/...`), then runs
it. A step whose outputs are complete (its command finished before, and they still exist) is skipped; an
interrupted one is run again, and the commands resume what they had done; every step after one that runs runs
too (it may read what changed). Steps:

    images     python tools/prepare_demo.py              demo/train, demo/heldout (whole videos and photo sets held out)
    teachers   dune-cache teachers --offline             where the real teachers come from (installed pip packages)
    extract    dune-cache extract --checkpoint auto ...  demo/train.zarr, demo/heldout.zarr, both teachers on one grid
    stats      dune-cache stats                          target statistics of the training cache
    train      dune-student train                        demo/run (checkpoint, metrics, curves.png)
    eval       dune-student eval --json --baselines      demo/run/eval_heldout.json (with a random-init student and
                                                         the mean training target, in the same space)
    pictures   dune-cache show, dune-student show/curves demo/pictures/
    probe      python tools/prepare_probe_data.py, dune-cache extract, dune-student probe
                                                         demo/probe, demo/probe.zarr, demo/run/probe.json

It ends with one summary table (printed and written to demo/summary.md; tools/demo_summary.py): held-out fidelity
and probe scores beside their baselines with 95 % bootstrap intervals, and one line per teacher in words.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from demo_summary import reading, score_table  # tools/ is on sys.path when this script runs
from prepare_demo import split_words

TEACHERS = ("dinov2_vits14", "mobilenet_v2")
STUDENT_PATCH, RESOLUTION = 14, 112  # the shared grid: 8 x 8 tokens for every teacher and the student
# Every 5th video frame: neighbouring frames are near duplicates, and fewer frames of the two training clips leave
# the 12 photos a larger share (docs/demo.md, "Why the student did not learn").
FRAME_EVERY = 5
# 500 steps of batch 8 (the 4000 images of 250 steps of batch 16, twice the updates at the same CPU cost), lr 5e-4
# (base 1.6e-2 at batch 8), both teachers' losses every step (no teacher dropping). docs/demo.md says what was tried.
TRAIN = {"steps": 500, "student.arch": "vit_tiny", "data.batch_size": 8, "optim.base_lr": 1.6e-2,
         "loss.teacher_drop": "none", "log_every": 100}
# Pictures: training images for the cache's teacher maps, held-out images (a held-out clip, the probe's stereo
# photo, textures) for the student's maps next to its teachers'.
CACHE_PICTURES = ("photos/astronaut.png", "photos/chelsea.png", "frames/bikes_0100.png", "photos/coffee.png")
STUDENT_PICTURES = ("frames/carphone_pristine_0060.png", "photos/motorcycle_left.png", "photos/brick.png",
                    "photos/gravel.png")


@dataclass
class Step:
    """One command of the demo and the files it makes."""

    name: str  # also names its completion stamp, out/.steps/<name>
    command: list[str]  # as a user types it: a console script of this environment, or `python tools/...`
    outputs: list[Path]  # all exist when the step is complete
    stdout: Path | None = None  # file receiving the command's standard output (also printed)


@dataclass
class Timings:
    """Seconds per step run now, and of the steps reused, the seconds they took when they ran."""

    seconds: dict[str, float] = field(default_factory=dict)
    reused: dict[str, float] = field(default_factory=dict)


def executable(command: list[str]) -> list[str]:
    """``command`` with its program found in this Python's environment (``python`` is this Python)."""
    program, *args = command
    if program == "python":
        return [sys.executable, *args]
    script = Path(sys.executable).parent / program
    return [str(script) if script.exists() else program, *args]


def run_command(command: list[str], capture: bool) -> str | None:
    """Run ``command`` to its end and return its standard output when ``capture``; a failure is a
    ``CalledProcessError``. On Ctrl-C (which the command gets too) wait for the command to stop its own way:
    the trainer and extraction finish what they write, so that a re-run resumes from there."""
    with subprocess.Popen(executable(command), text=True, stdout=subprocess.PIPE if capture else None) as process:
        while True:
            try:
                output, _ = process.communicate()
                break
            except KeyboardInterrupt:
                continue
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    return output


def read_stamp(stamp: Path) -> dict:
    """``{"command": ..., "seconds": ...}`` of a step that finished, ``{}`` for one that did not."""
    return json.loads(stamp.read_text()) if stamp.is_file() else {}


def is_complete(step: Step, stamp: Path) -> bool:
    """The step's command finished before (its stamp holds that very command) and its outputs still exist."""
    return read_stamp(stamp).get("command") == shlex.join(step.command) and all(p.exists() for p in step.outputs)


def run_step(step: Step, out: Path, timings: Timings, after_a_run: bool) -> bool:
    """Print the step's command and run it, unless it is complete and no step before it ran in this session (whose
    outputs it may read); then stamp it complete. Returns whether it ran."""
    stamp = out / ".steps" / step.name
    shown = shlex.join(step.command) + (f" > {step.stdout}" if step.stdout else "")
    if not after_a_run and is_complete(step, stamp):
        print(f"\n# done before, reused: {shown}", flush=True)
        timings.reused[step.name] = read_stamp(stamp)["seconds"]
        return False
    print(f"\n$ {shown}", flush=True)
    start = time.perf_counter()
    output = run_command(step.command, capture=step.stdout is not None)
    if step.stdout:
        print(output, end="", flush=True)
        step.stdout.write_text(output)
    timings.seconds[step.name] = time.perf_counter() - start
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"command": shlex.join(step.command), "seconds": timings.seconds[step.name]}))
    return True


def extract_steps(images: Path, cache: Path, label: str) -> list[Step]:
    """Both teachers over ``images`` into ``cache``, on the student's shared grid, from their offline checkpoints."""
    return [Step(f"extract-{label}-{teacher}",
                 ["dune-cache", "extract", "--teacher", teacher, "--checkpoint", "auto", "--images", str(images),
                  "--out", str(cache), "--student-patch", str(STUDENT_PATCH), "--student-resolution", str(RESOLUTION),
                  "--batch-size", "16", "--no-progress"],
                 [cache / teacher / "zarr.json"])
            for teacher in TEACHERS]


def demo_steps(out: Path) -> list[Step]:
    """Every step of the demo, in order."""
    run, pictures = out / "run", out / "pictures"
    train_overrides = [f"{key}={value}" for key, value in TRAIN.items()] + [
        f"student.patch_size={STUDENT_PATCH}", f"student.img_size={RESOLUTION}", f"data.resolution={RESOLUTION}"]
    return [
        Step("images", ["python", "tools/prepare_demo.py", "--out", str(out), "--every", str(FRAME_EVERY)],
             [out / "split.json"]),
        Step("teachers", ["dune-cache", "teachers", "--offline"], []),
        *extract_steps(out / "train", out / "train.zarr", "train"),
        *extract_steps(out / "heldout", out / "heldout.zarr", "heldout"),
        Step("stats", ["dune-cache", "stats", str(out / "train.zarr")],
             [out / "train.zarr" / teacher / "stats" for teacher in TEACHERS]),
        Step("train", ["dune-student", "train", "--cache", str(out / "train.zarr"), "--images", str(out / "train"),
                       "--out", str(run), "--no-progress", *train_overrides], [run / "checkpoint.pt"]),
        Step("eval", ["dune-student", "eval", "--checkpoint", str(run / "checkpoint.pt"), "--cache",
                      str(out / "heldout.zarr"), "--images", str(out / "heldout"), "--json", "--baselines"],
             [run / "eval_heldout.json"], stdout=run / "eval_heldout.json"),
        Step("show-cache", ["dune-cache", "show", str(out / "train.zarr"), "--out", str(pictures / "cache"),
                            *image_options(CACHE_PICTURES), "--cell", "128"], [pictures / "cache" / "grid.png"]),
        Step("show-student", ["dune-student", "show", str(run), "--cache", str(out / "heldout.zarr"), "--out",
                              str(pictures / "student"), *image_options(STUDENT_PICTURES), "--cell", "112"],
             [pictures / "student" / "grid.png"]),
        Step("curves", ["dune-student", "curves", str(run)], [run / "curves.png"]),
        Step("probe-data", ["python", "tools/prepare_probe_data.py", "--out", str(out / "probe")],
             [out / "probe" / "classify", out / "probe" / "pairs"]),
        *extract_steps(out / "probe", out / "probe.zarr", "probe"),
        Step("probe", ["dune-student", "probe", "--checkpoint", str(run / "checkpoint.pt"), "--data",
                       str(out / "probe"), "--cache", str(out / "probe.zarr"), "--out", str(run / "probe.json")],
             [run / "probe.json"]),
    ]


def image_options(ids: tuple[str, ...]) -> list[str]:
    """``--images ID`` for each image id."""
    return [arg for image_id in ids for arg in ("--images", image_id)]


def read_json(path: Path) -> dict:
    """The JSON object in ``path``."""
    return json.loads(path.read_text())


def teacher_checkpoint(cache: Path, teacher: str) -> str:
    """The checkpoint file a teacher group was extracted with, from its provenance (docs/cache-format.md)."""
    return read_json(cache / teacher / "zarr.json")["attributes"]["dune_cache"]["source"]["checkpoint"]


def summary(out: Path, timings: Timings, total: float) -> str:
    """The demo's summary in markdown: what was trained on what, the score table, where every output lies, time."""
    split, run = read_json(out / "split.json"), out / "run"
    fidelity, probe = read_json(run / "eval_heldout.json"), read_json(run / "probe.json")
    table, rows = score_table(list(TEACHERS), fidelity, probe)
    heldout_images, data = fidelity[TEACHERS[0]]["images"], probe["data"]
    ran = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in timings.seconds.items())
    lines = [
        "# Demo summary", "",
        f"Student {TRAIN['student.arch']}/{STUDENT_PATCH} at {RESOLUTION} px, {TRAIN['steps']} steps of batch "
        f"{TRAIN['data.batch_size']}, distilled from the cached {' and '.join(TEACHERS)} features of "
        f"{split['train']['images']} ({split_words(split['train'])}).",
        "",
        f"**Held-out fidelity** (`dune-student eval --baselines` on {split['heldout']['images']}, {heldout_images} "
        f"images never trained on: {split_words(split['heldout'])}): mean cosine between a prediction and the "
        "teacher's tokens **in the run's standardised target space** (each teacher channel minus its training-set "
        "mean, over its training-set std: what the loss compares). There the training set's mean CLS target is the "
        "origin, so predicting it — or any constant — scores exactly 0 (in the raw teacher space the same constant "
        "would score high, every token sharing a large mean). Baselines in the same space: a random-init student "
        "(student and heads of the same architecture, seed 0) and the mean training target (the mean CLS, and the "
        "mean patch token at each grid position).",
        f"**Probes** (`dune-student probe` on {data['folder']}): warp PCK ≤1 patch, the share of the source "
        f"patches of {data['warp_pairs']} held-out photos under known random homographies and photometric changes "
        "whose nearest neighbour in the warped image lies within one patch of the true position (identity: each "
        "patch matched to the same position; raw pixels: normalised cross-correlation of the patches); disparity "
        f"R²: ridge probe per patch on {data['test_pairs']} held-out Middlebury stereo windows. The student → "
        "teacher rows probe the student's projection for that teacher. (Face/non-face classification is in "
        "probe.json but not here: raw pixels classify those crops as well as the teachers do.)",
        "Brackets: 95 % bootstrap intervals over the held-out images (fidelity), warp pairs (PCK) and stereo "
        "pairs (R²).", "",
        *table, "",
        "**What it shows** (a comparison counts when the 95 % bootstrap interval of the paired difference lies "
        "above 0):", "", *reading(list(TEACHERS), rows), "",
        "| output | where |", "|---|---|",
        *(f"| teacher {t} (offline checkpoint) | {teacher_checkpoint(out / 'train.zarr', t)} |" for t in TEACHERS),
        f"| images: train / held-out / probe | {out}/train, {out}/heldout, {out}/probe ({out}/split.json) |",
        f"| caches: train / held-out / probe | {out}/train.zarr, {out}/heldout.zarr, {out}/probe.zarr |",
        f"| run (checkpoint, config, metrics) | {run}/ |",
        f"| held-out fidelity / probe report | {run}/eval_heldout.json, {run}/probe.json |",
        f"| pictures | {out}/pictures/cache/grid.png, {out}/pictures/student/grid.png, {run}/curves.png |",
        f"| this summary | {out}/summary.md |", "",
        f"Wall time: {total:.0f} s ({total / 60:.1f} min) for this run: "
        + (f"ran {ran}" if ran else "nothing to run")
        + (f"; reused {len(timings.reused)} steps done before, which took {sum(timings.reused.values()):.0f} s "
           "when they ran" if timings.reused else "") + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo"), help="folder for everything the demo makes")
    out = parser.parse_args().out
    start, timings, ran = time.perf_counter(), Timings(), False
    try:
        for step in demo_steps(out):
            ran = run_step(step, out, timings, ran) or ran
    except subprocess.CalledProcessError as exc:
        print(f"\ndemo stopped: `{shlex.join(exc.cmd)}` exited with status {exc.returncode}; re-run the demo to "
              "resume (steps done are reused)", file=sys.stderr)
        raise SystemExit(exc.returncode) from None
    text = summary(out, timings, time.perf_counter() - start)
    (out / "summary.md").write_text(text)
    print("\n" + text, end="")


if __name__ == "__main__":
    main()
