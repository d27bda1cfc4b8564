"""``dune-student route``: SAK's stage 2 on the offline probe data — per task, a Mixture-of-Representations router
(:mod:`dune_student.model.router`) and a light head trained on the frozen stem and teacher paths of a SAK run.

Tasks (the probe data folder of ``tools/prepare_probe_data.py``, read by
:func:`dune_student.evaluation.probe.load_probe_data`):

* ``disparity`` (dense): the disparity of each pixel of a stereo pair's *left* image alone (monocular, a
  depth-like dense regression), from the Middlebury Motorcycle windows: 6 ``train`` windows (each also flipped
  left-right) and 6 ``test`` windows of the other half of the scene. Light head: ``Linear(L·D -> 1)`` on the
  concatenated routed levels of every patch, bilinearly upsampled to the pixels; loss L1 over the pixels with a
  known disparity (in units of :data:`DISPARITY_SCALE` px). Score: mean absolute error in pixels on the test
  windows.
* ``faces`` (image level): LFW faces vs non-faces, the probes' stratified split. Light head: ``Linear(L·D -> 2)``
  on the mean over patches of the routed levels; cross-entropy. Score: test accuracy.

The paths are frozen (SAK's stage 2 with ``freeze``), so every image's representations are computed once; the routers
and heads then train on them with AdamW, full batch. Each task is also trained with the stem alone (the same head on
the stem's levels, no router) as the reference. Outputs in ``--out``: ``route.json`` (scores, the routers' mean
weights per level and expert), ``router_weights.png`` (those weights, one panel per task), and ``sak.safetensors``
(+ ``.sak.safetensors`` and ``.json``): stem, paths and the trained routers
(:func:`dune_student.model.export.export_sak`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dune_cache import load_pixels, pick_device

from ..model.export import SAKBackbone, export_sak
from ..model.router import TaskRouters
from ..runs.loading import load_run
from .probe_data import ProbeData, load_probe_data

TASKS = ("disparity", "faces")
DISPARITY_SCALE = 32.0  # disparity targets are trained in units of 32 px


@dataclass
class RouteConfig:
    """What ``dune-student route`` trains."""

    checkpoint: str  # RUN/checkpoint.pt of a heads.kind=sak run
    data: str  # probe data folder (tools/prepare_probe_data.py)
    out: str  # output folder
    steps: int = 300  # full-batch AdamW steps per task and model
    lr: float = 3e-3
    weight_decay: float = 1e-4
    pooling: str | None = None  # router pooling: global | token; None: the run's heads.router_pooling
    seed: int = 0
    device: str = "auto"  # auto: the GPU when there is one


@dataclass
class TaskData:
    """One task's inputs and targets: ``reps`` name -> per level ``(N, h, w, D)`` (stem and teacher paths)."""

    reps: dict[str, list[torch.Tensor]]
    targets: torch.Tensor  # disparity: (N, H, W) float (NaN unknown); faces: (N,) int64
    train: torch.Tensor  # (N,) bool


@torch.no_grad()
def representations(backbone: SAKBackbone, pixels: torch.Tensor, batch_size: int = 16) -> dict[str, list[torch.Tensor]]:
    """uint8 ``(N, 3, S, S)`` -> name -> per level ``(N, h, w, D)`` (stem and paths), in eval mode, on the CPU."""
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    device = next(backbone.parameters()).device
    parts = []
    for start in range(0, len(pixels), batch_size):
        batch = ((pixels[start:start + batch_size].float() / 255 - mean) / std).to(device)
        parts.append({k: [v.cpu() for v in levels] for k, levels in backbone.representations(batch).items()})
    return {k: [torch.cat([p[k][level] for p in parts]) for level in range(len(parts[0][k]))] for k in parts[0]}


def read_images(root: Path, ids: list[str], resolution: int) -> torch.Tensor:
    """uint8 ``(N, 3, S, S)``: the images squashed to the student's resolution (as the probes do)."""
    return torch.stack([torch.from_numpy(load_pixels(root / i, (resolution, resolution), "squash")) for i in ids])


def disparity_task(backbone: SAKBackbone, data: ProbeData, resolution: int) -> TaskData:
    """Left images of the stereo windows (training ones also flipped) and their disparity maps."""
    pixels = read_images(data.root, [p.left for p in data.pairs], resolution)
    targets = torch.stack([torch.from_numpy(p.disparity) for p in data.pairs])
    train = torch.tensor([p.split == "train" for p in data.pairs])
    pixels = torch.cat([pixels, pixels[train].flip(-1)])
    targets = torch.cat([targets, targets[train].flip(-1)])
    train = torch.cat([train, torch.ones(int(train.sum()), dtype=torch.bool)])
    return TaskData(representations(backbone, pixels), targets, train)


def faces_task(backbone: SAKBackbone, data: ProbeData, resolution: int) -> TaskData:
    """The classification images (faces / non-faces) with their labels and the probes' split."""
    pixels = read_images(data.root, data.images, resolution)
    return TaskData(representations(backbone, pixels), torch.from_numpy(data.labels), torch.from_numpy(~data.test))


class LightHead(nn.Module):
    """``Linear(L·D -> out)`` on the concatenated levels ``[(N, h, w, D)] * L``: per patch (dense) or on their mean."""

    def __init__(self, dim: int, levels: int, out_dim: int, dense: bool):
        super().__init__()
        self.dense = dense
        self.norm = nn.LayerNorm(levels * dim)
        self.linear = nn.Linear(levels * dim, out_dim)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """-> dense ``(N, h, w, out)``, else ``(N, out)``."""
        features = torch.cat(levels, dim=-1)
        if not self.dense:
            features = features.mean(dim=(1, 2))
        return self.linear(self.norm(features))


def disparity_prediction(head_output: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(N, h, w, 1)`` in units of :data:`DISPARITY_SCALE` -> ``(N, H, W)`` pixels, bilinear upsampling."""
    up = F.interpolate(head_output.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
    return up[:, 0] * DISPARITY_SCALE


def task_loss(task: str, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if task == "disparity":
        prediction = disparity_prediction(output, tuple(targets.shape[1:]))
        known = torch.isfinite(targets)
        return (prediction[known] - targets[known]).abs().mean() / DISPARITY_SCALE
    return F.cross_entropy(output, targets)


def task_score(task: str, output: torch.Tensor, targets: torch.Tensor) -> float:
    """disparity: mean absolute error (px) over the known pixels; faces: accuracy."""
    if task == "disparity":
        prediction = disparity_prediction(output, tuple(targets.shape[1:]))
        known = torch.isfinite(targets)
        return float((prediction[known] - targets[known]).abs().mean())
    return float((output.argmax(dim=1) == targets).float().mean())


def train_task(task: str, data: TaskData, teachers: list[str], routers: TaskRouters | None, cfg: RouteConfig
               ) -> tuple[LightHead, dict]:
    """Train the task's light head (and its routers when given; else on the stem alone) -> head, scores."""
    levels, dim = len(data.reps["stem"]), data.reps["stem"][0].shape[-1]
    torch.manual_seed(cfg.seed)
    head = LightHead(dim, levels, 1 if task == "disparity" else int(data.targets.max()) + 1, task == "disparity")
    router_levels = routers.routers[task] if routers is not None else nn.ModuleList()
    params = [*head.parameters(), *router_levels.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def features(rows: torch.Tensor) -> list[torch.Tensor]:
        stems = [level[rows] for level in data.reps["stem"]]
        if routers is None:
            return stems
        paths = [[data.reps[t][k][rows] for t in teachers] for k in range(levels)]
        return [router(stem, p)[0] for router, stem, p in zip(router_levels, stems, paths)]

    train, test = data.train.nonzero()[:, 0], (~data.train).nonzero()[:, 0]
    head.train(), router_levels.train()
    for _ in range(cfg.steps):
        loss = task_loss(task, head(features(train)), data.targets[train])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    head.eval(), router_levels.eval()
    with torch.no_grad():
        scores = {"train_loss": float(loss), "test": task_score(task, head(features(test)), data.targets[test]),
                  "train": task_score(task, head(features(train)), data.targets[train])}
    return head, scores


@torch.no_grad()
def mean_router_weights(routers: TaskRouters, task: str, data: TaskData, teachers: list[str]) -> list[list[float]]:
    """Per level, the task router's weight of each expert (stem, then ``teachers``) averaged over its test tokens."""
    test = (~data.train).nonzero()[:, 0]
    result = []
    for k, router in enumerate(routers.routers[task]):
        weights = router.weights(data.reps["stem"][k][test])
        result.append(weights.mean(dim=(0, 1, 2)).tolist())
    return result


def plot_router_weights(weights: dict[str, list[list[float]]], experts: list[str], levels: list[int],
                        path: Path) -> Path:
    """One panel per task: stacked bars of the mean router weight of each expert at each level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(weights), figsize=(4.2 * len(weights), 3.4), squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for ax, (task, per_level) in zip(axes[0], weights.items()):
        values = np.asarray(per_level)  # (L, E)
        bottom = np.zeros(len(levels))
        for e, expert in enumerate(experts):
            ax.bar([str(b) for b in levels], values[:, e], bottom=bottom, color=colours[e % 10], label=expert)
            bottom += values[:, e]
        ax.set_title(f"task: {task}")
        ax.set_xlabel("student block (level)")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("mean router weight (test tokens)")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_routing(cfg: RouteConfig) -> dict:
    """Train the routers and light heads of every task; write the report, the picture and the export."""
    run = load_run(cfg.checkpoint, pick_device(cfg.device))
    if run.cfg.heads.kind != "sak":
        raise ValueError(f"{cfg.checkpoint}: routers mix SAK's teacher paths; this run has heads.kind="
                         f"{run.cfg.heads.kind} (train with heads.kind=sak)")
    teachers = list(run.heads.projectors)
    backbone = SAKBackbone(run.student.vit, run.heads.projectors, run.student.num_registers, run.student.patch_size)
    backbone.eval()
    pooling = cfg.pooling or run.cfg.heads.router_pooling
    torch.manual_seed(cfg.seed)
    routers = TaskRouters(TASKS, len(backbone.levels), run.student.embed_dim, len(teachers), pooling,
                          run.cfg.heads.router_noisy_gating)
    data = load_probe_data(cfg.data, seed=cfg.seed)
    tasks = {"disparity": disparity_task(backbone, data, run.resolution),
             "faces": faces_task(backbone, data, run.resolution)}
    report = {"config": asdict(cfg), "pooling": pooling, "levels": backbone.levels, "experts": ["stem", *teachers],
              "scores": {}, "router_weights": {}}
    for task, task_data in tasks.items():
        _, routed = train_task(task, task_data, teachers, routers, cfg)
        _, stem_only = train_task(task, task_data, teachers, None, cfg)
        report["scores"][task] = {"routed": routed, "stem_only": stem_only,
                                  "metric": "mean abs. error (px)" if task == "disparity" else "accuracy",
                                  "test_items": int((~task_data.train).sum())}
        report["router_weights"][task] = mean_router_weights(routers, task, task_data, teachers)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    routers.eval()
    export_sak(run.student, run.heads.projectors, out / "sak.safetensors", routers)
    plot_router_weights(report["router_weights"], report["experts"], backbone.levels, out / "router_weights.png")
    (out / "route.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def report_table(report: dict) -> str:
    """The scores of ``route.json`` as lines of text."""
    lines = []
    for task, scores in report["scores"].items():
        lines.append(f"{task} ({scores['metric']}, {scores['test_items']} test items): routed "
                     f"{scores['routed']['test']:.4f}, stem only {scores['stem_only']['test']:.4f}")
        for level, weights in zip(report["levels"], report["router_weights"][task]):
            lines.append(f"  level {level}: " + ", ".join(f"{e} {w:.2f}" for e, w in zip(report["experts"], weights)))
    return "\n".join(lines)
