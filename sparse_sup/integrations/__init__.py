"""Integrations with other training frameworks. ``SparsityArguments`` is plain Python;
``SupTicketsTrainer`` imports transformers, so it is loaded on first access only."""

from __future__ import annotations

from .arguments import SparsityArguments

__all__ = ["SparsityArguments", "SupTicketsTrainer"]


def __getattr__(name: str):
    if name == "SupTicketsTrainer":
        from .hf_trainer import SupTicketsTrainer

        return SupTicketsTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
