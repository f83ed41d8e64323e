"""Split a run's state into what depends on the world size and what does not, so a run checkpoint
written by W processes resumes at W' (one process, DDP, FSDP2).

Stateful objects (the engine, the mask history) keep their tensors keyed by parameter FQN, in the
backend's local placement (torch.ao.pruning's convention). ``split_state`` turns every such tensor
into a ``LocalPiece`` with that parameter's global ``Layout``; ``save_sharded`` writes them and any
world size reads its own runs back (``load_sharded``). Everything else — counters, results, RNG,
and buffers, which may differ between ranks (each tracks its own micro-batches) — stays in the
per-rank file; at another world size every rank takes rank 0's (DDP broadcasts rank 0's buffers at
every forward anyway)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..core.names import normalize_name
from .sharded import LocalPiece, load_sharded

if TYPE_CHECKING:
    from ..backends.base import Layout

PIECE = "sharded_piece"  # placeholder {PIECE: path} left where a piece was taken out (plain data)


def rank_file(rank: int) -> str:
    """The name of rank ``rank``'s file of the per-rank rest (run checkpoints, Trainer checkpoints)."""
    return f"rank{rank:05d}.pt"


def _placeholder(value: object) -> str | None:
    return value.get(PIECE) if isinstance(value, Mapping) and len(value) == 1 else None


def split_state(
    state: Mapping, layouts: Mapping[str, Layout], prefix: str = ""
) -> tuple[dict[str, LocalPiece], dict]:
    """(pieces keyed by their path in ``state``, the rest of ``state`` with placeholders).
    ``layouts``: the parameters' layouts only (a tensor under such a key is that parameter's piece)."""
    pieces: dict[str, LocalPiece] = {}
    rest = {}
    for key, value in state.items():
        path = f"{prefix}{key}"
        layout = layouts.get(key)
        if torch.is_tensor(value) and layout is not None:
            pieces[path] = LocalPiece(
                shape=layout.shape,
                offset=layout.offset,
                values=value.detach().reshape(-1),
                replicated=layout.replicated,
                replica=layout.replica,
            )
            rest[key] = {PIECE: path}
        elif isinstance(value, Mapping):
            inner_pieces, rest[key] = split_state(value, layouts, f"{path}/")
            pieces.update(inner_pieces)
        else:
            rest[key] = value
    return pieces, rest


def wanted_runs(rest: Mapping, layouts: Mapping[str, Layout], numels: Mapping[str, int]) -> dict:
    """path -> (global offset, numel) of this rank's run of every piece ``rest`` refers to, in the
    *current* placement (``numels``: local element count of each parameter)."""
    wanted = {}
    for key, value in rest.items():
        if (path := _placeholder(value)) is not None:
            wanted[path] = (layouts[key].offset, numels[key])
        elif isinstance(value, Mapping):
            wanted.update(wanted_runs(value, layouts, numels))
    return wanted


def join_state(rest: Mapping, loaded: Mapping[str, tuple], shapes: Mapping[str, torch.Size]) -> dict:
    """``rest`` with every placeholder replaced by its loaded run, shaped like this rank's local
    piece of that parameter (``shapes``)."""
    out = {}
    for key, value in rest.items():
        if (path := _placeholder(value)) is not None:
            out[key] = loaded[path][0].view(shapes[key])
        elif isinstance(value, Mapping):
            out[key] = join_state(value, loaded, shapes)
        else:
            out[key] = value
    return out


def parameter_layouts(backend) -> dict[str, Layout]:
    """The layouts of the backend's parameters (buffers excluded: see the module doc)."""
    names = {normalize_name(n) for n, _ in backend.module.named_parameters()}
    return {name: layout for name, layout in backend.layouts().items() if name in names}


def read_state(rest: Mapping, directory: Path | None, backend) -> dict:
    """``rest`` (a per-rank state file) with its pieces read from the sharded ``directory`` in this
    rank's current placement (not collective); a checkpoint without one is returned as it is."""
    if directory is None:
        return dict(rest)
    layouts = parameter_layouts(backend)
    local = backend.state_tensors()
    wanted = wanted_runs(rest, layouts, {name: local[name].numel() for name in layouts})
    loaded = load_sharded(directory, wanted)
    return join_state(rest, loaded, {name: local[name].shape for name in layouts})
