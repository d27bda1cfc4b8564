"""dune_cache: run heavy vision teachers once and store their features in Zarr v3 caches."""
__version__ = "0.1.0"
