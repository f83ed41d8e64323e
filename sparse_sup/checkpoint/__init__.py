"""Saving tickets and final models (whole-tensor format; sharded checkpoints come later)."""

from .files import atomic_torch_save, export_safetensors, load_verified, save_model_snapshot

__all__ = ["atomic_torch_save", "export_safetensors", "load_verified", "save_model_snapshot"]
