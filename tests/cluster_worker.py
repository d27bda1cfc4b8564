"""Loaded into each dask worker process the cluster tests start (``distributed.worker.preload``): registers the
tests' tiny teacher there (conftest), and lets a test see and steer what the workers do through files in the folder
``$DUNE_TEST_MARKERS``:

- each forward of the tiny teacher first writes a marker file ``<pid>-<ns>`` there (a unit is in flight in that
  worker process), then waits while a file ``hold`` exists there (at most :data:`HOLD_S` s);
- reading an image whose file name starts with ``poison`` kills the worker process (SIGKILL), as a decoder crash
  would.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import conftest  # registers tiny_test_teacher in this process

from dune_cache.extract import loading

MARKERS = "DUNE_TEST_MARKERS"
HOLD_S = 120.0

_forward = conftest.TinyTeacher.forward_tokens
_load_pixels = loading.load_pixels


def forward_tokens(self, x):
    """The tiny teacher's forward, after a marker and while ``hold`` exists."""
    folder = os.environ.get(MARKERS)
    if folder:
        Path(folder, f"{os.getpid()}-{time.monotonic_ns()}").touch()
        deadline = time.monotonic() + HOLD_S
        while Path(folder, "hold").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return _forward(self, x)


def load_pixels(path, *args, **kwargs):
    """Decode as usual, but die on a ``poison*`` file."""
    if Path(path).name.startswith("poison"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _load_pixels(path, *args, **kwargs)


conftest.TinyTeacher.forward_tokens = forward_tokens
loading.load_pixels = load_pixels
