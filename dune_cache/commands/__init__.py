"""The work behind each ``dune-cache`` subcommand, one module each: ``info``, ``verify``, ``repair``, ``recompress``,
``stats``, ``catalog`` (``ls``), ``show`` and ``add_images``. Only :mod:`dune_cache.cli` (and tools) import them.

May import: every folder of :mod:`dune_cache` but ``cli``.
"""
