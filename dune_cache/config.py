"""What ``dune-cache extract`` is asked to do, and the settings' valid values: importable without torch, zarr or
numpy, so that the CLI checks every flag (:meth:`ExtractConfig.check`) before importing them.

Re-exported where the settings are used: :class:`EncodingConfig` by :mod:`.encodings`, :class:`StorageConfig` by
:mod:`.store`, :class:`ViewSampling` by :mod:`.views`, :class:`ExtractConfig` by :mod:`.extract`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .errors import EncodingError, StoreError
from .teachers.blocks import SAK, BlockChoice, check_block_indices
from .teachers.geometry import resolve_geometry
from .teachers.registry import check_teacher_name
from .teachers.spec import check_checkpoint_file

ENCODINGS = ("none", "bitround", "int8-channel", "int8-token", "pca", "pca-int8", "lowrank")
LOWRANK_BASES = ("float", "int8")  # how ``lowrank`` stores each image's factors V: storage dtype, or int8 codes
CODECS = ("auto", "blosc-zstd", "blosc-lz4", "zstd", "gzip", "none")
# The level a codec gets when none is given; `auto` (the default) is decided per group by
# :meth:`StorageConfig.with_codec`
CODEC_LEVELS = {"zstd": 1, "blosc-zstd": 5, "blosc-lz4": 5, "gzip": 6, "none": 0}
DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class EncodingConfig:
    """An encoding and its parameters (only those of ``name`` are recorded, see :data:`PARAMS`).

    keepbits: ``bitround`` mantissa bits kept (7: bfloat16 level; fp16 has 10).
    margin, sigmas: ``int8-channel`` range per channel: ``[min, max]`` of the calibration values widened by
        ``margin·(max − min)`` on each side, and at least ``mean ± sigmas·std``; values beyond it clip.
        Measured on the e2e caches (DINOv2-S / MobileNetV2 features, 64 calibration images): 0.25 / 6 clip
        4e-7-3e-5 of held-out patch values (min/max alone: 8e-4 / 3e-4) at ~1% relative error, and
        3e-4-6e-4 of CLS values (min/max alone: 2e-2 / 1.4e-2).
    outlier_ratio: ``int8-token``: a channel whose calibration absmax exceeds ``outlier_ratio`` × the
        median channel absmax is a massive-activation channel, kept in the storage dtype. ViT "massive
        activations" reach 100-1000× the median; ordinary channels of the e2e teachers stay below 2.6×.
    rank, variance: ``pca`` / ``pca-int8`` rank, or with ``rank == 0`` the smallest rank keeping ``variance`` of
        the calibration tokens' variance (0.99: 153 of 384 DINOv2-S channels, 619 of 1280 MobileNetV2 ones).
    image_rank: ``lowrank``: rank of each image's own factorisation of its ``(h·w, D)`` token matrix.
    basis: ``lowrank``: its factors ``V`` in the storage dtype (``float``) or as int8 codes with one step per
        factor (``int8``); recorded only when not ``float``, so groups made before it existed read and compare
        as before.
    calibration_images: images whose features calibrate the lossy encodings (``lowrank`` only records its
        diagnostics on them).
    """

    name: str = "none"
    keepbits: int = 7
    margin: float = 0.25
    sigmas: float = 6.0
    outlier_ratio: float = 6.0
    rank: int = 0
    variance: float = 0.99
    image_rank: int = 48
    basis: str = "float"
    calibration_images: int = 64

    def __post_init__(self) -> None:
        if self.name not in ENCODINGS:
            raise EncodingError(f"encoding {self.name!r}; choose one of {', '.join(ENCODINGS)}")
        if self.keepbits < 0 or self.margin < 0 or self.sigmas < 0 or self.rank < 0:
            raise EncodingError("keepbits, margin, sigmas and rank must be >= 0")
        if self.image_rank < 1:
            raise EncodingError(f"image_rank {self.image_rank}: must be >= 1")
        if self.basis not in LOWRANK_BASES:
            raise EncodingError(f"basis {self.basis!r}: choose one of {', '.join(LOWRANK_BASES)}")
        if self.outlier_ratio <= 1 or not 0 < self.variance <= 1 or self.calibration_images < 1:
            raise EncodingError("need outlier_ratio > 1, 0 < variance <= 1 and calibration_images >= 1")

    @property
    def needs_calibration(self) -> bool:
        return self.name in ("int8-channel", "int8-token", "pca", "pca-int8", "lowrank")

    def params(self) -> dict:
        """The parameters that apply to this encoding (those of :data:`RECORDED_UNLESS_DEFAULT` only when set)."""
        return {key: getattr(self, key) for key in PARAMS[self.name]
                if key not in RECORDED_UNLESS_DEFAULT or getattr(self, key) != RECORDED_UNLESS_DEFAULT[key]}

    def to_json(self) -> dict:
        return {"name": self.name, "params": self.params()}

    @classmethod
    def from_json(cls, section: dict | None) -> "EncodingConfig":
        """From a provenance ``storage.encoding`` section (absent: ``none``)."""
        return cls() if section is None else cls(name=section["name"], **section.get("params", {}))

    @classmethod
    def parse(cls, text: str) -> "EncodingConfig":
        """``NAME[:key=value,...]``, e.g. ``pca:variance=0.95`` or ``int8-token:outlier_ratio=8``."""
        name, _, rest = text.partition(":")
        config = cls(name=name.strip())
        known = {f.name: f.type for f in fields(cls) if f.name != "name"}
        values = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in PARAMS[config.name]:
                raise EncodingError(f"encoding {text!r}: {item!r} is not one of {name}'s parameters "
                                    f"({', '.join(PARAMS[config.name]) or 'none'}), written key=value")
            values[key] = {"int": int, "float": float, "str": str}[known[key]](value.strip())
        return replace(config, **values)

    def __str__(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}:{params}" if params else self.name


PARAMS = {
    "none": (),
    "bitround": ("keepbits",),
    "int8-channel": ("margin", "sigmas", "calibration_images"),
    "int8-token": ("outlier_ratio", "calibration_images"),
    "pca": ("rank", "variance", "calibration_images"),
    "pca-int8": ("rank", "variance", "calibration_images"),
    "lowrank": ("image_rank", "calibration_images", "basis"),
}
# parameters added after caches were made with their default: recorded (and printed) only when not the default,
# so a group made before reads, prints and compares (resume, repair) exactly as it did
RECORDED_UNLESS_DEFAULT = {"basis": "float"}


STATS_SAMPLE = 10_000              # images `dune-cache stats` estimates on, at most (dune_cache.commands.stats)
AUTO_SHARD_FROM = 100_000          # new groups of at least this many images are sharded by default (docs/scale.md)
SHARD_TARGET_BYTES = 256 << 20     # raw (uncompressed) bytes of one shard object the default aims at
MAX_SHARD_IMAGES = 1024            # images per shard, at most, by default


def auto_shard_images(count: int, image_bytes: int) -> int:
    """Default ``shard_images`` of a new group of ``count`` images of ``image_bytes`` raw feature bytes each (CLS,
    patch tokens and cached views): ``0`` (one object per image and array) below :data:`AUTO_SHARD_FROM` images;
    from there the largest power of two of images whose raw bytes stay within :data:`SHARD_TARGET_BYTES`, at most
    :data:`MAX_SHARD_IMAGES` (a shard is the unit that ``verify`` decodes at once; docs/scale.md)."""
    if count < AUTO_SHARD_FROM:
        return 0
    fitting = max(1, SHARD_TARGET_BYTES // max(1, image_bytes))
    return min(MAX_SHARD_IMAGES, 1 << (fitting.bit_length() - 1))


@dataclass(frozen=True)
class StorageConfig:
    """How features are stored. ``unit_size`` images form one work unit (one ``status`` chunk);
    with ``shard_images > 0`` arrays are sharded with that many images per shard and the unit
    equals the shard; ``shard_images=None`` (the default) lets :meth:`resolved` pick it for the group's size
    (:func:`auto_shard_images`) before a group is created."""

    dtype: str = "float16"
    codec: str = "auto"  # auto: none for plain float features, zstd for encoded ones (with_codec; docs/scale.md §4)
    level: int | None = None  # None: the codec's CODEC_LEVELS entry
    unit_size: int = 64
    shard_images: int | None = None  # None: auto_shard_images at creation; a resumed group keeps its own
    encoding: EncodingConfig = EncodingConfig()
    checksum: bool = True  # crc32c of every feature chunk (groups made before this key read as False)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise StoreError(f"dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.codec not in CODECS:
            raise StoreError(f"codec {self.codec!r}; choose one of {', '.join(CODECS)}")
        if self.unit_size < 1 or (self.shard_images is not None and self.shard_images < 0):
            raise StoreError("unit_size must be >= 1 and shard_images >= 0")

    @property
    def images_per_unit(self) -> int:
        if self.shard_images is None:
            raise StoreError("shard_images is still 'auto': resolve the storage for the group first (resolved())")
        return self.shard_images or self.unit_size

    def with_codec(self) -> "StorageConfig":
        """This config with its codec and level decided: ``auto`` stores plain float features (encoding ``none``)
        without a byte codec and encoded ones with zstd. Measured (docs/scale.md §4: a ViT-L image at 448 through
        the writer): lossless coding buys float16 features 9% for 1.7× the writer's CPU, over the 4 cores per H100
        an extraction can spare, while int8 codes shrink 15% at no measurable cost. A missing level is the codec's
        :data:`CODEC_LEVELS` entry."""
        codec = self.codec if self.codec != "auto" else ("none" if self.encoding.name == "none" else "zstd")
        return replace(self, codec=codec, level=CODEC_LEVELS[codec] if self.level is None else self.level)

    def resolved(self, count: int, image_bytes: int, stored: "StorageConfig | None" = None) -> "StorageConfig":
        """This config decided for a group: a resumed group (``stored``) keeps its codec, level and layout unless
        they are given; otherwise the codec as :meth:`with_codec` decides and ``shard_images`` as given, or by
        :func:`auto_shard_images` of ``count`` images of ``image_bytes`` raw bytes each."""
        config = self
        if stored is not None and config.codec == "auto":
            config = replace(config, codec=stored.codec, level=stored.level if config.level is None else config.level)
        config = config.with_codec()
        if config.shard_images is not None:
            return config
        chosen = stored.shard_images if stored is not None else auto_shard_images(count, image_bytes)
        return replace(config, shard_images=chosen)

    def to_json(self) -> dict:
        """Provenance ``storage`` section, codec and level as decided (:meth:`with_codec`); ``encoding`` (name and
        params) only when not ``none``, so groups without an encoding read and compare as before."""
        decided = self.with_codec()
        data = {f.name: getattr(decided, f.name) for f in fields(decided) if f.name != "encoding"}
        return {**data, "encoding": self.encoding.to_json()} if self.encoding.name != "none" else data

    @classmethod
    def from_json(cls, section: dict) -> "StorageConfig":
        """From a provenance ``storage`` section (keys this version does not know are ignored)."""
        known = {f.name for f in fields(cls)} - {"encoding"}
        return cls(**{"checksum": False, **{k: v for k, v in section.items() if k in known}},
                   encoding=EncodingConfig.from_json(section.get("encoding")))


@dataclass(frozen=True)
class ViewSampling:
    """How the boxes of cached views are drawn (DUNE's RandomResizedCrop and flip defaults)."""

    seed: int = 0
    scale: tuple[float, float] = (0.4, 1.0)  # fraction of the image's area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # width / height, relative units
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"view scale {self.scale}: need 0 < low <= high <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"view ratio {self.ratio}: need 0 < low <= high")
        if not 0 <= self.flip_p <= 1:
            raise ValueError(f"view flip_p {self.flip_p}: need 0 <= p <= 1")

    def to_json(self, count: int) -> dict:
        """The ``views`` provenance section of a group with ``count`` views per image."""
        return {"count": count, **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}}


@dataclass
class ExtractConfig:
    """Everything ``dune-cache extract`` does; each field is one CLI flag."""

    teacher: str
    images: Path
    out: str
    checkpoint: Path | None = None
    name: str | None = None  # teacher group name in the cache; default: the teacher name
    resolution: str | None = None  # N or HxW; default: the teacher's native resolution
    student_patch: int | None = None
    student_resolution: str | None = None
    resize: str = "squash"
    batch_size: int = 32
    num_workers: int | None = None  # decoding workers; None: default_num_workers(device)
    writer_threads: int = 1  # threads that encode and write each batch's features (docs/benchmarks.md)
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    storage: StorageConfig = field(default_factory=StorageConfig)
    views: int = 0  # K random views per image stored besides the whole image (docs/augmentation.md)
    view_sampling: ViewSampling = field(default_factory=ViewSampling)
    # intermediate blocks stored besides the final features ("sak" or 0-based indices; docs/cache-format.md, "Levels")
    blocks: BlockChoice = ()
    shard: str = "0/1"  # this machine's share i/n of the work units
    # run the work units as tasks on a dask.distributed cluster instead: local[:N] or its address (docs/cluster.md)
    scheduler: str | None = None
    overwrite: bool = False  # delete the group, matching or not, and extract it from scratch
    retry_failed: bool = False
    random_weights: bool = False  # allow running without a checkpoint (speed tests only)
    progress: bool = True

    def check(self) -> None:
        """Refuse flags that cannot work, reading no image, checkpoint or store and importing no torch: an unknown
        teacher, a missing checkpoint, a bad ``--shard`` or ``--views``, and a resolution or resize mode that does
        not fit a named teacher (a ``timm:<model_name>`` teacher's geometry is checked once it is built)."""
        spec = check_teacher_name(self.teacher)
        if self.checkpoint is None and not self.random_weights:
            raise ValueError(f"--checkpoint is required for teacher {self.teacher!r} "
                             "(pass --random-weights to run untrained weights, for speed tests only)")
        if self.checkpoint is not None:
            check_checkpoint_file(self.checkpoint)
        parse_shard(self.shard)
        if self.scheduler is not None:
            parse_scheduler(self.scheduler)
            if self.shard != "0/1":
                raise ValueError(f"--scheduler {self.scheduler} deals the work units to the cluster's workers itself: "
                                 f"drop --shard {self.shard} (run one extract command per group)")
        if self.views < 0:
            raise ValueError(f"--views {self.views}: must be >= 0")
        if self.writer_threads < 1:
            raise ValueError(f"--writer-threads {self.writer_threads}: must be >= 1")
        if isinstance(self.blocks, str) and not self.blocks.isidentifier():
            raise ValueError(f"--blocks {self.blocks!r}: expected {SAK!r}, a teacher's own choice name or block "
                             "indices, e.g. 5,11,17,23")
        if not isinstance(self.blocks, str):
            check_block_indices(tuple(self.blocks), None, f"--blocks {list(self.blocks)}")
        if spec is not None:
            resolve_geometry(spec, self.resolution, self.student_patch, self.student_resolution, self.resize)


def parse_shard(shard: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError as exc:
        raise ValueError(f"--shard {shard!r}: expected i/n, e.g. 0/4") from exc
    if not 0 <= i < n:
        raise ValueError(f"--shard {shard!r}: need 0 <= i < n")
    return i, n


def parse_scheduler(text: str) -> tuple[str, int | str | None]:
    """``--scheduler``: ``local`` -> ``("local", None)`` (one worker per GPU, else one), ``local:N`` -> ``("local",
    N)``, a scheduler address (``tcp://host:8786``, any ``PROTOCOL://``) -> ``("address", text)``, a scheduler file
    written by ``dask scheduler --scheduler-file`` (``*.json``) -> ``("file", text)``."""
    kind, sep, count = text.partition(":")
    if kind == "local":
        if not sep:
            return "local", None
        if count.isdigit() and int(count) >= 1:
            return "local", int(count)
    elif "://" in text:
        return "address", text
    elif text.endswith(".json"):
        return "file", text
    raise ValueError(f"--scheduler {text!r}: expected local, local:N (N >= 1 worker processes on this machine), a "
                     "scheduler address such as tcp://host:8786, or a scheduler file (*.json)")
