"""Pictures of cached features: PCA-RGB maps of token grids, labelled panels and sheets (``pictures``).

May import: :mod:`dune_cache.read` and what it may import.
"""
