"""Which provenance fields define what a teacher group *is*, and how two provenances differ (docs/cache-format.md).

A run whose provenance differs from a group's in any identity field is refused (resume, repair).
"""
from __future__ import annotations

import json
from typing import Any

# Provenance sections that define what a store *is*; a run that differs in any of them is refused.
# ``views`` is absent in groups without cached views, ``levels`` in groups without intermediate blocks.
IDENTITY_SECTIONS = ("teacher", "checkpoint", "images", "geometry", "storage", "views", "levels")
# derived (an encoding's per-kind calibration results from the data; the description of the levels' tokens from
# the teacher), not chosen: not identity
DERIVED_PREFIXES = ("storage.encoding.kinds.", "levels.encodings.", "levels.tokens")
# The checkpoint is identified by the digest of the loaded weights when both sides record it (the same weights read
# from a release file, a timm file or a Hugging Face folder are the same teacher); otherwise by the fields groups
# made before it was recorded have (and ``repair``'s check of the files, made without loading the teacher).
CHECKPOINT_WEIGHTS = "checkpoint.weights_sha256"
CHECKPOINT_FILE_FIELDS = ("checkpoint.file", "checkpoint.sha256", "checkpoint.bytes")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def provenance_differences(stored: dict, requested: dict) -> list[str]:
    """Human-readable ``field: store has X, this run has Y`` lines over the identity sections."""
    def identity(meta: dict) -> dict:  # JSON round trip: tuples and lists compare equal
        flat = flatten(json.loads(json.dumps({k: meta.get(k, {}) for k in IDENTITY_SECTIONS})))
        return {k: v for k, v in flat.items() if not k.startswith(DERIVED_PREFIXES)}

    a, b = identity(stored), identity(requested)
    skipped = uncompared_checkpoint_fields(a, b)
    return [
        f"{key}: store has {a.get(key, '<absent>')!r}, this run has {b.get(key, '<absent>')!r}"
        for key in sorted(set(a) | set(b))
        if key not in skipped and a.get(key) != b.get(key)
    ]


def uncompared_checkpoint_fields(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
    """Flattened ``checkpoint.*`` fields of ``a`` or ``b`` that identity does not compare: with ``weights_sha256``
    on both sides every other one (file names, file hashes, format); otherwise all but ``file``, ``sha256`` and
    ``bytes``, so that a group made before the others were recorded compares exactly as it did."""
    fields = {key for key in set(a) | set(b) if key.startswith("checkpoint.")}
    if CHECKPOINT_WEIGHTS in a and CHECKPOINT_WEIGHTS in b:
        return fields - {CHECKPOINT_WEIGHTS}
    return fields - set(CHECKPOINT_FILE_FIELDS)
