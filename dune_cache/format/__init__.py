"""What a cache holds on disk (docs/cache-format.md): the teacher group and its read/write access (``store``,
:class:`~dune_cache.format.store.TeacherStore`, with its feature writes in ``writes`` and its status and failure
records in ``unit_state``), the format's names and values (``constants``), how its arrays are laid out (``layout``),
which provenance fields define it (``provenance``), its root's groups (``root``), intermediate blocks (``levels``),
statistics (``stats``), the image copy (``image_copy``), how a batch of rows is split for writing (``rows``) and what a
group's metadata must say before anything it sizes is read (``checks``: layout and limits, docs/security.md).

May import: :mod:`dune_cache.config`, :mod:`dune_cache.encodings`, :mod:`dune_cache.errors`, :mod:`dune_cache.images`,
:mod:`dune_cache.storage`. Never the read or write paths, commands or the CLI.
"""
