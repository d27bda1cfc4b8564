"""Typed training configuration: one field per hyper-parameter, each default documented where it is declared.

Which defaults follow DUNE (Sariyildiz et al., "DUNE: Distilling a Universal Encoder from Heterogeneous 2D and 3D
Teachers", CVPR 2025; naver/dune) and which do not:

- **Follow DUNE**: the student (DINOv2-style ViT-B/14, 4 registers, LayerScale 1e-4), one transformer projector per
  teacher (``heads.kind=transformer``), the loss ``0.5·(1 − cos) + 0.5·SmoothL1`` per teacher, lowest-loss teacher
  dropping with ``p=0.5``, AdamW (betas (0.9, 0.99), eps 1e-15, weight decay 0.03 off biases and 1-D parameters),
  ``lr = 3e-4 · batch / 256`` with 20% warmup and a cosine to 1e-6, gradient clipping at 1.0, bf16 autocast, and
  the crop scale 0.4–1 and colour augmentation of its RandomResizedCrop pipeline.
- **Adapted to cached targets**: targets are cropped on the token grid (``augment.mode=grid-crop``) or taken from
  cached views instead of running each teacher on every augmented image; colour augmentation reaches the student
  only; standardisation uses the cache's statistics (``loss.standardize=channel``, from ``dune-cache stats``)
  rather than per-batch ones.
- **Scaled down**: ``steps=1000`` and ``data.batch_size=128`` are a first run on one machine. DUNE trains for 100
  epochs at 336 px then 50 at 448 px over ~20.7M images with a much larger global batch; set ``steps``,
  ``data.batch_size`` and ``data.resolution`` for that (docs/training.md).

A config file (TOML or JSON) mirrors the dataclass tree; ``key=value`` overrides use dotted paths
(``optim.base_lr=1e-4``) and are converted with the field's declared type — never ``eval``. Every field name,
type and choice is checked while the config is parsed (:func:`load_config`), before torch is imported or a cache
opened: this module imports neither, and the sections the model, heads and augmentation modules use
(:class:`StudentConfig`, :class:`HeadConfig`, :class:`AugmentConfig`) are defined here.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dune_cache import is_remote, redact_url

from .errors import ConfigError

STUDENT_ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit_large")  # the sizes model.ARCHS builds (vit_tiny: tests)
ATTENTION_BACKENDS = ("auto", "xformers", "sdpa")
HEAD_KINDS = ("transformer", "ladder", "mlp", "sak")
ROUTER_POOLING = ("global", "token")  # SAK's MoR router: one weight set per image (global) or per token
AUGMENT_MODES = ("none", "grid-crop", "views")
PLACES = ("auto", "loader", "device")  # where an input stage runs; auto: the device when training on CUDA
IMAGE_SOURCES = ("auto", "files", "cache")
RESOLVED = "resolved"  # section of a run's config.json with the values the run resolved (ignored when loaded)


@dataclass
class StudentConfig:
    """What student to build."""

    arch: str = "vit_base"  # vit_small | vit_base | vit_large (vit_tiny for tests)
    patch_size: int = 14
    num_registers: int = 4
    layerscale: float | None = 1e-4  # LayerScale init; None: no LayerScale
    attention: str = "auto"  # auto | xformers | sdpa
    drop_path: float = 0.0  # stochastic depth rate (linear over depth)
    img_size: int = 224  # square resolution the position embeddings are stored at

    def __post_init__(self) -> None:
        if self.arch not in STUDENT_ARCHS:
            raise ValueError(f"arch must be one of {sorted(STUDENT_ARCHS)}, got {self.arch!r}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}")
        if self.patch_size <= 0 or self.num_registers < 0 or self.img_size % self.patch_size:
            raise ValueError(f"need patch_size > 0, num_registers >= 0 and img_size a multiple of the patch: {self}")


@dataclass
class HeadConfig:
    """Which projector every teacher gets."""

    kind: str = "transformer"  # transformer (DUNE) | ladder (UNIC) | mlp | sak (SAK: adapter paths, levels)
    # hidden width of the mlp head (default 4*D) / of the ladder's non-last rungs (default D)
    mlp_hidden: int | None = None
    sak_reduction: int = 4  # SAK adapter bottleneck D -> D/reduction -> D (SAK down_ratio)
    sak_scale_init: float = 0.0  # adapters' learnable scale at init; 0: every adapter is the identity (SAK: 1.0)
    sak_levels: list[int] = field(default_factory=list)  # student blocks distilled (0-based); empty: SAK's rule
    router_pooling: str = "token"  # MoR router weights per token, or per image (global: SAK's GlobalRouter)
    router_noisy_gating: bool = True  # SAK's noisy top-level gating while training the routers

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"head kind must be one of {HEAD_KINDS}, got {self.kind!r}")
        if self.sak_reduction < 1:
            raise ValueError(f"heads.sak_reduction must be >= 1, got {self.sak_reduction}")


@dataclass
class AugmentConfig:
    mode: str = "grid-crop"                               # none | grid-crop | views (cached views)
    crop_scale: tuple[float, float] = (0.4, 1.0)          # fraction of the grid's cells (DUNE RRC scale)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)      # width / height of the box
    flip_p: float = 0.5
    min_cells: int = 2                                    # smallest box side, in grid cells
    photometric: bool = True                              # DUNE's colour augmentation, student input only
    photometric_on: str = "auto"                          # auto | loader | device (drawn in the loader either way)


@dataclass
class DataConfig:
    cache: str = ""                      # cache root written by `dune-cache extract`
    images: str = ""                     # image directory or list file holding the cache's image ids
    teachers: list[str] = field(default_factory=list)  # teacher groups to distil (empty: all in the cache)
    allow_partial: bool = False          # train on the finished images of a cache still being filled
    resolution: int = 0                  # student input size; 0: the caches' recorded student resolution
    batch_size: int = 128
    num_workers: int = -1                # -1: 1 on CPU, min(8, cores) on GPU
    shuffle_block: int = 64              # images per shuffled block (a cache work unit)
    shuffle_buffer: int = 65536          # shuffle buffer of sample indices (free; docs/benchmarks.md "Shuffle")
    reader_backend: str = "auto"         # auto | tensorstore | zarrs | zarr | memory (whole cache in RAM)
    chunk_cache: str = ""                # remote cache: local copies of its chunks ("default": ~/.cache/...)
    chunk_cache_limit_gb: float = 0.0    # GB the chunk cache folder may hold (0: no limit); then read remotely
    holdout: int = 0                     # last N images (manifest order) kept out of training for eval
    skip_damaged: bool = False           # mask out targets whose cached features are NaN/inf (counted), not stop
    image_source: str = "auto"           # auto (files if data.images, else the cache's copy) | files | cache
    image_decode: str = "auto"           # auto (device when training on CUDA) | loader (PIL) | device (torchvision)
    jpeg_draft: str = "crop"             # loader JPEG draft decode: crop (its need) | double | off (views: double)


@dataclass
class OptimConfig:
    base_lr: float = 3e-4                # lr = base_lr * batch_size / 256 (DUNE)
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    weight_decay: float = 0.03           # not applied to biases and 1-D parameters
    min_lr: float = 1e-6
    warmup_fraction: float = 0.2
    grad_clip: float = 1.0


@dataclass
class LossConfig:
    standardize: str = "channel"         # channel | phis | ema | none  (target standardisation)
    teacher_drop: str = "lowest_loss"    # lowest_loss | none
    drop_p: float = 0.5
    sharing: str = "all"                 # all | own_data | own+generic
    generic_tag: str = "generic"
    cos_weight: float | None = None      # per-level loss weight of (1 - cos); None: 0.9 with heads.kind=sak, else 0.5
    smooth_l1_weight: float | None = None  # of SmoothL1(beta=1); None: 0.1 with heads.kind=sak, else 0.5
    cosine_over: str = "auto"            # token (DUNE/UNIC: per token) | map (SAK: whole flattened map) | auto: by kind


@dataclass
class TrainConfig:
    out: str = "runs/student"            # run directory: config, metrics, checkpoints, curves
    steps: int = 1000
    seed: int = 0
    device: str = "auto"
    amp: bool = True                     # bf16 autocast on CUDA
    log_every: int = 10
    checkpoint_every: int = 500          # steps between checkpoints (and one at the end)
    checkpoint_minutes: float = 0.0      # also a checkpoint once this much wall time passed since the last; 0: off
    eval_every: int = 0                  # held-out fidelity every N steps and at the end, on data.holdout; 0: off
    live_teachers: bool = False          # run the teachers in the loop instead of reading the cache (baseline)
    teacher_checkpoints: dict[str, str] = field(default_factory=dict)  # teacher group -> checkpoint (live mode)
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    heads: HeadConfig = field(default_factory=HeadConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def lr(self) -> float:
        return self.optim.base_lr * self.data.batch_size / 256


CHOICES = {
    # auto + dune_cache.read.backends.BACKENDS
    "data.reader_backend": ("auto", "tensorstore", "zarrs", "zarr", "memory"),
    "loss.standardize": ("channel", "phis", "ema", "none"),
    "loss.teacher_drop": ("lowest_loss", "none"),
    "loss.sharing": ("all", "own_data", "own+generic"),
    "student.arch": STUDENT_ARCHS,
    "student.attention": ATTENTION_BACKENDS,
    "heads.kind": HEAD_KINDS,
    "heads.router_pooling": ROUTER_POOLING,
    "loss.cosine_over": ("auto", "token", "map"),
    "augment.mode": AUGMENT_MODES,
    "augment.photometric_on": PLACES,
    "data.image_source": IMAGE_SOURCES,
    "data.image_decode": PLACES,
    "data.jpeg_draft": ("crop", "double", "off"),
}


def _convert(value: Any, annotation: Any, path: str) -> Any:
    """Convert a parsed file value or override string to the declared type (no eval)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(value, non_none[0], path)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if annotation in (int, float, str):
        try:
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected {annotation.__name__}, got {value!r}") from None
    if origin in (tuple, list):
        items = [v for v in value.split(",") if v] if isinstance(value, str) else list(value)
        if origin is tuple:
            if len(items) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values, got {value!r}")
            return tuple(_convert(v, a, path) for v, a in zip(items, args))
        return [_convert(v, args[0], path) for v in items]
    if origin is dict:
        if isinstance(value, str):
            pairs = [p.split(":", 1) for p in value.split(",") if p]
            if any(len(p) != 2 for p in pairs):
                raise ConfigError(f"{path}: expected key:value,key:value, got {value!r}")
            value = dict(pairs)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table, got {value!r}")
        return {str(k): _convert(v, args[1], f"{path}.{k}") for k, v in value.items()}
    raise ConfigError(f"{path}: unsupported type {annotation}")


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def set_field(cfg: Any, dotted: str, value: Any, prefix: str = "") -> None:
    """Set ``cfg.<dotted>`` from a string or parsed value, converted to the field's type."""
    head, _, rest = dotted.partition(".")
    path = f"{prefix}{head}"
    names = {f.name for f in dataclasses.fields(cfg)}
    if head not in names:
        raise ConfigError(f"unknown config field {path!r}; {type(cfg).__name__} has: {', '.join(sorted(names))}")
    annotation = _field_types(type(cfg))[head]
    current = getattr(cfg, head)
    if dataclasses.is_dataclass(current):
        if rest:
            set_field(current, rest, value, prefix=f"{path}.")
        elif isinstance(value, dict):
            for key, sub in value.items():
                set_field(current, key, sub, prefix=f"{path}.")
        else:
            raise ConfigError(f"{path} is a section; set one of its fields, e.g. {path}.<field>=...")
        return
    if rest:
        raise ConfigError(f"{path} is not a section")
    converted = _convert(value, annotation, path)
    choices = CHOICES.get(path)
    if choices and converted not in choices:
        raise ConfigError(f"{path}: {converted!r} is not one of {', '.join(choices)}")
    setattr(cfg, head, converted)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults, then the file (TOML or JSON), then ``key=value`` overrides."""
    cfg = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
        for key, value in data.items():
            if key != RESOLVED:  # a run's config.json loads as the config it was given
                set_field(cfg, key, value)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.base_lr=1e-4")
        set_field(cfg, key.strip(), value.strip())
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks; each error names the field."""
    for path, choices in CHOICES.items():
        section, name = path.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(choices)}")
    if not cfg.data.cache:
        raise ConfigError("data.cache: required (the cache root to train from)")
    if not cfg.data.images and cfg.data.image_source == "files":
        raise ConfigError("data.images: required with data.image_source=files (the image directory or list holding "
                          "the cache's image ids)")
    if cfg.data.image_decode == "device" and cfg.augment.mode == "views":  # auto: the loader with views
        raise ConfigError("data.image_decode=device: augment.mode=views crops on the loader (set "
                          "data.image_decode=loader, or augment.mode grid-crop or none)")
    if is_remote(cfg.out):
        raise ConfigError(f"out: run directories are local paths (caches may be URLs); got {cfg.out}")
    if cfg.steps < 1:
        raise ConfigError("steps: must be >= 1")
    if cfg.data.batch_size < 1:
        raise ConfigError("data.batch_size: must be >= 1")
    if not 0 <= cfg.loss.drop_p < 1:
        raise ConfigError("loss.drop_p: must be in [0, 1)")
    if not 0 <= cfg.optim.warmup_fraction < 1:
        raise ConfigError("optim.warmup_fraction: must be in [0, 1)")
    if cfg.data.chunk_cache_limit_gb < 0 or (cfg.data.chunk_cache_limit_gb and not cfg.data.chunk_cache):
        raise ConfigError("data.chunk_cache_limit_gb: must be 0 (no limit) or > 0 with data.chunk_cache set")
    if cfg.checkpoint_every < 1:
        raise ConfigError("checkpoint_every: must be >= 1")
    if cfg.checkpoint_minutes < 0:
        raise ConfigError("checkpoint_minutes: must be 0 (off) or > 0")
    if cfg.eval_every < 0 or (cfg.eval_every and cfg.data.holdout < 1):
        raise ConfigError("eval_every: must be 0 (off) or > 0 with data.holdout > 0 (the held-out images it evaluates)")
    if cfg.heads.sak_reduction < 1:
        raise ConfigError("heads.sak_reduction: must be >= 1")
    if any(w is not None and w < 0 for w in (cfg.loss.cos_weight, cfg.loss.smooth_l1_weight)):
        raise ConfigError("loss.cos_weight and loss.smooth_l1_weight: must be >= 0 (or none: the head kind's default)")
    validate_student(cfg)
    validate_augment(cfg.augment)


def validate_student(cfg: TrainConfig) -> None:
    """The student's shape: patch, registers, stored and trained resolutions (errors name the field)."""
    student, patch = cfg.student, cfg.student.patch_size
    if patch < 1 or student.num_registers < 0:
        raise ConfigError("student.patch_size: must be >= 1, and student.num_registers >= 0")
    if student.img_size < patch or student.img_size % patch:
        raise ConfigError(f"student.img_size: {student.img_size} is not a multiple of student.patch_size {patch}")
    if cfg.data.resolution < 0 or cfg.data.resolution % patch:
        raise ConfigError(f"data.resolution: {cfg.data.resolution} is neither 0 (the caches' student resolution) nor "
                          f"a multiple of student.patch_size {patch}")
    if not 0 <= student.drop_path < 1:
        raise ConfigError("student.drop_path: must be in [0, 1)")


def validate_augment(augment: AugmentConfig) -> None:
    """Crop box ranges and flip probability (errors name the field)."""
    if not 0 < augment.crop_scale[0] <= augment.crop_scale[1] <= 1:
        raise ConfigError(f"augment.crop_scale: {augment.crop_scale}; need 0 < low <= high <= 1")
    if not 0 < augment.crop_ratio[0] <= augment.crop_ratio[1]:
        raise ConfigError(f"augment.crop_ratio: {augment.crop_ratio}; need 0 < low <= high")
    if not 0 <= augment.flip_p <= 1:
        raise ConfigError("augment.flip_p: must be in [0, 1]")
    if augment.min_cells < 1:
        raise ConfigError("augment.min_cells: must be >= 1")


def loss_terms(cfg: TrainConfig) -> tuple[float, float, str]:
    """``(cos_weight, smooth_l1_weight, cosine_over)`` of the distillation loss: the ``loss`` fields, their ``None`` /
    ``auto`` resolved by head kind (SAK: ``0.9·(1 − cos of the whole map) + 0.1·SmoothL1``; others: ``0.5``/``0.5``
    per token)."""
    sak = cfg.heads.kind == "sak"
    cos = cfg.loss.cos_weight if cfg.loss.cos_weight is not None else (0.9 if sak else 0.5)
    l1 = cfg.loss.smooth_l1_weight if cfg.loss.smooth_l1_weight is not None else (0.1 if sak else 0.5)
    over = cfg.loss.cosine_over if cfg.loss.cosine_over != "auto" else ("map" if sak else "token")
    return cos, l1, over


def config_to_dict(cfg: TrainConfig) -> dict:
    """The config as plain values, as a run records it (config.json, checkpoint.pt) and compares it on resume:
    ``data.cache`` with any credentials in its URL redacted (docs/security.md)."""
    data = dataclasses.asdict(cfg)
    data["data"]["cache"] = redact_url(data["data"]["cache"])
    return data
