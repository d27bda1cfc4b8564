"""The trainer (``trainer``: a thin loop over the components below) and its parts: run set-up from the cache
(``setup``), DDP (``distributed``), the optimiser and schedule (``optimization``) and the live-teacher baseline
(``live_teachers``).

May import: every folder of :mod:`dune_student` but ``cli``.
"""
