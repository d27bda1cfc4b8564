"""``dune-cache``: list teachers, extract features, inspect, verify, repair, catalog, recompress and picture caches;
convert a trusted checkpoint to safetensors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

# Light modules only (no torch, timm, zarr, numpy): each command imports the heavy ones it needs.
from .config import (
    AUTO_SHARD_FROM,
    ENCODINGS,
    MAX_SHARD_IMAGES,
    SHARD_TARGET_BYTES,
    STATS_SAMPLE,
    EncodingConfig,
    ExtractConfig,
    StorageConfig,
    ViewSampling,
)
from .errors import (
    CheckpointError,
    ClusterError,
    GeometryError,
    Interrupted,
    ManifestError,
    NonFiniteFeaturesError,
    StoreError,
)
from .teachers import UnknownTeacherError, list_prefixes, list_teachers, prefix_form
from .teachers.blocks import parse_blocks
from .teachers.spec import CLIP_MEAN, CLIP_STD, HALF_MEAN, HALF_STD, IMAGENET_MEAN, IMAGENET_STD
from .utils.console import fail, new_app, setup_logging
from .utils.redaction import redact_text
from .utils.redaction import redact_url as redact

app = new_app(__doc__)
NORMALISATION_NAMES = {(IMAGENET_MEAN, IMAGENET_STD): "imagenet", (HALF_MEAN, HALF_STD): "0.5",
                       (CLIP_MEAN, CLIP_STD): "clip"}
ENCODING_HELP = (f"Feature encoding NAME[:key=value,...], NAME one of {', '.join(ENCODINGS)}; e.g. "
                 "bitround:keepbits=7, "
                 "int8-channel, int8-token:outlier_ratio=6, pca:variance=0.99, pca-int8:rank=128 or "
                 "lowrank:image_rank=64,basis=int8 (each image's own rank-64 SVD, its factors int8; sizes and "
                 "fidelity per teacher in "
                 "docs/benchmarks.md; layout in docs/cache-format.md, Encodings).")
USER_ERRORS = (CheckpointError, UnknownTeacherError, GeometryError, ManifestError, StoreError,
               NonFiniteFeaturesError, ClusterError, ValueError)


@app.command()
def teachers(offline: bool = typer.Option(False, "--offline", help="List instead the real checkpoints installed "
                                          "packages ship (what `extract --checkpoint auto` uses)."),
             path: Optional[str] = typer.Option(None, metavar="TEACHER", help="Print only the checkpoint file "
                                                "`extract --checkpoint auto` uses for TEACHER (converted first if "
                                                "needed).")) -> None:
    """List registered teachers and their geometry (--offline: the real checkpoints installed packages ship)."""
    if offline or path:
        from .offline.catalogue import offline_checkpoint, offline_table

        try:
            typer.echo(offline_checkpoint(path) if path else "\n".join(offline_table()))
        except USER_ERRORS as exc:
            fail(exc)
        return
    specs = list_teachers()
    width = max(len(name) for name in [s.name for s in specs] + [prefix_form(p) for p in list_prefixes()])
    arch_width = max(len(s.arch) for s in specs)  # the longest name (or prefix form) and arch set their columns
    header = (f"{'name':{width}} {'arch':{arch_width}} {'patch':>5} {'dim':>5} {'reg':>3} {'cls':10} "
              f"{'native':>9} {'norm':>4}  mean/std")
    typer.echo(header)
    for s in specs:
        native = f"{s.native_resolution[0]}x{s.native_resolution[1]}"
        norm = NORMALISATION_NAMES.get((s.mean, s.std), f"{s.mean}/{s.std}")
        typer.echo(f"{s.name:{width}} {s.arch:{arch_width}} {s.patch_size:>5} {s.embed_dim:>5} {s.num_registers:>3} "
                   f"{s.cls_source:10} {native:>9} {'yes' if s.final_norm else 'no':>4}  {norm}")
    for prefix, description in list_prefixes().items():
        typer.echo(f"{prefix_form(prefix):{width}} {description}")


@app.command()
def extract(
    teacher: str = typer.Option(..., help="Teacher name (see `dune-cache teachers`)."),
    images: Path = typer.Option(..., help="Image directory (recursive) or list file (`path[<TAB>tag]` per line)."),
    out: str = typer.Option(..., help="Cache root (a Zarr v3 group); one group per teacher inside."),
    checkpoint: Optional[Path] = typer.Option(None, help="Local checkpoint file of the teacher, or `auto`: the real "
                                              "one an installed package ships (`dune-cache teachers --offline`)."),
    name: Optional[str] = typer.Option(None, help="Teacher group name in the cache (default: the teacher name, "
                                       "with : / @ replaced by -, e.g. radio-c_radio_v3_b-dino_v2-g)."),
    resolution: Optional[str] = typer.Option(None, help="Teacher input size N or HxW (default: native)."),
    student_patch: Optional[int] = typer.Option(None, help="Shared grid: the student's patch size."),
    student_resolution: Optional[str] = typer.Option(None, help="Shared grid: the student's input size."),
    resize: str = typer.Option("squash", help="squash (whole image to HxW) or center_crop."),
    batch_size: int = typer.Option(32, min=1),
    num_workers: Optional[int] = typer.Option(None, min=0, help="Image-decoding DataLoader workers "
                                              "(default: 1 on CPU; on GPU the process's share of cores, at most 8)."),
    writer_threads: int = typer.Option(ExtractConfig.writer_threads, min=1, help="Threads that encode, compress "
                                       "and write each batch's features."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    amp: bool = typer.Option(True, help="bf16 autocast on CUDA."),
    dtype: str = typer.Option(StorageConfig.dtype, help="Stored dtype: float16 or float32."),
    codec: str = typer.Option(StorageConfig.codec, help="auto (none for plain features, zstd for encoded ones; a "
                              "resumed group keeps its own), blosc-zstd, blosc-lz4, zstd, gzip or none."),
    level: Optional[int] = typer.Option(StorageConfig.level, help="Compression level (default: the codec's)."),
    unit_size: int = typer.Option(StorageConfig.unit_size, min=1, help="Images per work unit."),
    shard_images: Optional[int] = typer.Option(
        StorageConfig.shard_images, min=0, help=f"Images per Zarr shard (0: one object per image; default: 0 below "
        f"{AUTO_SHARD_FROM:,} images, else the largest power of two of images within {SHARD_TARGET_BYTES >> 20} MiB "
        f"raw per shard, at most {MAX_SHARD_IMAGES}; a resumed group keeps its own; docs/scale.md)."),
    encoding: str = typer.Option("none", help=ENCODING_HELP),
    checksum: bool = typer.Option(StorageConfig.checksum, help="crc32c checksum in every feature chunk "
                                  "(a corrupted chunk is an error on read, not wrong values)."),
    views: int = typer.Option(0, min=0, help="K random views per image (RandomResizedCrop 0.4-1 + flip) stored "
                              "with their boxes besides the whole image: K+1 times the features."),
    view_seed: int = typer.Option(ViewSampling.seed, help="Seed of the views' boxes (recorded in provenance)."),
    blocks: Optional[str] = typer.Option(None, help="Also store these intermediate blocks' tokens (before the "
                                         "final norm): 0-based indices, e.g. 5,11,17,23, or `sak` (SAK's four: "
                                         "[2,5,8,11] for 12 blocks), or a teacher's own choice (`dpt`: the blocks "
                                         "Depth Anything V2's head reads); docs/cache-format.md, \"Levels\"."),
    shard: str = typer.Option("0/1", help="This machine's share i/n of the work (several machines)."),
    scheduler: Optional[str] = typer.Option(None, help="Run the work units as tasks on a dask.distributed cluster "
                                            "instead: its address (tcp://host:8786) or scheduler file (*.json), or "
                                            "local[:N] for N worker processes on this machine (default: one per GPU); "
                                            "workers may join and leave (docs/cluster.md)."),
    overwrite: bool = typer.Option(False, help="Delete an existing teacher group, matching or not, and extract it "
                                   "again from scratch (without it a matching group is resumed, "
                                   "a mismatching one refused)."),
    retry_failed: bool = typer.Option(False, help="Try again images recorded as failed."),
    random_weights: bool = typer.Option(False, help="Run without a checkpoint (speed tests only)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a teacher over images and store its CLS and patch features (resumes if interrupted)."""
    setup_logging(verbose)
    try:
        from .offline.catalogue import resolve_checkpoint_option

        checkpoint = resolve_checkpoint_option(teacher, checkpoint)
        cfg = ExtractConfig(
            teacher=teacher, images=images, out=out, checkpoint=checkpoint, name=name, resolution=resolution,
            student_patch=student_patch, student_resolution=student_resolution, resize=resize,
            batch_size=batch_size, num_workers=num_workers, writer_threads=writer_threads, device=device, amp=amp,
            storage=StorageConfig(dtype=dtype, codec=codec, level=level, unit_size=unit_size,
                                  shard_images=shard_images, encoding=EncodingConfig.parse(encoding),
                                  checksum=checksum),
            views=views, view_sampling=ViewSampling(seed=view_seed), blocks=parse_blocks(blocks), shard=shard,
            scheduler=scheduler, overwrite=overwrite,
            retry_failed=retry_failed, random_weights=random_weights, progress=progress)
        cfg.check()  # every flag, before torch is imported
        from .extract.run import run_extraction

        result = run_extraction(cfg)
        report = verified_group(out, result.group) if scheduler else None
    except USER_ERRORS as exc:
        fail(exc)
    except Interrupted as exc:
        typer.secho(redact_text(str(exc)), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(exc.exit_code)
    typer.echo(f"{result.group}: {result.processed} images extracted, {result.failed} failed "
               f"({result.images_per_s:.1f} img/s); cache has {result.total} images")
    if report is not None:
        typer.echo(f"[{report.name}] {'OK' if report.ok else 'PROBLEMS'}: {report.checked} images verified, "
                   f"{len(result.units)} units on {len({u.worker for u in result.units})} workers")
        for problem in report.problems:
            typer.echo(f"  - {problem}")
        if not report.ok:
            raise typer.Exit(1)


def verified_group(cache: str, name: str):
    """``dune-cache verify`` of teacher group ``name`` of ``cache`` (what a ``--scheduler`` run checks at its end)."""
    from .commands.verify import verify_teacher
    from .format.store import TeacherStore

    return verify_teacher(TeacherStore.open(cache, name))


@app.command()
def info(cache: str = typer.Argument(..., help="Cache root."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Teachers, images done/failed, shapes, dtype, codec, bytes on disk, compression ratio, provenance."""
    from .commands.info import cache_info
    from .encodings import encoding_summary

    try:
        report = cache_info(cache)
    except USER_ERRORS as exc:
        fail(exc)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for name, t in report.items():
        p = t["provenance"]
        typer.echo(f"[{name}] teacher {p['teacher']['name']} ({p['teacher']['arch']})")
        typer.echo(f"  images     {t['images']} total, {t['done']} done, {t['failed']} failed, {t['pending']} pending")
        typer.echo(f"  cls        {t['cls_shape']}  patch {t['patch_shape']}  {t['dtype']}")
        if t["views"]:
            v = p["views"]
            typer.echo(f"  views      {t['views']} per image, patch {t['views_patch_shape']}; boxes: seed {v['seed']}, "
                       f"scale {v['scale']}, ratio {[round(r, 4) for r in v['ratio']]}, flip p {v['flip_p']}")
        typer.echo(f"  storage    codec {t['codec']} level {t['level']}, shard images {t['shard_images']}, "
                   f"crc32c {'yes' if p['storage']['checksum'] else 'no'}")
        typer.echo(f"  encoding   {encoding_summary(t['encoding'])}")
        if t["levels"]:
            typer.echo(f"  levels     blocks {p['levels']['blocks']}: {p['levels']['tokens']}")
        for level in t["levels"].values():
            typer.echo(f"    b{level['block']:<7} {level['bytes'] / 2**20:.2f} MiB on disk, "
                       f"{level['share']:.1%} of the group")
        typer.echo(f"  on disk    {t['bytes_stored'] / 2**20:.2f} MiB, {t['bytes_per_image'] / 1024:.1f} KiB/image, "
                   f"ratio {t['compression_ratio']:.3f}x vs raw {t['raw_dtype']}")
        g = p["geometry"]
        typer.echo(f"  geometry   {g['resolution'][0]}x{g['resolution'][1]} -> grid {g['grid'][0]}x{g['grid'][1]}, "
                   f"resize {g['resize']} ({g['interpolation']})")
        typer.echo(f"  checkpoint {p['checkpoint']['file']} sha256 {p['checkpoint']['sha256']}")
        typer.echo(f"  manifest   sha256 {p['images']['manifest_sha256']}")
        typer.echo(f"  created    {p['created']} by dune_cache {p['software']['dune_cache']}")


@app.command()
def verify(cache: str = typer.Argument(..., help="Cache root."),
           progress: bool = typer.Option(True, help="Show a progress bar.")) -> None:
    """Check completeness, that every chunk decodes and is finite, and provenance consistency (exit 1 on problems)."""
    from tqdm.auto import tqdm

    from .commands.verify import verify_cache

    try:
        reports = verify_cache(cache, lambda name, total: tqdm(total=total, unit="img", desc=f"verify {name}",
                                                                disable=not progress))
    except USER_ERRORS as exc:
        fail(exc)
    for r in reports:
        typer.echo(f"[{r.name}] {'OK' if r.ok else 'PROBLEMS'}: {r.checked} images checked")
        for problem in r.problems:
            typer.echo(f"  - {problem}")
    if not all(r.ok for r in reports):
        raise typer.Exit(1)


@app.command()
def stats(cache: str = typer.Argument(..., help="Cache root."),
          teacher: Optional[list[str]] = typer.Option(None, help="Teacher group (repeatable; default: all)."),
          sample: int = typer.Option(STATS_SAMPLE, min=0, help="Estimate on at most this many done images, "
                                     "spread evenly over the group (0: all; the cost stops growing with the cache "
                                     "beyond it)."),
          verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Compute per-channel mean/std and PHI-S of each teacher group (out of core) and store them in the cache."""
    import numpy as np

    from .commands.stats import compute_stats
    from .format.root import select_teachers
    from .format.stats import write_stats
    from .storage.location import check_writable

    setup_logging(verbose)
    try:
        names = select_teachers(cache, teacher or None)
        check_writable(cache)  # a read-only location fails before the (long) computation
        for name in names:
            result = compute_stats(cache, name, sample=sample)
            write_stats(cache, name, result)
            scale = float(np.linalg.norm(result.phis_matrix[0]))
            typer.echo(f"[{name}] {result.count} images (of {result.done} done) -> {redact(cache)}/{name}/stats")
            for label, mean, std in (("cls", result.cls_mean, result.cls_std),
                                     ("patch", result.patch_mean, result.patch_std)):
                typer.echo(f"  {label:6} |mean| max {np.abs(mean).max():.4g}, std min/median/max "
                           f"{std.min():.4g} / {np.median(std):.4g} / {std.max():.4g}")
            typer.echo(f"  PHI-S  {result.phis_matrix.shape[0]}x{result.phis_matrix.shape[1]}, "
                       f"scale 1/sqrt(mean eigenvalue) = {scale:.4g}")
    except USER_ERRORS as exc:
        fail(exc)


@app.command()
def show(cache: str = typer.Argument(..., help="Cache root."),
         out: Path = typer.Option(..., help="Folder for the PNGs (one per image, and grid.png)."),
         images: Optional[list[str]] = typer.Option(None, help="Image to show (repeatable): its id as in the "
                                                    "manifest, or a unique file name with or without extension."),
         first: Optional[int] = typer.Option(None, min=1, help="Show the first N images instead (default 4)."),
         teacher: Optional[list[str]] = typer.Option(None, help="Teacher group (repeatable; default: all)."),
         image_root: Optional[Path] = typer.Option(None, help="Image folder or list file, when the images "
                                                   "moved since extraction (default: the cache's provenance)."),
         cell: int = typer.Option(224, min=8, help="Height in pixels of each picture."),
         verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """PNGs of each teacher's patch features as PCA-RGB maps beside the input image."""
    from .commands.show import show_cache

    setup_logging(verbose)
    try:
        result = show_cache(cache, out, images, first, teacher, image_root, cell)
    except USER_ERRORS as exc:
        fail(exc)
    for note in result.missing_images:
        typer.secho(f"warning: {note}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"wrote {len(result.rows)} row PNGs and {result.grid}")


@app.command("ls")
def list_caches(root: str = typer.Argument(..., help="Folder or fsspec URL (s3://bucket/prefix, ...) to search."),
                depth: int = typer.Option(3, min=0, help="Folder levels below ROOT to search for caches."),
                as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Catalog of the caches under ROOT: per teacher group its checkpoint, images, geometry, storage, progress
    and size (read-only)."""
    from .commands.catalog import catalog, catalog_json, table_lines

    try:
        entries = catalog(root, depth)
    except USER_ERRORS as exc:
        fail(exc)
    if as_json:
        typer.echo(json.dumps(catalog_json(entries), indent=2))
    elif not entries:
        typer.echo(f"no caches under {redact(root)} (searched {depth} levels deep)")
    else:
        typer.echo("\n".join(table_lines(entries)))


@app.command()
def repair(cache: str = typer.Argument(..., help="Cache root."),
           teacher: Optional[str] = typer.Option(None, help="Teacher group (default: every group)."),
           checkpoint: Optional[Path] = typer.Option(None, help="Teacher checkpoint (default: the path recorded in "
                                                     "provenance); its sha256 must equal the recorded one."),
           images: Optional[Path] = typer.Option(None, help="Image directory or list (default: the source recorded "
                                                 "in provenance); it must list exactly the group's images."),
           dry_run: bool = typer.Option(False, "--dry-run", help="Only report what would be re-extracted."),
           batch_size: int = typer.Option(32, min=1),
           num_workers: Optional[int] = typer.Option(None, min=0, help="Image-decoding DataLoader workers."),
           device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
           amp: bool = typer.Option(True, help="bf16 autocast on CUDA (as the group was extracted)."),
           progress: bool = typer.Option(True, help="Show progress bars."),
           verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Verify, then re-extract only the damaged images (with the group's own settings) so that verify passes."""
    from .commands.repair import RepairConfig, repair_cache, summary_lines

    setup_logging(verbose)
    try:
        plans = repair_cache(RepairConfig(cache=cache, teacher=teacher, checkpoint=checkpoint, images=images,
                                          dry_run=dry_run, batch_size=batch_size, num_workers=num_workers,
                                          device=device, amp=amp, progress=progress))
    except USER_ERRORS as exc:
        fail(exc)
    for plan in plans:
        for line in summary_lines(plan, dry_run):
            typer.echo(line)


@app.command()
def recompress(
    cache: str = typer.Argument(..., help="Source cache root (only read)."),
    out: str = typer.Option(..., help="New cache root to write."),
    encoding: str = typer.Option(..., help=ENCODING_HELP),
    dtype: Optional[str] = typer.Option(None, help="Stored float dtype (default: the source's)."),
    codec: Optional[str] = typer.Option(None, help="blosc-zstd, blosc-lz4, zstd, gzip or none (default: auto, decided "
                                        "for the new encoding as extract decides it)."),
    level: Optional[int] = typer.Option(None, help="Compression level (default: the codec's)."),
    unit_size: Optional[int] = typer.Option(None, min=1, help="Images per work unit (default: the source's)."),
    shard_images: Optional[int] = typer.Option(None, min=0, help="Images per Zarr shard (default: the source's)."),
    teacher: Optional[list[str]] = typer.Option(None, help="Teacher group (repeatable; default: all)."),
    overwrite: bool = typer.Option(False, help="Replace teacher groups that already exist in --out."),
    block_images: int = typer.Option(64, min=1, help="Images per task (whole work units)."),
    workers: int = typer.Option(2, min=1, help="Threads decoding/encoding blocks."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Re-encode a cache's features into a new cache root (out of core, no teacher run; the source is untouched)."""
    from .commands.recompress import RecompressConfig
    from .commands.recompress import recompress as run_recompress

    setup_logging(verbose)
    try:
        results = run_recompress(RecompressConfig(
            cache=cache, out=out, encoding=EncodingConfig.parse(encoding), dtype=dtype, codec=codec, level=level,
            unit_size=unit_size, shard_images=shard_images, teachers=teacher, overwrite=overwrite,
            block_images=block_images, workers=workers, progress=progress))
    except USER_ERRORS as exc:
        fail(exc)
    for r in results:
        typer.echo(f"[{r.teacher}] {r.done}/{r.images} images -> {redact(out)}/{r.teacher}: "
                   f"{r.bytes_before / 2**20:.2f} MiB "
                   f"-> {r.bytes_after / 2**20:.2f} MiB ({r.ratio:.2f}x smaller)")



@app.command("convert-checkpoint")
def convert_checkpoint(
    source: Path = typer.Argument(..., metavar="IN", help="Checkpoint that the safe loader refuses (.pth, .pt, ...)."),
    out: Path = typer.Argument(..., metavar="OUT", help="The .safetensors file to write."),
    trust_this_file: bool = typer.Option(False, "--trust-this-file", help="Required: you vouch for IN, which is "
                                         "loaded with full unpickling (it can run code)."),
) -> None:
    """Convert a checkpoint you trust into one safetensors file that every command loads without running code
    (tensors, plus the file's other plain fields as JSON; objects without a plain form are listed and left out)."""
    from .commands.convert_checkpoint import convert_checkpoint as run_convert
    from .commands.convert_checkpoint import summary_lines

    try:
        result = run_convert(source, out, trust_this_file)
    except USER_ERRORS as exc:
        fail(exc)
    for line in summary_lines(result):
        typer.echo(line)


@app.command("add-images")
def add_images(
    cache: str = typer.Argument(..., help="Cache root (its teacher groups' images get copied in)."),
    images: Path = typer.Option(..., help="The image directory or list file the cache was extracted from."),
    resolution: int = typer.Option(..., min=1, help="Side of the stored copies, in pixels (squashed to R x R): the "
                                   "student's input size, or more to keep detail in grid crops."),
    quality: int = typer.Option(90, min=1, max=100, help="JPEG quality."),
    workers: int = typer.Option(4, min=1, help="Threads decoding and encoding images."),
    overwrite: bool = typer.Option(False, help="Replace an existing image copy."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Store a copy of the cache's images in it (JPEG, R x R; docs/cache-format.md, "Image copy"): a self-contained
    cache that `dune-student train` reads without the image files."""
    from .commands.add_images import add_images as run_add_images

    setup_logging(verbose)
    try:
        info = run_add_images(cache, str(images), resolution, quality, workers, overwrite)
    except USER_ERRORS as exc:
        fail(exc)
    from .format.image_copy import stored_bytes

    size = stored_bytes(cache)
    typer.echo(f"{info.count} images at {info.resolution} px (JPEG quality {info.quality}) -> {redact(cache)}/images: "
               f"{size / 2**20:.2f} MiB, {size / max(info.count, 1) / 1e3:.1f} kB per image")

if __name__ == "__main__":  # torchrun -m dune_cache.cli extract ...
    app()
