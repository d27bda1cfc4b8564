"""The write path, ``dune-cache extract``: one teacher over an image manifest into a teacher group. ``pipeline`` runs
it (calibration, forward, checks), ``run`` is the entry point (a ``--shard`` slot or the cluster), ``loading``
decodes images in DataLoader workers, ``writer`` stores features then marks images done, ``units`` deals work units
to processes, ``cluster`` runs them as tasks on a dask.distributed cluster instead (dask imported only there, only
then), ``provenance`` records what made the group.

May import: :mod:`dune_cache.format`, :mod:`dune_cache.images`, :mod:`dune_cache.teachers`,
:mod:`dune_cache.encodings`, :mod:`dune_cache.storage`, :mod:`dune_cache.utils`, :mod:`dune_cache.config`.
"""
