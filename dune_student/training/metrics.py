"""What the training steps measure, kept on the training device and read by the host once per read point.

A step never waits for the GPU: its loss, gradient norm and per-teacher losses stay device tensors, a step whose loss
or gradient norm is not finite has its update skipped on the device (the fused optimiser's ``found_inf``, as AMP's
GradScaler does), and damaged targets decoded on the device are masked out there. :meth:`DeviceMetrics.read` copies
everything to the host in one transfer at the points where the host needs it (a log step, a checkpoint, the end of
the run): the last step's metrics, the damaged targets left out so far, and the first step since the previous read
whose loss was not finite or whose targets were damaged, with the samples concerned. The trainer raises there
(torchtitan keeps metrics on the device and reduces them at log steps the same way: ``components/metrics.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class MetricsRead:
    """One read of :class:`DeviceMetrics` on the host.

    loss, grad_norm: of the last step; per_teacher: teacher -> its mean loss over the images it supervised in the
    last step; damaged: targets left out as damaged over the whole run (all ranks); non_finite_step / damaged_step:
    the first step (1-based) since the previous read whose loss or gradient norm was not finite / whose targets
    were damaged (``None``: none, on any rank), with this rank's samples concerned, bool ``(B, T)``.
    """

    loss: float
    grad_norm: float
    per_teacher: dict[str, float]
    damaged: int
    non_finite_step: int | None
    non_finite_samples: np.ndarray
    damaged_step: int | None
    damaged_samples: np.ndarray


class DeviceMetrics:
    """Per-step metrics of ``teachers`` for batches of ``batch_size`` samples (per rank), on ``device``.

    ``damaged_before``: targets left out as damaged before this session (the checkpoint's count, all ranks).
    """

    def __init__(self, teachers: list[str], batch_size: int, device: torch.device, world: int = 1,
                 damaged_before: int = 0):
        self.teachers, self.world = list(teachers), world
        shape = (batch_size, len(self.teachers))
        self.last = torch.full((2 + len(self.teachers),), float("nan"), device=device)  # loss, grad norm, teachers
        self.damaged = torch.zeros((), dtype=torch.int64, device=device)  # this rank, this session
        self.damaged_before = damaged_before
        self.non_finite_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.non_finite_samples = torch.zeros(shape, dtype=torch.bool, device=device)
        self.damaged_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.damaged_samples = torch.zeros(shape, dtype=torch.bool, device=device)

    @torch.no_grad()
    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, losses: torch.Tensor,
               available: torch.Tensor, damaged: torch.Tensor | None = None) -> None:
        """Step ``step`` (1-based): its batch loss ``()``, gradient norm ``()``, per-sample losses ``(B, T)``, which
        samples supervised which teacher ``(B, T)`` bool and the targets found damaged ``(B, T)`` bool (``None``: none
        checked here). Device operations only."""
        seen = torch.where(available, losses.detach(), 0.0)
        per_teacher = seen.sum(dim=0) / available.sum(dim=0).clamp(min=1)
        self.last.copy_(torch.cat([loss.detach().float().reshape(1), grad_norm.detach().float().reshape(1),
                                   per_teacher.float()]))
        self._first(self.non_finite_step, self.non_finite_samples, step,
                    ~(torch.isfinite(loss) & torch.isfinite(grad_norm)), ~torch.isfinite(losses.detach()))
        if damaged is not None:
            self.damaged += damaged.sum()
            self._first(self.damaged_step, self.damaged_samples, step, damaged.any(), damaged)

    @staticmethod
    def _first(step_of: torch.Tensor, samples_of: torch.Tensor, step: int, happened: torch.Tensor,
               samples: torch.Tensor) -> None:
        """Keep ``step`` and its ``samples`` in ``step_of``/``samples_of`` if ``happened`` and none is kept yet."""
        first = happened & (step_of < 0)
        step_of.copy_(torch.where(first, step, step_of))
        samples_of.copy_(torch.where(first, samples, samples_of))

    def read(self) -> MetricsRead:
        """Everything recorded, on the host: one transfer (and, under DDP, the damaged count summed and the first
        bad steps agreed over the ranks: every rank must call it at the same step). Resets the first bad steps."""
        counts = torch.stack([self.damaged, self.non_finite_step, self.damaged_step])
        if self.world > 1:
            summed, latest = counts[:1].clone(), counts[1:].clone()
            dist.all_reduce(summed)
            dist.all_reduce(latest, op=dist.ReduceOp.MAX)
            counts = torch.cat([summed, latest])
        host = torch.cat([self.last.double(), counts.double(), self.non_finite_samples.flatten().double(),
                          self.damaged_samples.flatten().double()]).cpu().numpy()
        self.non_finite_step.fill_(-1)
        self.damaged_step.fill_(-1)
        n, shape = len(self.last), self.non_finite_samples.shape
        samples = host[n + 3:].astype(bool).reshape(2, *shape)
        bad, hurt = int(host[n + 1]), int(host[n + 2])
        return MetricsRead(loss=float(host[0]), grad_norm=float(host[1]),
                           per_teacher=dict(zip(self.teachers, map(float, host[2:n]))),
                           damaged=self.damaged_before + int(host[n]), non_finite_step=bad if bad >= 0 else None,
                           non_finite_samples=samples[0], damaged_step=hurt if hurt >= 0 else None,
                           damaged_samples=samples[1])
