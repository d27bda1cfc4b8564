"""What running the work units as dask tasks costs against static ``--shard`` slots, on one machine, in CPU-seconds.

    python tools/bench_cluster.py --images 256 --unit-sizes 8 64 --workers 2 --repeats 3 --json out.json

Each configuration extracts the same ``--images`` tiny PNGs (32 x 32) with the test suite's tiny teacher
(``tests/conftest.py``: patch 8, D = 16, at 16 px) into a fresh cache, with the same flags, two ways:

- ``shard``: ``--workers`` processes ``dune-cache extract ... --shard i/W`` started together;
- ``dask``: one ``dune-cache extract ... --scheduler local:W`` (the client, which creates the group, starts a
  LocalCluster of W single-threaded worker processes; each unit is a task).

The teacher costs next to nothing, so what is measured is the machinery: CPU-seconds (user + system) of every
process of the run (the benchmark's children and everything they waited for: workers, nannies' worker processes,
DataLoader workers), and wall seconds. Every process runs with ``OMP_NUM_THREADS=1`` (dask's nanny sets it for its
workers; the ``--shard`` processes get the same, so neither pays for idle OpenMP threads). The difference dask - shard
over the unit sizes splits into a fixed cost per run and a cost per unit (least squares over the unit sizes).

Whole runs are dominated by starting processes (importing torch, loading the teacher), whose CPU time varies by a
second or more on a loaded machine, so ``--warm`` also measures the cost per unit alone: a LocalCluster of W workers
started once in this process (its workers' CPU read with ``Client.run``), one extraction to load the teacher in each,
then per unit size an extraction on the warm cluster against the same extraction in this process without dask (one
slot: every unit in one loader and one writer, what a ``--shard`` process does).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
TEACHER = "tiny_test_teacher"  # tests/conftest.py registers it
PRELOAD = f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(REPO)!r}]; import conftest"
CLIENT = f"""
import sys
sys.path[:0] = [{str(TESTS)!r}, {str(REPO)!r}]
import conftest  # registers {TEACHER}
from dune_cache.cli import app
app(sys.argv[1:], prog_name="dune-cache")
"""


def make_images(folder: Path, count: int) -> Path:
    """``count`` random 32 x 32 PNGs (made once)."""
    from PIL import Image

    if folder.exists() and len(list(folder.glob("*.png"))) == count:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
    return folder


def children_cpu() -> float:
    """CPU seconds of every waited-for descendant so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_mode(mode: str, images: Path, out: Path, unit_size: int, workers: int, num_workers: int, batch: int,
             checkpoint: Path) -> dict:
    """One extraction of ``images`` into a fresh ``out``: CPU and wall seconds of all its processes."""
    shutil.rmtree(out, ignore_errors=True)
    common = [sys.executable, "-c", CLIENT, "extract", "--teacher", TEACHER, "--checkpoint", str(checkpoint),
              "--images", str(images), "--out", str(out), "--resolution", "16", "--batch-size", str(batch),
              "--num-workers", str(num_workers), "--unit-size", str(unit_size), "--shard-images", "0",
              "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([PRELOAD])}
    commands = ([common + ["--shard", f"{i}/{workers}"] for i in range(workers)] if mode == "shard"
                else [common + ["--scheduler", f"local:{workers}"]])
    cpu, start = children_cpu(), time.perf_counter()
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for command in commands]
    outputs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - start
    failed = [text for p, text in zip(procs, outputs) if p.returncode != 0]
    if failed:
        raise RuntimeError(f"{mode} run failed:\n{failed[0][-3000:]}")
    return {"cpu_s": children_cpu() - cpu, "wall_s": wall}


def warm_costs(images: Path, work: Path, unit_sizes: list[int], workers: int, num_workers: int, batch: int,
               checkpoint: Path, repeats: int) -> list[dict]:
    """Per unit size and repeat: CPU-seconds of an extraction on a warm LocalCluster (its workers, and this process:
    client and scheduler) and of the same extraction in this process without dask."""
    import dask
    import distributed

    from dune_cache.config import ExtractConfig, StorageConfig
    from dune_cache.extract.cluster import LOCAL_CLUSTER_CONFIG
    from dune_cache.extract.run import run_extraction

    def config(unit_size: int, out: Path, scheduler: str | None) -> ExtractConfig:
        shutil.rmtree(out, ignore_errors=True)
        return ExtractConfig(teacher=TEACHER, images=images, out=str(out), checkpoint=checkpoint, resolution="16",
                             batch_size=batch, num_workers=num_workers, progress=False, scheduler=scheduler,
                             storage=StorageConfig(unit_size=unit_size, shard_images=0))

    def own_cpu() -> float:  # this process and its waited-for children (DataLoader workers; not the dask workers)
        usage, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime

    rows = []
    with dask.config.set({**LOCAL_CLUSTER_CONFIG, "distributed.worker.preload": [PRELOAD]}), \
            distributed.LocalCluster(n_workers=workers, processes=True, threads_per_worker=1,
                                     dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        def workers_cpu() -> float:
            return sum(client.run(process_cpu).values())

        run_extraction(config(max(unit_sizes), work / "warm.zarr", cluster.scheduler_address))  # teachers loaded
        for repeat in range(repeats):
            for unit_size in unit_sizes:
                own, start = own_cpu(), time.perf_counter()
                run_extraction(config(unit_size, work / "single.zarr", None))
                single = {"cpu_s": own_cpu() - own, "wall_s": time.perf_counter() - start}
                own, theirs, start = own_cpu(), workers_cpu(), time.perf_counter()
                result = run_extraction(config(unit_size, work / "dask.zarr", cluster.scheduler_address))
                dask_run = {"client_cpu_s": own_cpu() - own, "workers_cpu_s": workers_cpu() - theirs,
                            "wall_s": time.perf_counter() - start}
                rows.append({"unit_size": unit_size, "units": len(result.units), "repeat": repeat,
                             "single": single, "dask": dask_run})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def process_cpu() -> float:
    """CPU seconds (user + system) of the calling process and its waited-for children (DataLoader workers) so far
    (run in each dask worker)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def fit(units: list[int], overhead: list[float]) -> tuple[float, float]:
    """Least squares ``overhead = fixed + per_unit * units``."""
    slope, intercept = np.polyfit(np.asarray(units, float), np.asarray(overhead, float), 1)
    return float(intercept), float(slope)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--unit-sizes", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--workers", type=int, default=2, help="--shard slots, and dask worker processes")
    parser.add_argument("--num-workers", type=int, nargs="+", default=[0], help="DataLoader workers per process")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warm", action="store_true", help="also the cost per unit on a warm cluster")
    parser.add_argument("--warm-only", action="store_true", help="only that (no whole runs)")
    parser.add_argument("--work", type=Path, default=None, help="folder for images and caches (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    sys.path[:0] = [str(TESTS), str(REPO)]
    import conftest

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_cluster_"))
    images = make_images(work / f"images_{args.images}", args.images)
    checkpoint = work / "tiny.pth"
    torch.manual_seed(0)
    torch.save(conftest.TinyTeacher(conftest.TINY).state_dict(), checkpoint)
    rows = []
    for num_workers in [] if args.warm_only else args.num_workers:
        for unit_size in args.unit_sizes:
            units = -(-args.images // unit_size)
            for repeat in range(args.repeats):
                for mode in ("shard", "dask"):
                    measured = run_mode(mode, images, work / "cache.zarr", unit_size, args.workers, num_workers,
                                        args.batch_size, checkpoint)
                    rows.append({"mode": mode, "num_workers": num_workers, "unit_size": unit_size, "units": units,
                                 "repeat": repeat, **measured})
                    print(json.dumps(rows[-1]), flush=True)
    summary = []
    for num_workers in [] if args.warm_only else args.num_workers:
        medians = {}
        for unit_size in args.unit_sizes:
            for mode in ("shard", "dask"):
                picked = [r for r in rows if (r["num_workers"], r["unit_size"], r["mode"]) ==
                          (num_workers, unit_size, mode)]
                medians[unit_size, mode] = {key: statistics.median(r[key] for r in picked)
                                            for key in ("cpu_s", "wall_s")}
        units = [-(-args.images // u) for u in args.unit_sizes]
        overhead = [medians[u, "dask"]["cpu_s"] - medians[u, "shard"]["cpu_s"] for u in args.unit_sizes]
        fixed, per_unit = fit(units, overhead)
        summary.append({"num_workers": num_workers, "fixed_cpu_s": fixed, "per_unit_cpu_s": per_unit,
                        "by_unit_size": {str(u): {"units": n, **{m: medians[u, m] for m in ("shard", "dask")}}
                                         for u, n in zip(args.unit_sizes, units)}})
        print(f"--num-workers {num_workers}: dask - shard = {fixed:.2f} CPU-s per run + {per_unit * 1e3:.0f} CPU-ms "
              "per unit")
        for u, n in zip(args.unit_sizes, units):
            s, d = medians[u, "shard"], medians[u, "dask"]
            print(f"  unit {u:4d} ({n:4d} units): shard {s['cpu_s']:6.2f} CPU-s {s['wall_s']:6.2f} s wall | "
                  f"dask {d['cpu_s']:6.2f} CPU-s {d['wall_s']:6.2f} s wall")
    warm = []
    if args.warm or args.warm_only:
        os.environ["OMP_NUM_THREADS"] = "1"  # this process extracts too (torch reads it when it starts its threads)
        torch.set_num_threads(1)
        for num_workers in args.num_workers:
            rows_nw = warm_costs(images, work, args.unit_sizes, args.workers, num_workers, args.batch_size,
                                 checkpoint, args.repeats)
            warm += [{"num_workers": num_workers, **row} for row in rows_nw]
            units = [r["units"] for r in rows_nw]
            extra = [r["dask"]["client_cpu_s"] + r["dask"]["workers_cpu_s"] - r["single"]["cpu_s"] for r in rows_nw]
            fixed, per_unit = fit(units, extra)
            _, client_per_unit = fit(units, [r["dask"]["client_cpu_s"] for r in rows_nw])
            print(f"warm cluster, --num-workers {num_workers}: dask - single process = {fixed:.2f} CPU-s per run + "
                  f"{per_unit * 1e3:.0f} CPU-ms per unit "
                  f"(of which client and scheduler {client_per_unit * 1e3:.0f} ms)")
            summary.append({"warm": True, "num_workers": num_workers, "fixed_cpu_s": fixed,
                            "per_unit_cpu_s": per_unit, "client_per_unit_cpu_s": client_per_unit})
    if args.json:
        args.json.write_text(json.dumps({
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                        "torch": torch.__version__},
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "rows": rows, "warm_rows": warm, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
