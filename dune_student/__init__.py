"""dune_student: train a ViT student from teacher features cached by :mod:`dune_cache`."""
__version__ = "0.1.0"
