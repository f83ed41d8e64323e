"""DST methods, one class per file, registered by name (see ``base.py``)."""

from . import granet, rigl, sparse_evolutionary  # noqa: F401  (each registers its class)
from .base import METHODS, DSTMethod, create_method, register_method

__all__ = ["METHODS", "DSTMethod", "create_method", "register_method"]
