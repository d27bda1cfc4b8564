"""The errors ``dune-student`` reports to users, importable without torch (the CLI catches them before it imports the
trainer); each is re-exported by the module that raises it. :class:`~dune_student.config.ConfigError` is in
:mod:`dune_student.config`."""
from __future__ import annotations


class DataError(ValueError):
    """The cache, the images and the config do not fit together."""


class RunMismatchError(ValueError):
    """A run directory holds a checkpoint made with another configuration."""


class NonFiniteLossError(RuntimeError):
    """A step's loss or gradient norm is NaN/inf; the step was not applied and no checkpoint written after it."""
