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


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message names the field."""


class RunCheckpointError(ValueError):
    """A file is not a training checkpoint, or its weights do not fit the architecture its config describes."""


class ProbeError(ValueError):
    """Probe data, cache or settings that cannot be probed (the message says why and what to do)."""
