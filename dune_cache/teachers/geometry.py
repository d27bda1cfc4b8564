"""Which resolution a teacher sees, and the token grid it yields.

DUNE's shared-grid rule: a student with patch ``p_s`` at resolution ``S`` has grid ``S / p_s``;
every teacher sees the image at ``grid * p_t`` (i.e. the student's resolution scaled by
``p_t / p_s``) so that all teachers give the student's token grid, without feature interpolation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import GeometryError
from .spec import TeacherSpec

RESIZE_MODES = ("squash", "center_crop")  # how an image is fitted to the resolution (images.resize_image)


@dataclass(frozen=True)
class Geometry:
    """Teacher input ``resolution`` (H, W) and token ``grid`` (h, w) = resolution / patch."""

    resolution: tuple[int, int]
    grid: tuple[int, int]
    patch_size: int
    resize: str = "squash"
    interpolation: str = "bicubic-antialias"
    student_patch: int | None = None
    student_resolution: tuple[int, int] | None = None

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def parse_size(value: int | str | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    """``448`` / ``"448"`` / ``"384x512"`` / ``(384, 512)`` -> ``(H, W)``."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        h, w = value
    elif isinstance(value, int):
        h = w = value
    else:
        parts = str(value).lower().replace(",", "x").split("x")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise GeometryError(f"size {value!r}: expected N or HxW, e.g. 448 or 384x512")
        h, w = (int(parts[0]), int(parts[-1]))
    if h <= 0 or w <= 0:
        raise GeometryError(f"size {value!r} must be positive")
    return int(h), int(w)


def resolve_geometry(
    spec: TeacherSpec,
    resolution: int | str | tuple[int, int] | None = None,
    student_patch: int | None = None,
    student_resolution: int | str | tuple[int, int] | None = None,
    resize: str = "squash",
) -> Geometry:
    """Teacher input geometry from either ``resolution``, or ``student_patch`` + ``student_resolution``
    (shared grid), or the teacher's native resolution when neither is given."""
    if resize not in RESIZE_MODES:
        raise GeometryError(f"resize mode {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
    p = spec.patch_size
    student_res = parse_size(student_resolution)
    if (student_patch is None) != (student_res is None):
        raise GeometryError("--student-patch and --student-resolution go together")
    if student_res is not None and resolution is not None:
        raise GeometryError("give either --resolution or --student-patch/--student-resolution, not both")
    if student_res is not None:
        if any(s % student_patch for s in student_res):
            raise GeometryError(
                f"student resolution {student_res} is not a multiple of the student patch {student_patch}")
        grid = (student_res[0] // student_patch, student_res[1] // student_patch)
        res = (grid[0] * p, grid[1] * p)
    else:
        res = parse_size(resolution) or spec.native_resolution
        if res[0] % p or res[1] % p:
            near = tuple(max(p, round(r / p) * p) for r in res)
            raise GeometryError(
                f"resolution {res[0]}x{res[1]} is not a multiple of {spec.name}'s patch size {p}; "
                f"nearest: {near[0]}x{near[1]}")
        grid = (res[0] // p, res[1] // p)
    return Geometry(resolution=res, grid=grid, patch_size=p, resize=resize,
                    student_patch=student_patch, student_resolution=student_res)
