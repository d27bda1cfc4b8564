"""Names and values that define the cache format, shared by the modules of :mod:`dune_cache.format` (and read through
:mod:`dune_cache.format.store`)."""
from __future__ import annotations

FORMAT_VERSION = 1
ATTR_KEY = "dune_cache"
STATUS_PENDING, STATUS_DONE, STATUS_FAILED = 0, 1, 2
FLOAT16_MAX = 65504.0
VIEW_ARRAYS = ("cls", "patch", "boxes", "flip")
FEATURES = ("cls", "patch", "views/cls", "views/patch")  # feature arrays, stored through the group's encoding
ENCODING_GROUP = "encoding"  # calibration arrays of the group's encoding (docs/cache-format.md, "Encodings")
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}  # zarr array config of feature writes (TeacherStore.write_features)
