"""A run folder: the files it holds (``layout``), its checkpoint (``checkpoint``), a trained run loaded for use
(``loading``), and when a run checkpoints, may resume and stops (``control``).

May import: :mod:`dune_student.model`, :mod:`dune_student.loss`, :mod:`dune_student.data`, :mod:`dune_student.config`
and :mod:`dune_cache`'s public API.
"""
