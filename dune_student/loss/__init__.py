"""The training objective: DUNE's per-teacher loss, teacher dropping and data sharing (``distill``), target
standardisation (``standardize``) and SAK's per-level objective (``sak``).

May import: :mod:`dune_student.model`, :mod:`dune_student.config` and :mod:`dune_cache`'s public API.
"""
