"""Engine adapters: how each distributed engine exposes local pieces, gradients, optimizer state
and collectives to the algorithm."""

from .local import LocalBackend

__all__ = ["LocalBackend"]
