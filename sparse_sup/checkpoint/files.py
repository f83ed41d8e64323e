"""Atomic, verifiable files: write to a temporary name, fsync, rename; a SHA-256 of the payload is
stored beside it so a truncated or corrupt file is detected instead of half-loaded."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import torch


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: object, path: str | Path) -> str:
    """torch.save ``obj`` atomically; writes ``<path>.sha256`` and returns the digest."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    _atomic_write_bytes(path, payload)
    _atomic_write_bytes(path.with_name(path.name + ".sha256"), digest.encode())
    return digest


def load_verified(path: str | Path, map_location: str | torch.device = "cpu") -> object:
    """Load a file written by ``atomic_torch_save``; raise if it does not match its digest."""
    path = Path(path)
    payload = path.read_bytes()
    digest_file = path.with_name(path.name + ".sha256")
    if not digest_file.exists():
        raise ValueError(f"{path}: no checksum file {digest_file.name}; refusing an unverifiable checkpoint")
    if hashlib.sha256(payload).hexdigest() != digest_file.read_text().strip():
        raise ValueError(f"{path} is corrupt or truncated (SHA-256 mismatch); re-create it")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)


def save_model_snapshot(path: str | Path, model_state: dict, masks: dict, meta: dict) -> str:
    """A ticket / superposed model: weights and buffers (BN state included), masks, metadata."""
    state = {k: v.detach().cpu().clone() for k, v in model_state.items()}
    return atomic_torch_save(
        {"model": state, "masks": {k: v.cpu().clone() for k, v in masks.items()}, "meta": meta}, path
    )


def export_safetensors(path: str | Path, model_state: dict, meta: dict) -> None:
    """Plain state_dict in safetensors (loadable with ``model.load_state_dict`` on a timm model
    built with the same arguments); masks are implied by the zeros and not needed to run it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model_state.items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, path)
