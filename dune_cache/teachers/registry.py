"""One registry for every teacher: ``register_teacher`` / ``create_teacher`` / ``list_teachers``.

A teacher is registered with its spec and a factory::

    @register_teacher(TeacherSpec(name="dinov2_vits14", ...))
    def dinov2_vits14(spec: TeacherSpec, checkpoint: Path | None) -> Teacher: ...

The built-in families register their specs in :mod:`dune_cache.teachers.families` with a
:func:`lazy_factory`, so listing teachers or checking a name never imports torch: a family's
module (its model code) is imported when one of its teachers is created.

Names with a registered *prefix* (``timm:<model_name>``) are resolved by a prefix factory
that builds the spec at creation time.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import UnknownTeacherError
from .spec import TeacherSpec

if TYPE_CHECKING:
    from .base import Teacher

TeacherFactory = Callable[[TeacherSpec, "Path | None"], "Teacher"]
PrefixFactory = Callable[[str, "Path | None"], "Teacher"]

_TEACHERS: dict[str, tuple[TeacherSpec, TeacherFactory]] = {}
_PREFIXES: dict[str, tuple[PrefixFactory, str, str]] = {}


def register_teacher(spec: TeacherSpec) -> Callable[[TeacherFactory], TeacherFactory]:
    """Decorator registering ``factory(spec, checkpoint)`` under ``spec.name``."""

    def decorator(factory: TeacherFactory) -> TeacherFactory:
        if spec.name in _TEACHERS:
            raise ValueError(f"teacher {spec.name!r} registered twice")
        _TEACHERS[spec.name] = (spec, factory)
        return factory

    return decorator


def register_prefix(prefix: str, description: str, form: str = "<model_name>"
                    ) -> Callable[[PrefixFactory], PrefixFactory]:
    """Decorator registering ``factory(suffix, checkpoint)`` for names ``f"{prefix}:{suffix}"``; ``form`` shows
    what the suffix is (listings print ``f"{prefix}:{form}"``)."""

    def decorator(factory: PrefixFactory) -> PrefixFactory:
        _PREFIXES[prefix] = (factory, description, form)
        return factory

    return decorator


def lazy_factory(module: str, name: str) -> Callable[..., Teacher]:
    """A factory that imports ``module`` (a family's model code) and calls its ``name`` only when it is called."""

    def build(*args):
        return getattr(importlib.import_module(module), name)(*args)

    build.__qualname__ = f"{module}.{name}"
    return build


def list_teachers() -> list[TeacherSpec]:
    """Specs of all named teachers, sorted by name (prefix families are listed by :func:`list_prefixes`)."""
    return [_TEACHERS[name][0] for name in sorted(_TEACHERS)]


def list_prefixes() -> dict[str, str]:
    """``{prefix: description}`` of the prefix families (e.g. ``timm``)."""
    return {p: d for p, (_, d, _) in sorted(_PREFIXES.items())}


def prefix_form(prefix: str) -> str:
    """How names of prefix family ``prefix`` are written, e.g. ``timm:<model_name>``."""
    return f"{prefix}:{_PREFIXES[prefix][2]}"


def get_spec(name: str) -> TeacherSpec:
    """Spec of a named teacher (prefix teachers have a spec only once created)."""
    if name not in _TEACHERS:
        raise UnknownTeacherError(_unknown_message(name))
    return _TEACHERS[name][0]


def check_teacher_name(name: str) -> TeacherSpec | None:
    """The spec of the named teacher ``name``, ``None`` if ``name`` has a registered prefix (its spec exists once
    the teacher is created); :class:`UnknownTeacherError` for any other name."""
    if name in _TEACHERS:
        return _TEACHERS[name][0]
    if not (":" in name and name.split(":", 1)[0] in _PREFIXES):
        raise UnknownTeacherError(_unknown_message(name))
    return None


def create_teacher(name: str, checkpoint: str | Path | None = None) -> Teacher:
    """Build teacher ``name`` in eval mode with frozen weights, loaded strictly from ``checkpoint``.

    ``checkpoint=None`` leaves random weights (tests, benchmarks of speed only).
    """
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if name in _TEACHERS:
        spec, factory = _TEACHERS[name]
        teacher = factory(spec, ckpt)
    else:
        check_teacher_name(name)
        prefix, suffix = name.split(":", 1)
        teacher = _PREFIXES[prefix][0](suffix, ckpt)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _unknown_message(name: str) -> str:
    known = ", ".join(sorted(_TEACHERS)) or "none"
    prefixes = ", ".join(prefix_form(p) for p in sorted(_PREFIXES))
    return f"unknown teacher {name!r}; known teachers: {known}; prefix families: {prefixes}"
