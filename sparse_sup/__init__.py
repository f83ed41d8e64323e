"""sparse_sup: dynamic sparse training with Sup-tickets (Yin et al., UAI 2022) on timm models."""

__version__ = "0.1.0"
