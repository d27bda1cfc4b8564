"""Teacher registry. Importing this package registers every built-in teacher's spec without importing torch
(:mod:`.families`); a family's model module is imported when one of its teachers is created."""
from ..errors import CheckpointError
from .registry import (
    UnknownTeacherError,
    create_teacher,
    get_spec,
    list_prefixes,
    prefix_form,
    list_teachers,
    register_prefix,
    register_teacher,
)
from .spec import TeacherSpec
from . import families  # noqa: F401,E402  (registers the built-in specs)

__all__ = [
    "CheckpointError", "Teacher", "TeacherOutput", "TeacherSpec", "UnknownTeacherError",
    "create_teacher", "get_spec", "list_prefixes", "list_teachers", "prefix_form", "register_prefix", "register_teacher",
]
_TORCH_CLASSES = ("Teacher", "TeacherOutput")  # in .base, which imports torch: imported on first use


def __getattr__(name: str):
    if name in _TORCH_CLASSES:
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
