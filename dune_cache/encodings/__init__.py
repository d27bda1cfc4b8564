"""Encodings of teacher features: a lossless default and lossy ones, chosen per teacher group.

An encoding turns float features ``(..., D)`` of one *kind* (``cls``: CLS vectors, ``patch``: patch tokens;
``views/cls`` and ``views/patch`` share their kind's encoding) into stored *parts*, and back. One module per
scheme, registered by name (:mod:`.registry`); their stored layout and decode formulas are in
docs/cache-format.md, "Encodings":

- ``none`` (default, :mod:`.none`), ``bitround`` (:mod:`.bitround`): plain float arrays, read as they are.
- ``int8-channel`` (:mod:`.int8_channel`), ``int8-token`` (:mod:`.int8_token`): int8 codes of every channel.
- ``pca`` (:mod:`.pca`): float coefficients on a calibrated global basis.
- ``pca-int8`` (:mod:`.pca_int8`): the same coefficients as per-token int8.
- ``lowrank`` (:mod:`.lowrank`): each image's own truncated SVD, token factors as per-token int8.

Calibration (numpy) runs on float features of ``calibration_images`` images spread evenly over the image list
(the first images of a sorted list are often one video or one folder; measured on the e2e caches,
docs/cache-format.md "Encodings").

May import: :mod:`dune_cache.config` and :mod:`dune_cache.errors` only.
"""
from ..config import ENCODINGS, EncodingConfig
from ..errors import EncodingError
from . import bitround, int8_channel, int8_token, lowrank, none, pca, pca_int8  # noqa: F401 - each registers its scheme
from .base import INT8_MAX, INT8_MISSING, KINDS, Part, Scheme, calibration_indices
from .encoding import Encoding, build_scheme, calibrate_scheme, encoding_summary, kind_scheme
from .registry import list_schemes, scheme_class

__all__ = ["ENCODINGS", "INT8_MAX", "INT8_MISSING", "KINDS", "Encoding", "EncodingConfig", "EncodingError", "Part",
           "Scheme", "build_scheme", "calibrate_scheme", "calibration_indices", "encoding_summary", "kind_scheme",
           "list_schemes", "scheme_class"]
