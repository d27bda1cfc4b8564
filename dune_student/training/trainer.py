"""``dune-student train``: distil cached (or, as a baseline, live) teacher features into a ViT student.

One step: student forward on augmented pixels -> one projector per teacher -> targets standardised ->
``0.5·(1 − cos) + 0.5·SmoothL1`` per teacher (fp32) -> data-sharing mask and teacher dropping ->
AdamW with warmup + cosine, gradient clipping. Checkpoints hold everything needed to continue
bit for bit: model, heads, standardiser, optimiser, scheduler, RNG state and the step (the data
order is a pure function of seed and step). A step whose loss or gradient norm is not finite stops the
run before it is applied, so no checkpoint ever holds its state; SIGINT/SIGTERM checkpoint the current
step and stop (:mod:`dune_student.runs.control`).
"""
from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dune_cache import (
    CacheReader,
    DamagedFeaturesError,
    Interrupted,
    damaged_message,
    default_num_workers,
    pick_device,
    resolve_chunk_cache,
)

from ..config import RESOLVED, TrainConfig, config_to_dict, loss_terms
from ..data.batches import TEACHER_DROP_STREAM, BatchSource, TrainBatch, batch_loader, finish_pixels, step_generator
from ..errors import DataError, NonFiniteLossError, RunMismatchError
from ..evaluation.curves import write_curves_safely
from ..evaluation.fidelity import fidelity
from ..loss.distill import LossTerms, drop_teachers, sharing_mask, teacher_losses, use_cls_from_provenance
from ..loss.sak import SAKObjective
from ..loss.standardize import ema_momentum
from ..model.heads import TeacherHeads
from ..model.student import Student
from ..runs.checkpoint import Checkpointer, RunModules
from ..runs.control import (
    CheckpointSchedule,
    StopSignals,
    cache_changes,
    config_changes,
    ignore_signals_in_worker,
    shut_down_workers,
)
from ..runs.layout import CHECKPOINT, CONFIG, METRICS
from ..runs.loading import LoadedRun
from .distributed import agreed_signal, distributed_setup, skip_update
from .live_teachers import live_targets, load_live_teachers
from .metrics import DeviceMetrics, MetricsRead
from .optimization import lr_factor, param_groups
from .setup import build_standardizer, check_cache_fits, input_plan, student_resolution

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    steps: int                 # steps of the run done in total
    session_steps: int         # of which this session (a resumed run continues its checkpoint)
    final_loss: float          # loss of the last step (the checkpoint's when this session did none)
    seconds: float
    run_dir: Path
    damaged_targets: int       # targets left out as damaged over the whole run (data.skip_damaged)


class Distiller(nn.Module):
    """Student + per-teacher heads: normalised pixels ``(B, 3, S, S)`` -> teacher -> (cls ``(B, D_t)``,
    patch ``(B, h_t, w_t, D_t)`` at ``grids[teacher]``); SAK heads: teacher -> per level (cls, patch on the
    student's grid)."""

    def __init__(self, student: Student, heads: TeacherHeads, return_blocks: bool):
        super().__init__()
        self.student, self.heads, self.return_blocks = student, heads, return_blocks

    def forward(self, pixels: torch.Tensor, grids: dict[str, tuple[int, int]] | None = None) -> dict:
        out = self.student(pixels, return_blocks=self.return_blocks)
        return self.heads.forward_levels(out) if self.heads.kind == "sak" else self.heads(out, grids)


class Trainer:
    """Everything a run holds; :meth:`run` trains (resuming from ``out/checkpoint.pt`` when present)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.rank, self.world = distributed_setup(self.device)
        if cfg.data.batch_size % self.world:
            raise DataError(f"data.batch_size {cfg.data.batch_size} is not divisible by {self.world} processes")
        torch.manual_seed(cfg.seed)
        self.reader = CacheReader(cfg.data.cache, cfg.data.teachers or None, cfg.data.reader_backend,
                                  cfg.data.allow_partial, chunk_cache=resolve_chunk_cache(cfg.data.chunk_cache),
                                  chunk_cache_limit=round(cfg.data.chunk_cache_limit_gb * 1e9),
                                  skip_damaged=cfg.data.skip_damaged, levels=cfg.heads.kind == "sak")
        log.info("cache %s: teachers %s, %d images, reader backend %s", cfg.data.cache, self.reader.teachers,
                 len(self.reader), self.reader.backend)
        check_cache_fits(cfg, self.reader)
        self.standardizer = build_standardizer(cfg, self.reader).to(self.device)  # refuses missing statistics
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
        self.model = Distiller(self.student, self.heads, return_blocks=self.heads.needs_blocks)
        self.terms = LossTerms(*loss_terms(cfg))
        self.sak = (SAKObjective.from_config(cfg, self.reader.blocks, self.student.depth, self.reader.dims,
                                             self.use_cls).to(self.device) if cfg.heads.kind == "sak" else None)
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
        self.source = BatchSource(self.reader, cfg.data, cfg.augment, cfg.seed, np.arange(n_train), self.resolution,
                                  input_plan(cfg, self.device), self.rank, self.world)
        self.workers = default_num_workers(self.device) if cfg.data.num_workers < 0 else cfg.data.num_workers
        self.out = Path(cfg.out)
        self.step = 0
        self.saved_step: int | None = None  # step of the checkpoint in self.out (None: none yet)
        self.damaged_targets = 0  # (sample, teacher) targets left out as damaged over the whole run, all ranks
        self.last_loss = float("nan")  # loss of the last step done (kept in the checkpoint)
        # which teachers each training sample may supervise (loss.sharing), on the device: (n_train, T) bool
        self.sharing = (None if cfg.loss.sharing == "all" else
                        sharing_mask(self.reader.tags[:n_train], self.teachers, cfg.loss.sharing,
                                     cfg.loss.generic_tag).to(self.device))
        self.metrics = DeviceMetrics(self.teachers, cfg.data.batch_size // self.world, self.device, self.world)
        self.batch_ids: dict[int, np.ndarray] = {}  # step -> its batch's sample indices, since the last read
        log.info("student input %dx%d, %d training images, %d held out, reader backend %s, attention %s, %d loader "
                 "workers", self.resolution, self.resolution, n_train, cfg.data.holdout, self.reader.backend,
                 self.student.attention_backend, self.workers)

    def resolved(self) -> dict:
        """Values this run resolved from the cache and the machine (``0``, ``-1``, ``auto`` and empty settings),
        under their config paths: the ``resolved`` section of ``config.json``."""
        return {"data.resolution": self.resolution, "data.teachers": self.teachers, "data.num_workers": self.workers,
                "data.reader_backend": self.reader.backend, "student.attention": self.student.attention_backend,
                "device": str(self.device)}

    # ---- checkpoints (written, read, checked and restored by runs.checkpoint.Checkpointer) ----
    @property
    def checkpointer(self) -> Checkpointer:
        """Writes and reads ``out/checkpoint.pt``."""
        return Checkpointer(self.out / CHECKPOINT)

    def modules(self) -> RunModules:
        """The modules a checkpoint saves and restores."""
        return RunModules(self.student, self.heads, self.standardizer, self.optimizer, self.scheduler, self.sak)

    def state(self) -> dict:
        return self.checkpointer.state(self.modules(), {
            "config": config_to_dict(self.cfg), "step": self.step, "teachers": self.teachers,
            "resolution": self.resolution, "dims": self.reader.dims,
            "grids": {t: list(g) for t, g in self.reader.grids.items()},
            "provenance": {t: {k: self.reader.provenance[t][k] for k in ("teacher", "checkpoint", "images",
                                                                          "geometry")}
                           for t in self.teachers},
            "done_counts": self.reader.done_counts, "damaged_targets": self.damaged_targets, "loss": self.last_loss,
        })

    def save(self, draw_curves: bool = True) -> None:
        """Checkpoint the current step (rank 0 writes, atomically) and redraw ``curves.png`` if ``draw_curves``."""
        self.saved_step = self.step
        if self.rank != 0:
            return
        self.checkpointer.write(self.state())
        if draw_curves:
            write_curves_safely(self.out)

    def load(self, ckpt: dict) -> None:
        """Restore everything but the RNG (restored once the data iterator exists, see :meth:`run`) from a checked
        checkpoint (:meth:`Checkpointer.read_for_resume`): refused before anything changes when it was made with
        another configuration or cache."""
        diffs = config_changes(ckpt["config"], config_to_dict(self.cfg), self.device.type == "cuda")
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
        self.checkpointer.restore(ckpt, self.modules())
        self.step = self.saved_step = ckpt["step"]
        # checkpoints of earlier versions kept neither
        self.damaged_targets, self.last_loss = ckpt.get("damaged_targets", 0), ckpt.get("loss", float("nan"))

    def held_out_fidelity(self) -> dict:
        """Metrics record of the cosine fidelity on the last ``data.holdout`` images (eval mode, no RNG drawn)."""
        run = LoadedRun(self.cfg, self.student, self.heads, self.standardizer, self.teachers, self.resolution,
                        self.reader.provenance, self.step)
        held_out = np.arange(len(self.reader) - self.cfg.data.holdout, len(self.reader))
        self.model.eval()
        try:
            result = fidelity(run, self.reader.with_options(levels=False), self.source.eval_files(), held_out,
                              self.cfg.data.batch_size, self.workers)
        finally:
            self.model.train()
        return {"step": self.step, **{f"fidelity/{t}/{kind}": r[kind] for t, r in result.items()
                                      for kind in ("patch", "cls") if r[kind] is not None}}

    # ---- training ------------------------------------------------------------------
    def train_step(self, batch: TrainBatch) -> None:
        """One optimiser step on ``batch``, without waiting for the device: its metrics are recorded on the device
        (:class:`DeviceMetrics`), and an update whose loss or gradient norm is not finite is skipped there (the
        fused AdamW's ``found_inf``) and reported at the next :meth:`read_metrics`."""
        cfg, device = self.cfg, self.device
        finish_pixels(batch, device)  # decode/crop images and photometric augmentation left for the device
        if self.live is not None:
            live_targets(self.live, batch, cfg.student.patch_size, device, cfg.amp)
        if batch.encoded is not None:  # stored targets (e.g. int8 codes) decoded here, on the device
            decoded = self.reader.decode(batch.encoded, device, defer_damage=True)
            batch.cls, batch.patch = decoded.cls, decoded.patch
            batch.mask, batch.damaged = decoded.mask, decoded.damaged  # damaged targets are masked out
            batch.level_cls, batch.level_patch = decoded.level_cls, decoded.level_patch
        pixels = self.student.normalize(batch.pixels.to(device, non_blocking=True))
        mask = batch.mask.to(device, non_blocking=True)
        momentum = ema_momentum(self.step, cfg.steps)
        targets = {}
        for k, t in enumerate(self.teachers):
            cls, patch = batch.cls[t].to(device, non_blocking=True), batch.patch[t].to(device, non_blocking=True)
            self.standardizer.observe(t, cls, patch, mask[:, k], momentum)
            targets[t] = self.standardizer.standardize(t, cls, patch)
        grids = {t: tuple(targets[t][1].shape[1:3]) for t in self.teachers}
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
            preds = self.ddp(pixels, grids)
        if self.sak is not None:
            levels = self.sak.level_targets(batch.level_cls, batch.level_patch, mask, self.teachers, momentum)
            losses = self.sak.losses(preds, targets, levels, self.teachers)
        else:
            losses = teacher_losses(preds, targets, self.teachers, self.use_cls, self.terms)
        available = mask if self.sharing is None else mask & self.sharing[batch.samples.to(device, non_blocking=True)]
        drop_p = cfg.loss.drop_p if cfg.loss.teacher_drop == "lowest_loss" else 0.0  # p=0: mean over available
        weights = drop_teachers(losses.detach(), available, drop_p,
                                step_generator(cfg.seed, batch.step, TEACHER_DROP_STREAM, self.rank, device))
        loss = (losses * weights).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.found_inf = skip_update(loss, grad_norm, self.world)
        self.optimizer.step()
        self.scheduler.step()
        damaged = None if batch.damaged is None else batch.damaged.to(device, non_blocking=True)
        self.metrics.record(batch.step + 1, loss, grad_norm, losses, available, damaged)
        self.batch_ids[batch.step + 1] = batch.indices

    def read_metrics(self) -> MetricsRead:
        """The device metrics on the host (one transfer); a :class:`NonFiniteLossError` for a step since the last read
        whose loss or gradient norm was not finite, a :class:`DamagedFeaturesError` for damaged targets decoded on the
        device (without ``data.skip_damaged``). Every rank must call it at the same step."""
        read = self.metrics.read()
        ids, self.batch_ids = self.batch_ids, {}
        if read.damaged_step is not None and not self.cfg.data.skip_damaged:
            raise DamagedFeaturesError(self.damaged_message(read, ids.get(read.damaged_step, [])))
        if read.non_finite_step is not None:
            raise NonFiniteLossError(self.non_finite_message(read, ids.get(read.non_finite_step, [])))
        if read.damaged > self.damaged_targets and self.source.plan.decode_targets_on_device:  # else the loader logs
            log.warning("%d damaged target(s) left out so far (data.skip_damaged); `dune-cache verify %s` lists them "
                        "and `dune-cache repair %s` re-extracts them", read.damaged, self.cfg.data.cache,
                        self.cfg.data.cache)
        self.last_loss, self.damaged_targets = read.loss, read.damaged
        return read

    def damaged_message(self, read: MetricsRead, indices: np.ndarray) -> str:
        """One paragraph on targets decoded on the device that are damaged: the teacher, the images, the fix."""
        column = int(read.damaged_samples.any(axis=0).argmax())
        images = [self.reader.image_ids[i] for i in np.asarray(indices)[read.damaged_samples[:, column]]]
        return damaged_message(self.teachers[column], "features", images, self.cfg.data.cache,
                               " (or set data.skip_damaged=true to train without them)")

    def non_finite_message(self, read: MetricsRead, indices: np.ndarray) -> str:
        """One paragraph on a step whose loss or gradient norm was not finite: the step, the images whose own
        loss is not finite, the images of the batch, the checkpoint kept, what to check."""
        ids = [self.reader.image_ids[i] for i in indices]
        bad = read.non_finite_samples
        culprits = [f"{ids[b]} ({', '.join(t for k, t in enumerate(self.teachers) if bad[b, k])})"
                    for b in range(len(ids)) if bad[b].any()]
        loss, grad_norm = (read.loss, read.grad_norm) if read.non_finite_step == self.step else (None, None)
        what = (f"the loss is {loss}" if loss is not None and not math.isfinite(loss)
                else f"the gradient norm is {grad_norm}" if grad_norm is not None and not math.isfinite(grad_norm)
                else "the loss or the gradient norm is not finite")
        if self.world > 1 and not culprits:
            what += " (the loss of another process may be the cause)"
        share = f" (rank {self.rank}'s share)" if self.world > 1 else ""
        kept = (f"The last good checkpoint, {self.out / CHECKPOINT} (step {self.saved_step}), is kept: a re-run "
                "resumes from it." if self.saved_step is not None else "No checkpoint had been written yet.")
        return (f"step {read.non_finite_step}: {what}; training stopped before applying the step. "
                + (f"Images with a non-finite loss: {'; '.join(culprits)}. " if culprits else "")
                + f"Images of the batch{share}: {', '.join(ids)}. {kept} Damaged cached features are the usual "
                f"cause: check the cache with `dune-cache verify {self.cfg.data.cache}` (`dune-cache repair` "
                "re-extracts damaged images); if it is sound, lower optim.base_lr.")

    def run(self) -> TrainResult:
        """Train up to ``cfg.steps``, resuming from ``out/checkpoint.pt`` when present. On SIGINT/SIGTERM the step
        in progress is finished, checkpointed, and :class:`Interrupted` raised; the DataLoader workers are shut down
        however training ends."""
        start = time.perf_counter()
        with StopSignals() as stop:
            batches = self.resume_batches()
            first_step = self.step
            try:
                signum = self.train_steps(batches, stop)
                if signum is not None and self.saved_step != self.step:
                    with stop.shielded():
                        self.save(draw_curves=False)  # exit promptly; `dune-student curves` redraws them
            finally:
                shut_down_workers(batches)
        if signum is not None:
            raise Interrupted(f"interrupted by {signal.Signals(signum).name} at step {self.step} of {self.cfg.steps}; "
                              f"checkpoint saved to {self.out / CHECKPOINT}; re-run the same command to resume", signum)
        return TrainResult(steps=self.step, session_steps=self.step - first_step, final_loss=self.last_loss,
                           seconds=time.perf_counter() - start, run_dir=self.out, damaged_targets=self.damaged_targets)

    def resume_batches(self) -> Iterator[TrainBatch]:
        """Load ``out/checkpoint.pt`` when present (read with ``weights_only=True`` and checked: a file that cannot be
        resumed is refused before anything is written), write ``out/config.json``, and start the batches of the steps
        left, the RNG then restored so that the model's random stream continues exactly."""
        cfg = self.cfg
        ckpt = self.checkpointer.read_for_resume()  # checked: a file that cannot be resumed stops before any write
        if ckpt is not None:
            self.load(ckpt)
            log.info("resuming %s at step %d", self.out, self.step)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / CONFIG).write_text(json.dumps({**config_to_dict(cfg), RESOLVED: self.resolved()}, indent=2))
        loader = batch_loader(self.source, self.step, cfg.steps, self.workers, self.device.type == "cuda")
        loader.worker_init_fn = ignore_signals_in_worker  # the trainer alone reacts to Ctrl-C and stops its workers
        batches = iter(loader)
        if ckpt is not None:  # after the iterator drew its seed
            self.checkpointer.restore_rng(ckpt)
        return batches

    def train_steps(self, batches: Iterator[TrainBatch], stop: StopSignals) -> int | None:
        """Steps up to ``cfg.steps``, each logged, evaluated and checkpointed as configured. Returns the signal
        that stopped them before ``cfg.steps`` (after a step every rank agrees on), or ``None``. The host reads the
        device's metrics only at log steps, evaluations and checkpoints (:meth:`read_metrics`)."""
        cfg = self.cfg
        schedule = CheckpointSchedule(cfg.checkpoint_every, cfg.checkpoint_minutes, cfg.steps)
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", disable=not cfg.progress or self.rank != 0,
                   dynamic_ncols=True)
        self.metrics.damaged_before = self.damaged_targets  # the resumed checkpoint's count
        images_seen, tick, stopped_by = 0, time.perf_counter(), None
        with open(self.out / METRICS, "a") as metrics:
            while self.step < cfg.steps and stopped_by is None:
                batch = self.next_batch(batches, stop)
                if batch is None:  # a signal before the step: none in flight
                    stopped_by = stop.received
                    break
                self.train_step(batch)
                self.step += 1
                stopped_by = agreed_signal(stop.received, self.world)  # after this step
                images_seen += len(batch.indices)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    read = self.read_metrics()
                    now = time.perf_counter()
                    self.log_step({"step": self.step, "lr": self.scheduler.get_last_lr()[0],
                                   "images_per_s": images_seen * self.world / (now - tick), "loss": read.loss,
                                   "grad_norm": read.grad_norm,
                                   **{f"loss/{t}": value for t, value in read.per_teacher.items()},
                                   "damaged_targets": self.damaged_targets}, metrics)
                    images_seen, tick = 0, now
                    bar.set_postfix({"loss": f"{self.last_loss:.4f}",
                                     **({"damaged": self.damaged_targets} if self.damaged_targets else {})},
                                    refresh=False)
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    self.read_metrics()  # every rank: a non-finite step is never evaluated or saved
                    if self.rank == 0:
                        metrics.write(json.dumps(self.held_out_fidelity()) + "\n")
                        metrics.flush()
                if schedule.due(self.step):
                    self.read_metrics()
                    with stop.shielded():
                        self.save()
                    schedule.saved()
        bar.close()
        if stopped_by is not None and self.saved_step != self.step:
            self.read_metrics()  # before the checkpoint the run saves on its way out
        return stopped_by if self.step < cfg.steps else None  # a signal during the last step: the run is done

    def next_batch(self, batches: Iterator[TrainBatch], stop: StopSignals) -> TrainBatch | None:
        """The next step's batch, or ``None`` when a signal came before or while it was fetched (one process; DDP
        ranks stop together after a step). Loading in this process is cut short; a batch on its way from a
        DataLoader worker is let arrive (a transfer cut halfway makes the worker print a traceback), then dropped."""
        if self.world > 1:
            return next(batches)
        batch = stop.wait(lambda: next(batches), cut_short=self.workers == 0)
        return None if stop.received is not None else batch

    def log_step(self, record: dict, metrics: TextIO) -> None:
        """Rank 0: ``record`` appended to metrics.jsonl and, without a progress bar, logged as one line."""
        if self.rank != 0:
            return
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        if not self.cfg.progress:
            log.info(progress_line(record, self.cfg.steps))


def progress_line(record: dict, steps: int) -> str:
    """``step 3/100: loss 0.1234, lr 0.0003, 812.5 images/s`` (and the damaged targets left out so far, if any)."""
    line = (f"step {record['step']}/{steps}: loss {record['loss']:.4f}, lr {record['lr']:.3g}, "
            f"{record['images_per_s']:.1f} images/s")
    damaged = record["damaged_targets"]
    return line + (f", {damaged} damaged targets left out so far (data.skip_damaged)" if damaged else "")


def train(cfg: TrainConfig) -> TrainResult:
    return Trainer(cfg).run()
