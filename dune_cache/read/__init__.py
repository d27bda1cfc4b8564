"""The read path: :class:`~dune_cache.read.reader.CacheReader` (teacher groups aligned by image id, decoded and
damage-checked float targets), the batches it returns (``batches``), the alignment (``alignment``), the array
backends (``backends``: tensorstore, zarrs, zarr, memory), the routing of reads through the chunk cache with its
retry (``routing``) and block-shuffled sample orders (``shuffle``). ``dune_student`` reads caches only through it.

May import: :mod:`dune_cache.format` and what it may import.
"""
