"""Where a cache lives: local paths and fsspec URLs (``urls``, ``location``: every open of a group or array goes
through them, so folders, NFS and object stores behave alike) and a local read-through copy of a remote cache's
chunks (``chunk_cache``).

May import: :mod:`dune_cache.errors` and :mod:`dune_cache.utils`.
"""
