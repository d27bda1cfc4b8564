"""Training input: batches of student pixels and cached targets cropped alike, in a resumable order (``batches``),
and cache-compatible augmentation (``augment``).

May import: :mod:`dune_student.config`, :mod:`dune_student.errors` and :mod:`dune_cache`'s public API.
"""
