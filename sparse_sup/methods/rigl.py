"""RigL (Evci et al., 2020): drop the smallest-magnitude weights, regrow where the dense gradient
of the step's batch is largest."""

from __future__ import annotations

from .base import DSTMethod, register_method


@register_method
class RigL(DSTMethod):
    name = "rigl"
    grow = "gradient"
