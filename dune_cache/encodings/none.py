"""``none`` (default): the features in the storage dtype; lossless apart from that dtype."""
from __future__ import annotations

from .base import Scheme
from .registry import register_scheme


@register_scheme
class NoneScheme(Scheme):
    name = "none"
    passthrough = True
    identity = True
