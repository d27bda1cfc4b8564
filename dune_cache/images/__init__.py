"""Which images a cache is made of and how they become pixels: manifests (ids, tags, their escaping, directory and
list-file input; ``manifest``), robust decoding and resizing (``decode``), and random views with their crop boxes
(``views``).

May import: :mod:`dune_cache.config`, :mod:`dune_cache.errors`, :mod:`dune_cache.teachers.geometry`.
"""
