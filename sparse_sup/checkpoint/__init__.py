"""Saving tickets and final models: whole-tensor files and compact sharded checkpoints."""

from .files import atomic_torch_save, export_safetensors, load_verified, save_model_snapshot
from .sharded import (
    CheckpointError,
    LocalPiece,
    load_sharded,
    read_manifest,
    replicated_pieces,
    save_sharded,
    verify_sharded,
)

__all__ = [
    "CheckpointError",
    "LocalPiece",
    "atomic_torch_save",
    "export_safetensors",
    "load_sharded",
    "load_verified",
    "read_manifest",
    "replicated_pieces",
    "save_model_snapshot",
    "save_sharded",
    "verify_sharded",
]
