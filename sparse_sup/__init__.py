"""sparse_sup: dynamic sparse training with Sup-tickets (Yin et al., UAI 2022) on timm models."""

__version__ = "0.1.0"

_LAZY = {"SupTicketsTrainer": "hf_trainer", "SparsityArguments": "arguments"}  # sparse_sup.integrations.*


def __getattr__(name: str):
    """``from sparse_sup import SupTicketsTrainer`` loads transformers then, not at ``import sparse_sup``."""
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".integrations.{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
