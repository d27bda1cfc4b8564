"""``dune-student train``: distil cached (or, as a baseline, live) teacher features into a ViT student.

One step: student forward on augmented pixels -> one projector per teacher -> targets standardised ->
``0.5·(1 − cos) + 0.5·SmoothL1`` per teacher (fp32) -> data-sharing mask and teacher dropping ->
AdamW with warmup + cosine, gradient clipping. Checkpoints hold everything needed to continue
bit for bit: model, heads, standardiser, optimiser, scheduler, RNG state and the step (the data
order is a pure function of seed and step).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dune_cache.chunk_cache import resolve_directory
from dune_cache.reader import CacheReader
from dune_cache.runtime import default_num_workers, pick_device
from dune_cache.teachers import create_teacher

from .config import TrainConfig, config_to_dict
from .curves import write_curves_safely
from .data import TEACHER_DROP_STREAM, BatchSource, DataError, TrainBatch, batch_loader, step_generator
from .evaluate import LoadedRun, fidelity
from .heads import TeacherHeads
from .losses import Standardizer, drop_teachers, ema_momentum, sharing_mask, teacher_losses, use_cls_from_provenance
from .model import Student

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class RunMismatchError(ValueError):
    """A run directory holds a checkpoint made with another configuration."""


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------
def distributed_setup(device: torch.device) -> tuple[int, int]:
    """``(rank, world)``; initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def student_resolution(cfg: TrainConfig, reader: CacheReader) -> int:
    """Student input size: the config's, else the one the caches were extracted for (shared grid)."""
    if cfg.data.resolution:
        return cfg.data.resolution
    recorded = {tuple(p["geometry"]["student_resolution"] or ()) for p in reader.provenance.values()}
    if len(recorded) == 1 and (res := recorded.pop()) and res[0] == res[1]:
        return int(res[0])
    grid = next(iter(reader.grids.values()))
    return grid[0] * cfg.student.patch_size


def check_cache_fits(cfg: TrainConfig, reader: CacheReader) -> None:
    """Refuse caches whose geometry cannot serve this run, saying what differs."""
    problems = []
    resize = {t: p["geometry"]["resize"] for t, p in reader.provenance.items()}
    if set(resize.values()) != {"squash"}:
        problems.append(f"training reads caches extracted with --resize squash (the whole image); got {resize}")
    for t, p in reader.provenance.items():
        sp = p["geometry"].get("student_patch")
        if sp is not None and sp != cfg.student.patch_size:
            problems.append(f"{t}: cache made for student patch {sp}, config student.patch_size is "
                            f"{cfg.student.patch_size}")
    recorded = {t: p["geometry"].get("student_resolution") for t, p in reader.provenance.items()}
    if not cfg.data.resolution and len({json.dumps(r) for r in recorded.values() if r is not None}) > 1:
        problems.append(f"teacher groups were extracted for different student resolutions {recorded}: set "
                        "data.resolution to the one to train at")
    empty = [t for t, n in reader.done_counts.items() if n == 0]
    if empty:
        problems.append(f"teacher group(s) {', '.join(empty)} have no done images (nothing to train on): "
                        "extract some first, or leave them out with data.teachers")
    if problems:
        raise DataError("cache does not fit the config:\n  " + "\n  ".join(problems))


RESUME_FIELDS = (("images", "manifest_sha256"), ("images", "count"), ("checkpoint", "sha256"))


def cache_changes(saved: dict, reader: CacheReader) -> list[str]:
    """How the cache ``reader`` reads differs from the one a checkpoint (``saved``: its ``teachers`` and
    per-teacher ``provenance``) was trained on: teacher groups, image manifest, teacher checkpoint or geometry.
    More or fewer done images of the same manifest are not a difference (data.allow_partial)."""
    if list(saved["teachers"]) != list(reader.teachers):
        return [f"teacher groups: the checkpoint was trained on {saved['teachers']}, the cache has {reader.teachers}"]
    changes = []
    for t in reader.teachers:
        old, new = saved["provenance"][t], reader.provenance[t]
        geometry = [("geometry", k) for k in sorted(set(old["geometry"]) | set(new["geometry"]))]
        for section, key in [*RESUME_FIELDS, *geometry]:
            if section in old:  # checkpoints of earlier versions did not keep the images section
                before, now = old[section].get(key), new[section].get(key)
                if json.dumps(before) != json.dumps(now):
                    changes.append(f"teacher {t}: {section}.{key}: the checkpoint was trained on {before!r}, "
                                   f"the cache has {now!r}")
    return changes


def param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and other 1-D parameters (norms, LayerScale, tokens)."""
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, total: int, warmup_fraction: float, min_ratio: float) -> float:
    """Linear warmup then cosine decay to ``min_ratio`` of the peak."""
    warmup = int(total * warmup_fraction)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_standardizer(cfg: TrainConfig, reader: CacheReader) -> Standardizer:
    """Target standardisation from the cache's statistics (``dune-cache stats``); a missing one is an error."""
    stats = {t: reader.stats(t) for t in reader.teachers}
    if cfg.loss.standardize in ("channel", "phis"):
        missing = [t for t, s in stats.items() if s is None]
        if missing:
            raise DataError(f"loss.standardize={cfg.loss.standardize} needs cache statistics for {missing}: "
                            f"run `dune-cache stats {cfg.data.cache}` first, or set loss.standardize=ema")
    return Standardizer(reader.dims, stats, mode=cfg.loss.standardize)


# ---------------------------------------------------------------------------------------
# Live teachers (baseline)
# ---------------------------------------------------------------------------------------
def load_live_teachers(cfg: TrainConfig, reader: CacheReader, device: torch.device) -> dict[str, nn.Module]:
    """The cache's teachers, from checkpoints whose sha256 must equal the cache's provenance."""
    from dune_cache.extract import file_sha256

    teachers = {}
    for t in reader.teachers:
        prov = reader.provenance[t]
        path = cfg.teacher_checkpoints.get(t)
        if path is None and prov["checkpoint"]["sha256"] == "random-weights":
            log.warning("teacher %s: the cache was extracted with random weights (speed tests only); the live "
                        "teacher gets other random weights, so its targets differ from the cache's", t)
            teachers[t] = create_teacher(prov["teacher"]["name"]).to(device)
            continue
        if path is None:
            raise DataError(f"teacher_checkpoints.{t}: required with live_teachers "
                            f"(the cache was made from {prov['checkpoint']['file']})")
        if file_sha256(Path(path)) != prov["checkpoint"]["sha256"]:
            raise DataError(f"teacher_checkpoints.{t}: {path} is not the checkpoint the cache was made with "
                            f"(sha256 differs from {prov['checkpoint']['sha256']})")
        teachers[t] = create_teacher(prov["teacher"]["name"], path).to(device)
    return teachers


def live_targets(teachers: dict[str, nn.Module], batch: TrainBatch, student_patch: int, device: torch.device,
                 amp: bool) -> None:
    """Fill ``batch`` targets by running each teacher on the clean crops at ``S · p_t / p_s`` (DUNE)."""
    pixels = batch.clean_pixels.to(device)
    for t, teacher in teachers.items():
        size = pixels.shape[-1] * teacher.spec.patch_size // student_patch
        view = F.interpolate(pixels.float(), size=(size, size), mode="bicubic", align_corners=False,
                             antialias=True).clamp(0, 255)
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16,
                                                    enabled=amp and device.type == "cuda"):
            out = teacher(view)
        batch.cls[t] = out.cls.float().clone()
        batch.patch[t] = out.patch.float().clone()
    batch.mask = torch.ones(len(pixels), len(teachers), dtype=torch.bool)


# ---------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    run_dir: Path


class Distiller(nn.Module):
    """Student + per-teacher heads: normalised pixels ``(B, 3, S, S)`` -> teacher -> (cls ``(B, D_t)``,
    patch ``(B, h_t, w_t, D_t)`` at ``grids[teacher]``)."""

    def __init__(self, student: Student, heads: TeacherHeads, return_blocks: bool):
        super().__init__()
        self.student, self.heads, self.return_blocks = student, heads, return_blocks

    def forward(self, pixels: torch.Tensor, grids: dict[str, tuple[int, int]] | None = None) -> dict:
        return self.heads(self.student(pixels, return_blocks=self.return_blocks), grids)


class Trainer:
    """Everything a run holds; :meth:`run` trains (resuming from ``out/checkpoint.pt`` when present)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.rank, self.world = distributed_setup(self.device)
        if cfg.data.batch_size % self.world:
            raise DataError(f"data.batch_size {cfg.data.batch_size} is not divisible by {self.world} processes")
        torch.manual_seed(cfg.seed)
        chunk_cache = resolve_directory(cfg.data.chunk_cache)  # local copies of a remote cache's chunks
        chunk_cache_limit = round(cfg.data.chunk_cache_limit_gb * 1e9)
        self.reader = CacheReader(cfg.data.cache, cfg.data.teachers or None, cfg.data.reader_backend,
                                  cfg.data.allow_partial, chunk_cache=chunk_cache, chunk_cache_limit=chunk_cache_limit)
        log.info("cache %s: teachers %s, %d images, reader backend %s", cfg.data.cache, self.reader.teachers,
                 len(self.reader), self.reader.backend)
        check_cache_fits(cfg, self.reader)
        if cfg.data.allow_partial:
            counts = {t: f"{n} of {self.reader.provenance[t]['images']['count']}"
                      for t, n in self.reader.done_counts.items()}
            log.info("data.allow_partial: training on the done images only (%d samples): %s", len(self.reader),
                     ", ".join(f"{t} {c}" for t, c in counts.items()))
        self.teachers = list(self.reader.teachers)
        self.use_cls = use_cls_from_provenance(self.reader.provenance)
        self.resolution = student_resolution(cfg, self.reader)
        self.student = Student(cfg.student, device=self.device).to(self.device)
        self.heads = TeacherHeads(self.student, {t: (self.reader.dims[t], self.reader.grids[t]) for t in self.teachers},
                                  cfg.heads).to(self.device)
        self.standardizer = build_standardizer(cfg, self.reader).to(self.device)
        self.model = Distiller(self.student, self.heads, return_blocks=cfg.heads.kind == "ladder")
        self.ddp = (nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device.index]
                                                        if self.device.type == "cuda" else None)
                    if self.world > 1 else self.model)
        self.optimizer = torch.optim.AdamW(param_groups([self.student, self.heads], cfg.optim.weight_decay),
                                           lr=cfg.lr(), betas=cfg.optim.betas, eps=cfg.optim.eps, fused=True)
        min_ratio = cfg.optim.min_lr / cfg.lr()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.steps, cfg.optim.warmup_fraction, min_ratio))
        self.live = load_live_teachers(cfg, self.reader, self.device) if cfg.live_teachers else None
        n_train = len(self.reader) - cfg.data.holdout
        if n_train < cfg.data.batch_size:
            raise DataError(f"only {n_train} training images for data.batch_size {cfg.data.batch_size}")
        self.source = BatchSource(
            cfg.data.cache, cfg.data.teachers or None, cfg.data.allow_partial, cfg.data.reader_backend,
            cfg.data.images, torch.arange(n_train).numpy(), cfg.data.batch_size, self.resolution, cfg.augment,
            cfg.seed, cfg.data.shuffle_block, cfg.data.shuffle_buffer, self.rank, self.world,
            read_targets=not cfg.live_teachers, decode_on_device=self.device.type == "cuda",
            chunk_cache=str(chunk_cache) if chunk_cache else None, chunk_cache_limit=chunk_cache_limit)
        self.out = Path(cfg.out)
        self.step = 0

    # ---- checkpoints ---------------------------------------------------------------
    def state(self) -> dict:
        return {
            "config": config_to_dict(self.cfg), "step": self.step, "teachers": self.teachers,
            "resolution": self.resolution, "dims": self.reader.dims,
            "grids": {t: list(g) for t, g in self.reader.grids.items()},
            "provenance": {t: {k: self.reader.provenance[t][k] for k in ("teacher", "checkpoint", "images",
                                                                          "geometry")}
                           for t in self.teachers},
            "done_counts": self.reader.done_counts,
            "student": self.student.state_dict(), "heads": self.heads.state_dict(),
            "standardizer": self.standardizer.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def save(self) -> None:
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / (CHECKPOINT + ".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(self.out / CHECKPOINT)  # atomic: a crash never leaves a half-written checkpoint
        write_curves_safely(self.out)

    def load(self, ckpt: dict) -> None:
        """Restore everything but the RNG (restored once the data iterator exists, see :meth:`run`)."""
        ours, theirs = config_to_dict(self.cfg), ckpt["config"]
        ignored = {"progress", "log_every", "checkpoint_every", "eval_every", "steps"}
        diffs = [f"{k}: checkpoint has {theirs.get(k)!r}, this run has {ours[k]!r}"
                 for k in ours if k not in ignored and json.dumps(ours[k]) != json.dumps(theirs.get(k))]
        if ckpt["config"]["steps"] != self.cfg.steps:
            diffs.append(f"steps: checkpoint has {ckpt['config']['steps']}, this run has {self.cfg.steps} "
                         "(the learning-rate schedule depends on it)")
        if diffs:
            raise RunMismatchError(f"{self.out} holds a run with another configuration; use another --out:\n  "
                                   + "\n  ".join(diffs))
        changes = cache_changes(ckpt, self.reader)
        if changes:
            raise RunMismatchError(f"{self.out} was trained on another cache than {self.cfg.data.cache} holds now; "
                                   "resume with the cache it was trained on, or use another --out:\n  "
                                   + "\n  ".join(changes))
        done_then = ckpt.get("done_counts", self.reader.done_counts)
        if done_then != self.reader.done_counts:
            log.info("resuming on the same images with other done counts (then -> now: %s): training goes on over "
                     "all done images now, so the sample order differs from an uninterrupted run",
                     ", ".join(f"{t} {done_then.get(t)} -> {n}" for t, n in self.reader.done_counts.items()))
        self.student.load_state_dict(ckpt["student"])
        self.heads.load_state_dict(ckpt["heads"])
        self.standardizer.load_state_dict(ckpt["standardizer"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step = ckpt["step"]

    def held_out_fidelity(self) -> dict:
        """Metrics record of the cosine fidelity on the last ``data.holdout`` images (eval mode, no RNG drawn)."""
        run = LoadedRun(self.cfg, self.student, self.heads, self.standardizer, self.teachers, self.resolution,
                        self.reader.provenance, self.step)
        held_out = np.arange(len(self.reader) - self.cfg.data.holdout, len(self.reader))
        self.model.eval()
        try:
            result = fidelity(run, self.reader, self.source.paths, held_out, self.cfg.data.batch_size)
        finally:
            self.model.train()
        return {"step": self.step, **{f"fidelity/{t}/{kind}": r[kind] for t, r in result.items()
                                      for kind in ("patch", "cls") if r[kind] is not None}}

    # ---- training ------------------------------------------------------------------
    def train_step(self, batch: TrainBatch) -> dict:
        cfg, device = self.cfg, self.device
        if self.live is not None:
            live_targets(self.live, batch, cfg.student.patch_size, device, cfg.amp)
        if batch.encoded is not None:  # stored targets (e.g. int8 codes) decoded here, on the device
            decoded = self.reader.decode(batch.encoded, device)
            batch.cls, batch.patch = decoded.cls, decoded.patch
        pixels = self.student.normalize(batch.pixels.to(device, non_blocking=True))
        mask = batch.mask.to(device)
        targets = {}
        for k, t in enumerate(self.teachers):
            cls, patch = batch.cls[t].to(device, non_blocking=True), batch.patch[t].to(device, non_blocking=True)
            self.standardizer.observe(t, cls, patch, mask[:, k], ema_momentum(self.step, cfg.steps))
            targets[t] = self.standardizer.standardize(t, cls, patch)
        grids = {t: tuple(targets[t][1].shape[1:3]) for t in self.teachers}
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
            preds = self.ddp(pixels, grids)
        losses = teacher_losses(preds, targets, self.teachers, self.use_cls)
        available = mask & sharing_mask(batch.tags, self.teachers, cfg.loss.sharing, cfg.loss.generic_tag).to(device)
        drop_p = cfg.loss.drop_p if cfg.loss.teacher_drop == "lowest_loss" else 0.0  # p=0: mean over available
        weights = drop_teachers(losses.detach(), available, drop_p,
                                step_generator(cfg.seed, batch.step, TEACHER_DROP_STREAM, self.rank))
        loss = (losses * weights).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        seen = losses.detach() * available
        per_teacher = {f"loss/{t}": float(seen[:, k].sum() / available[:, k].sum().clamp(min=1))
                       for k, t in enumerate(self.teachers)}
        return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), **per_teacher}

    def run(self) -> TrainResult:
        cfg = self.cfg
        ckpt_path = self.out / CHECKPOINT
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False) if ckpt_path.exists() else None
        if ckpt is not None:
            self.load(ckpt)
            log.info("resuming %s at step %d", self.out, self.step)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
        workers = default_num_workers(self.device) if cfg.data.num_workers < 0 else cfg.data.num_workers
        loader = iter(batch_loader(self.source, self.step, cfg.steps, workers, self.device.type == "cuda"))
        if ckpt is not None:  # after the iterator drew its seed: the model's RNG stream continues exactly
            torch.set_rng_state(ckpt["torch_rng"])
            if ckpt["cuda_rng"]:
                torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        start, last = time.perf_counter(), {"loss": float("nan")}
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", disable=not cfg.progress or self.rank != 0,
                   dynamic_ncols=True)
        images_seen, tick = 0, time.perf_counter()
        with open(self.out / METRICS, "a") as metrics:
            for batch in loader:
                last = self.train_step(batch)
                self.step += 1
                images_seen += len(batch.indices)
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    now = time.perf_counter()
                    record = {"step": self.step, "lr": self.scheduler.get_last_lr()[0],
                              "images_per_s": images_seen * self.world / (now - tick), **last}
                    images_seen, tick = 0, now
                    if self.rank == 0:
                        metrics.write(json.dumps(record) + "\n")
                        metrics.flush()
                if cfg.eval_every and self.rank == 0 and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    metrics.write(json.dumps(self.held_out_fidelity()) + "\n")
                    metrics.flush()
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save()
        bar.close()
        return TrainResult(steps=self.step, final_loss=last["loss"], seconds=time.perf_counter() - start,
                           run_dir=self.out)


def train(cfg: TrainConfig) -> TrainResult:
    return Trainer(cfg).run()
