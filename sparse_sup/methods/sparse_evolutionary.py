"""SET (Mocanu et al., 2018): drop the smallest-magnitude weights, regrow uniformly at random
(counter-based keys, identical on every rank). The reference code's "SET" regrows by gradient,
which is RigL; this is the method as published."""

from __future__ import annotations

from .base import DSTMethod, register_method


@register_method
class SET(DSTMethod):
    name = "set"
    grow = "random"
