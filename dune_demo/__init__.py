"""The demo's data, outside the library: real images (``images``) and labelled probe data (``probe_data``) that install
offline from PyPI packages. ``tools/prepare_demo.py``, ``tools/prepare_probe_data.py`` and the tests use it;
neither ``dune_cache`` nor ``dune_student`` imports it.

May import: :mod:`dune_cache`'s public API.
"""
