"""``dune-student``: train a ViT student from cached teacher features, evaluate it, export it for timm."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from dune_cache.console import fail, setup_logging

from .config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _user_errors() -> tuple:
    from dune_cache.store import StoreError
    from dune_cache.teachers import CheckpointError

    from .data import DataError
    from .train import RunMismatchError

    return ConfigError, DataError, RunMismatchError, StoreError, CheckpointError, ValueError, FileNotFoundError


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
             "student.attention": attention, "live_teachers": live_teachers, "device": device,
             "data.allow_partial": True if allow_partial else None, "data.chunk_cache": chunk_cache,
             "data.chunk_cache_limit_gb": chunk_cache_limit_gb, "progress": progress}
    pairs = list(overrides or []) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    try:
        cfg = load_config(config, pairs)
        from .train import train as run_training

        result = run_training(cfg)
    except _user_errors() as exc:
        fail(exc)
    typer.echo(f"trained {result.steps} steps in {result.seconds:.1f}s, final loss {result.final_loss:.4f}; "
               f"run in {result.run_dir}")


@app.command("eval")
def evaluate_cmd(
    checkpoint: Path = typer.Option(..., help="Run checkpoint (RUN/checkpoint.pt)."),
    cache: str = typer.Option(..., help="Held-out cache (same teachers and checkpoints)."),
    images: str = typer.Option(..., help="Image directory or list holding the held-out cache's images."),
    batch_size: int = typer.Option(16, min=1),
    device: str = typer.Option("cpu"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Per-teacher cosine fidelity (CLS and patch) of the projected student features on held-out images."""
    setup_logging(False)
    try:
        from .evaluate import evaluate

        result = evaluate(checkpoint, cache, images, batch_size=batch_size, device=device)
    except _user_errors() as exc:
        fail(exc)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for teacher, r in result.items():
        cls = "n/a (not distilled)" if r["cls"] is None else f"{r['cls']:.4f}"
        typer.echo(f"{teacher}: cls cosine {cls}, patch cosine {r['patch']:.4f} over {r['images']} images")


@app.command()
def export(
    checkpoint: Path = typer.Option(..., help="Run checkpoint (RUN/checkpoint.pt)."),
    out: Path = typer.Option(..., help="Output .safetensors (a .json sidecar is written beside it)."),
) -> None:
    """Write the student encoder as safetensors that timm.create_model loads."""
    setup_logging(False)
    try:
        import torch

        from .evaluate import load_run
        from .export import export_encoder

        path = export_encoder(load_run(checkpoint, torch.device("cpu")).student, out)
    except _user_errors() as exc:
        fail(exc)
    typer.echo(f"encoder written to {path}")


@app.command()
def show(
    run: Path = typer.Argument(..., help="Run directory (or its checkpoint.pt)."),
    out: Path = typer.Option(..., help="Folder for the PNGs (one per image, and grid.png)."),
    cache: Optional[str] = typer.Option(None, help="Cache of the run's teachers (default: the run's data.cache; "
                                        "a held-out cache tells more)."),
    images: Optional[List[str]] = typer.Option(None, help="Image id to show (repeatable)."),
    first: Optional[int] = typer.Option(None, min=1, help="Show the first N images instead (default 4)."),
    image_root: Optional[Path] = typer.Option(None, help="Image folder or list file, when the images moved since "
                                              "extraction (default: the cache's provenance)."),
    cell: int = typer.Option(224, min=8, help="Size in pixels of each picture."),
    device: str = typer.Option("cpu"),
) -> None:
    """PNGs of the student's projected patch features next to each teacher's (joint PCA-RGB maps)."""
    setup_logging(False)
    try:
        from .show import show_run

        result = show_run(run, out, cache, images, first, image_root, cell, device)
    except _user_errors() as exc:
        fail(exc)
    typer.echo(f"wrote {len(result.rows)} row PNGs and {result.grid}")


@app.command()
def curves(run: Path = typer.Argument(..., help="Run directory (holding metrics.jsonl).")) -> None:
    """Redraw RUN/curves.png (training loss, learning rate, held-out fidelity) from RUN/metrics.jsonl."""
    try:
        from .curves import plot_curves

        path = plot_curves(run)
    except _user_errors() as exc:
        fail(exc)
    typer.echo(f"curves written to {path}")


if __name__ == "__main__":  # torchrun -m dune_student.cli train ...
    app()
