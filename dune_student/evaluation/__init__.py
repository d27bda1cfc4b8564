"""Judging a run: held-out fidelity (``fidelity``), probes of frozen features (``probe``, ``probe_scores``,
``probe_data``), SAK's stage-2 routing (``route``), pictures (``show``) and training curves (``curves``).

May import: :mod:`dune_student.runs` and everything below it.
"""
