"""Teacher registry. Importing this package registers every teacher family."""
from .base import CheckpointError, Teacher, TeacherOutput, TeacherSpec
from .registry import (
    UnknownTeacherError,
    create_teacher,
    get_spec,
    list_prefixes,
    list_teachers,
    register_prefix,
    register_teacher,
)
from . import dinov2, mast3r, multihmr, timm_generic, torchvision_cnn, unic  # noqa: F401,E402  (registration side effects)

__all__ = [
    "CheckpointError", "Teacher", "TeacherOutput", "TeacherSpec", "UnknownTeacherError",
    "create_teacher", "get_spec", "list_prefixes", "list_teachers", "register_prefix", "register_teacher",
]
