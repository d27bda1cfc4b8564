"""``dune-student``: train a ViT student from cached teacher features, evaluate it, export it for timm."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

# Light modules only (no torch, timm, zarr): each command imports the heavy ones it needs.
from dune_cache import CheckpointError, StoreError, fail, new_app, setup_logging

from .config import load_config
from .errors import ConfigError, DataError, NonFiniteLossError, RunMismatchError

app = new_app(__doc__)


def _user_errors() -> tuple:
    """The errors reported in one line with exit status 2 (none of their classes needs torch)."""
    return (ConfigError, DataError, RunMismatchError, NonFiniteLossError, StoreError, CheckpointError, ValueError,
            FileNotFoundError)


def without_worker_traceback(message: str) -> str:
    """The message of an error raised in a DataLoader worker without the worker's traceback that torch writes
    into it when raising it again in the trainer (other messages as they are)."""
    _, found, trace = message.rpartition("Traceback (most recent call last):\n")
    if not found:
        return message
    lines = trace.splitlines()
    first = next((i for i, line in enumerate(lines) if not line.startswith(" ")), 0)  # past the frames
    name, _, text = "\n".join(lines[first:]).partition(": ")
    return text or name


@app.command(context_settings={"allow_extra_args": False})
def train(
    overrides: Optional[List[str]] = typer.Argument(None, help="Config overrides key=value, e.g. optim.base_lr=1e-4."),
    config: Optional[Path] = typer.Option(None, help="Config file (TOML or JSON) mirroring TrainConfig."),
    cache: Optional[str] = typer.Option(None, help="= data.cache"),
    images: Optional[str] = typer.Option(None, help="= data.images"),
    out: Optional[str] = typer.Option(None, help="= out (run directory; an existing run resumes)"),
    steps: Optional[int] = typer.Option(None, help="= steps"),
    batch_size: Optional[int] = typer.Option(None, help="= data.batch_size"),
    attention: Optional[str] = typer.Option(None, help="= student.attention: auto, xformers or sdpa"),
    heads: Optional[str] = typer.Option(None, help="= heads.kind: transformer (DUNE), ladder (UNIC), mlp or sak (SAK: "
                                        "adapter paths, per-level loss on a cache extracted with --blocks)"),
    live_teachers: Optional[bool] = typer.Option(None, "--live-teachers/--cached-targets",
                                                 help="= live_teachers (baseline: run the teachers in the loop)"),
    device: Optional[str] = typer.Option(None, help="= device"),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="= data.allow_partial=true (train on the done "
                                       "images of a cache still being extracted)"),
    chunk_cache: Optional[str] = typer.Option(None, help="= data.chunk_cache: local folder keeping the chunks of a "
                                              "remote (s3://, gs://) cache, or `default` (~/.cache/dune_cache/chunks)"),
    chunk_cache_limit_gb: Optional[float] = typer.Option(None, help="= data.chunk_cache_limit_gb: GB the chunk "
                                                         "cache may hold (0: no limit)"),
    progress: bool = typer.Option(True, help="= progress"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Train (or resume) a student; every flag is a shortcut for one config field."""
    setup_logging(verbose)
    flags = {"data.cache": cache, "data.images": images, "out": out, "steps": steps, "data.batch_size": batch_size,
             "student.attention": attention, "heads.kind": heads, "live_teachers": live_teachers, "device": device,
             "data.allow_partial": True if allow_partial else None, "data.chunk_cache": chunk_cache,
             "data.chunk_cache_limit_gb": chunk_cache_limit_gb, "progress": progress}
    pairs = list(overrides or []) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    from dune_cache import Interrupted, disk_full_error

    try:
        cfg = load_config(config, pairs)
        from .training.trainer import train as run_training

        result = run_training(cfg)
    except Interrupted as exc:  # a checkpoint of the step it stopped at was written
        typer.secho(str(exc), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(exc.exit_code)
    except KeyboardInterrupt:  # before training started, or Ctrl-C twice
        typer.secho("interrupted; no checkpoint written now (the run directory keeps its last one)",
                    fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130)
    except _user_errors() as exc:
        fail(ValueError(without_worker_traceback(str(exc))))
    except OSError as exc:  # a full disk while writing a checkpoint: the previous one is complete
        full = disk_full_error(exc, str(out or "the run directory"), "The last complete checkpoint is kept.",
                               "re-run the same command to resume")
        if full is None:
            raise
        fail(full)
    damaged = (f", {result.damaged_targets} damaged targets left out (data.skip_damaged)"
               if result.damaged_targets else "")
    typer.echo(f"trained {result.session_steps} steps in this session ({result.steps} of {cfg.steps} in total) in "
               f"{result.seconds:.1f}s, final loss {result.final_loss:.4f}{damaged}; run in {result.run_dir}")


@app.command("eval")
def evaluate_cmd(
    checkpoint: Path = typer.Option(..., help="Run checkpoint (RUN/checkpoint.pt)."),
    cache: str = typer.Option(..., help="Held-out cache (same teachers and checkpoints)."),
    images: str = typer.Option(..., help="Image directory or list holding the held-out cache's images."),
    batch_size: int = typer.Option(16, min=1),
    device: str = typer.Option("auto", help="auto: the GPU when there is one, else cpu"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    baselines: bool = typer.Option(False, "--baselines", help="Also score a random-init student and the mean "
                                   "training target (of the run's training cache) in the same space."),
    seed: int = typer.Option(0, help="Seed of the random-init student (--baselines)."),
) -> None:
    """Per-teacher cosine fidelity (CLS and patch) of the projected student features on held-out images, in the
    run's standardised target space (where the training set's mean target is the origin: a constant scores 0)."""
    setup_logging(False)
    try:
        from .evaluation.fidelity import evaluate

        result = evaluate(checkpoint, cache, images, batch_size=batch_size, device=device, baselines=baselines,
                          seed=seed)
    except _user_errors() as exc:
        fail(exc)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for teacher, r in result.items():
        for name, row in [("student", r), *r.get("baselines", {}).items()]:
            cls = "n/a (not distilled)" if row["cls"] is None else f"{row['cls']:.4f}"
            typer.echo(f"{teacher}: {name}: cls cosine {cls}, patch cosine {row['patch']:.4f} over {row['images']} "
                       "images")


@app.command()
def export(
    checkpoint: Path = typer.Option(..., help="Run checkpoint (RUN/checkpoint.pt)."),
    out: Path = typer.Option(..., help="Output .safetensors (a .json sidecar is written beside it)."),
) -> None:
    """Write the student encoder as safetensors that timm.create_model loads (SAK runs: also their teacher paths)."""
    setup_logging(False)
    try:
        import torch

        from .model.export import export_encoder, export_sak
        from .runs.loading import load_run

        run = load_run(checkpoint, torch.device("cpu"))
        path = (export_sak(run.student, run.heads.projectors, out) if run.cfg.heads.kind == "sak"
                else export_encoder(run.student, out))
    except _user_errors() as exc:
        fail(exc)
    typer.echo(f"encoder written to {path}")


@app.command()
def show(
    run: Path = typer.Argument(..., help="Run directory (or its checkpoint.pt)."),
    out: Path = typer.Option(..., help="Folder for the PNGs (one per image, and grid.png)."),
    cache: Optional[str] = typer.Option(None, help="Cache of the run's teachers (default: the run's data.cache; "
                                        "a held-out cache tells more)."),
    images: Optional[List[str]] = typer.Option(None, help="Image to show (repeatable): its id as in the "
                                               "manifest, or a unique file name with or without extension."),
    first: Optional[int] = typer.Option(None, min=1, help="Show the first N images instead (default 4)."),
    image_root: Optional[Path] = typer.Option(None, help="Image folder or list file, when the images moved since "
                                              "extraction (default: the cache's provenance)."),
    cell: int = typer.Option(224, min=8, help="Size in pixels of each picture."),
    device: str = typer.Option("auto", help="auto: the GPU when there is one, else cpu"),
) -> None:
    """PNGs of the student's projected patch features next to each teacher's (joint PCA-RGB maps)."""
    setup_logging(False)
    try:
        from .evaluation.show import show_run

        result = show_run(run, out, cache, images, first, image_root, cell, device)
    except _user_errors() as exc:
        fail(exc)
    typer.echo(f"wrote {len(result.rows)} row PNGs and {result.grid}")


@app.command()
def curves(run: Path = typer.Argument(..., help="Run directory (holding metrics.jsonl).")) -> None:
    """Redraw RUN/curves.png (training loss, learning rate, held-out fidelity) from RUN/metrics.jsonl."""
    try:
        from .evaluation.curves import plot_curves

        path = plot_curves(run)
    except _user_errors() as exc:
        fail(exc)
    typer.echo(f"curves written to {path}")


@app.command()
def probe(
    checkpoint: Path = typer.Option(..., help="Run checkpoint (RUN/checkpoint.pt)."),
    data: Path = typer.Option(..., help="Probe data folder (tools/prepare_probe_data.py writes one)."),
    cache: Optional[str] = typer.Option(None, help="Cache extracted over the probe data folder: its teachers are "
                                        "probed too."),
    out: Optional[Path] = typer.Option(None, help="JSON report (default: probe.json beside the checkpoint)."),
    seed: int = typer.Option(0, help="Test split, cross-validation folds and the random-init student."),
    heads: bool = typer.Option(True, help="Also probe each teacher head's projection of the student."),
    batch_size: int = typer.Option(16, min=1),
    device: str = typer.Option("auto", help="auto: the GPU when there is one, else cpu"),
) -> None:
    """kNN, linear, disparity and correspondence probes of the student, a random-init student and each teacher."""
    setup_logging(False)
    out = out or checkpoint.parent / "probe.json"
    try:
        from .evaluation.probe import run_probes
        from .evaluation.probe_data import ProbeConfig

        report = run_probes(ProbeConfig(checkpoint=str(checkpoint), data=str(data), cache=cache, out=str(out),
                                        seed=seed, heads=heads, batch_size=batch_size, device=device))
    except _user_errors() as exc:
        fail(exc)
    typer.echo(report.table())
    typer.echo(f"report written to {out}")


@app.command()
def route(
    checkpoint: Path = typer.Option(..., help="Checkpoint of a heads.kind=sak run (RUN/checkpoint.pt)."),
    data: Path = typer.Option(..., help="Probe data folder (tools/prepare_probe_data.py writes one)."),
    out: Path = typer.Option(..., help="Folder for route.json, router_weights.png and the export with routers."),
    steps: int = typer.Option(300, min=1, help="Full-batch training steps per task."),
    pooling: Optional[str] = typer.Option(None, help="Router weights per `token` or per image (`global`, SAK); "
                                          "default: the run's heads.router_pooling."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto: the GPU when there is one, else cpu"),
) -> None:
    """SAK stage 2: per task (dense disparity, faces) a Mixture-of-Representations router and a light head on the
    frozen stem and teacher paths; writes scores, the routers' weights picture and the multi-task export."""
    setup_logging(False)
    if pooling not in (None, "token", "global"):
        fail(ValueError(f"--pooling: {pooling!r} is not one of token, global"))
    try:
        from .evaluation.route import RouteConfig, report_table, run_routing

        report = run_routing(RouteConfig(checkpoint=str(checkpoint), data=str(data), out=str(out), steps=steps,
                                         pooling=pooling, seed=seed, device=device))
    except _user_errors() as exc:
        fail(exc)
    typer.echo(report_table(report))
    typer.echo(f"routers, picture and export written to {out}")


@app.command("convert-run")
def convert_run(
    source: Path = typer.Argument(..., metavar="IN", help="Run checkpoint that the safe loader refuses."),
    out: Path = typer.Argument(..., metavar="OUT", help="Checkpoint to write (its plain contents)."),
    trust_this_file: bool = typer.Option(False, "--trust-this-file", help="Required: you vouch for IN, which is "
                                         "loaded with full unpickling (it can run code)."),
) -> None:
    """Keep the tensors and plain values of a run checkpoint you trust, in a file every command loads without running
    code (objects without a plain form are listed and left out)."""
    try:
        from .runs.checkpoint import convert_run as run_convert

        dropped, converted = run_convert(source, out, trust_this_file)
    except _user_errors() as exc:
        fail(exc)
    for item in converted:
        typer.echo(f"  converted {item['path']}: {item['type']} kept as {item['as']}")
    for item in dropped:
        typer.echo(f"  dropped {item['path']}: {item['type']} has no plain form, left out")
    typer.echo(f"run checkpoint written to {out}")


if __name__ == "__main__":  # torchrun -m dune_student.cli train ...
    app()
