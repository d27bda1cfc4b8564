"""Teachers: the registry (``registry``, ``register_teacher``/``create_teacher``), what a teacher is without torch
(``spec``, ``geometry``: the resolution it sees and the grid it yields, ``blocks``: which intermediate blocks it
exposes), the model base class (``base``) and one module per family (``dinov2``, ``mast3r``, ``sam``, ...; their specs
in ``families``). Importing this package registers every built-in teacher's spec without importing torch; a family's
model module is imported when one of its teachers is created.

May import: :mod:`dune_cache.errors` and :mod:`dune_cache.utils` only.
"""
from ..errors import CheckpointError, UnknownTeacherError
from . import families  # noqa: F401,E402  (registers the built-in specs)
from .registry import (
    create_teacher,
    get_spec,
    list_prefixes,
    list_teachers,
    prefix_form,
    register_prefix,
    register_teacher,
)
from .spec import TeacherSpec

__all__ = [
    "CheckpointError", "Teacher", "TeacherOutput", "TeacherSpec", "UnknownTeacherError",
    "create_teacher", "get_spec", "list_prefixes", "list_teachers",
    "prefix_form", "register_prefix", "register_teacher",
]
_TORCH_CLASSES = ("Teacher", "TeacherOutput")  # in .base, which imports torch: imported on first use


def __getattr__(name: str):
    if name in _TORCH_CLASSES:
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
