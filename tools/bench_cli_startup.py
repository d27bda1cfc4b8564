"""Wall time of CLI calls that must answer at once (help, the teacher list, config and flag errors).

    python tools/bench_cli_startup.py [--repeats 5] [--before DIR]

Each call runs in a fresh interpreter (the installed ``dune-cache``/``dune-student`` scripts, as a user runs
them); the median and the minimum of ``--repeats`` runs are printed. ``--before DIR`` also times the same calls
on another source tree, e.g. an older commit (``git archive HEAD dune_cache dune_student | tar -x -C DIR``),
put first on ``PYTHONPATH``; the two are interleaved, so both see the same machine load.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
MISSING = "/nonexistent"  # a config error must come before any file is opened
CALLS = {
    "dune-cache --help": ["dune-cache", "--help"],
    "dune-cache teachers": ["dune-cache", "teachers"],
    "dune-cache teachers --offline": ["dune-cache", "teachers", "--offline"],
    "dune-cache extract --teacher nope ...": ["dune-cache", "extract", "--teacher", "nope", "--images", MISSING,
                                              "--out", MISSING],
    "dune-student --help": ["dune-student", "--help"],
    "dune-student train --help": ["dune-student", "train", "--help"],
    "dune-student train ... student.arch=vit_tny": ["dune-student", "train", "--cache", MISSING, "--images", MISSING,
                                                     "student.arch=vit_tny"],
}


def wall_time(args: list[str], env: dict[str, str]) -> float:
    """Seconds one call takes, from process start to exit (its output discarded)."""
    start = time.perf_counter()
    subprocess.run([str(BIN / args[0]), *args[1:]], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   cwd="/", check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", type=Path, help="Another source tree to time the same calls on.")
    args = parser.parse_args()
    trees = {"now": dict(os.environ)}
    if args.before:
        trees = {"before": {**os.environ, "PYTHONPATH": str(args.before.resolve())}, **trees}
    times = {(call, tree): [] for call in CALLS for tree in trees}
    for _ in range(args.repeats):
        for call, argv in CALLS.items():
            for tree, env in trees.items():
                times[call, tree].append(wall_time(argv, env))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for call in CALLS:
        cells = [f"{tree} {statistics.median(times[call, tree]):5.2f} s (min {min(times[call, tree]):.2f})"
                 for tree in trees]
        print(f"{call:45} " + "   ".join(cells))


if __name__ == "__main__":
    main()
