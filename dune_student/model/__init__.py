"""Everything with weights: the student ViT (``student``, timm, attention through xformers or SDPA in
``attention``), its per-teacher heads (``heads``: DUNE's transformer projector, UNIC's ladder, an MLP, SAK's adapter
paths in ``sak``), SAK's Mixture-of-Representations routers (``router``) and the export to timm (``export``).

May import: :mod:`dune_student.config`, :mod:`dune_student.errors` and :mod:`dune_cache`'s public API.
"""
