"""Tickets, P and superposed models as compact sharded checkpoints (``sharded.py``), written and
read through a backend's local pieces and layouts, so a ticket saved by N ranks under one engine
can be loaded by M ranks under another."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .sharded import CheckpointError, LocalPiece, load_sharded, read_manifest, save_sharded


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_model_checkpoint(
    path: Path, backend, masks: dict[str, torch.Tensor] | None, meta: dict, replace: bool = False
) -> None:
    """Collective. Every state tensor's local piece; target weights as active values + bit mask
    (``masks`` in the backend's local placement; None or missing names: stored dense).
    ``replace``: an existing checkpoint at ``path`` is deleted first (a replay after a resume)."""
    path = Path(path)
    layouts = backend.layouts()
    masks = masks or {}
    pieces = {}
    for name, tensor in backend.state_tensors().items():
        layout = layouts[name]
        mask = masks.get(name)
        pieces[name] = LocalPiece(
            shape=layout.shape,
            offset=layout.offset,
            values=tensor,
            mask=None if mask is None else mask.reshape(-1),
            replicated=layout.replicated,
            replica=layout.replica,
        )
    if replace and path.exists():
        _barrier()  # every rank has seen it before rank 0 removes it
        if _rank() == 0:
            shutil.rmtree(path)
        _barrier()
    save_sharded(path, pieces, meta)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def load_model_checkpoint(path: Path, backend, target_names: list[str]) -> dict[str, torch.Tensor]:
    """Not collective. Copy the checkpoint's tensors into the backend's local pieces in place and
    return the masks of ``target_names`` in local placement (nonzero values where none was stored)."""
    layouts = backend.layouts()
    local = backend.state_tensors()
    wanted = {name: (layouts[name].offset, t.numel()) for name, t in local.items()}
    manifest = read_manifest(path)
    stored = manifest.get("tensors", {})
    for name, layout in layouts.items():
        shape = tuple(stored.get(name, {}).get("shape", layout.shape))
        if name in stored and shape != layout.shape:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {list(shape)} there and {list(layout.shape)} in this "
                "model; merge tickets of the model and config they were trained with"
            )
    loaded = load_sharded(path, wanted)
    masks = {}
    with torch.no_grad():
        for name, tensor in local.items():
            values, mask = loaded[name]
            # values are the row-major flat run; copy_ through the logical shape writes the real
            # storage of any layout (reshape(-1) of a channels_last tensor would be a copy)
            tensor.copy_(values.to(tensor.dtype).view(tensor.shape))
            if name in target_names:
                keep = mask if mask is not None else values != 0
                masks[name] = keep.view(tensor.shape)
    backend.refresh_model_weights()
    return masks
