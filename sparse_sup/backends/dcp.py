"""Model and optimizer state through ``torch.distributed.checkpoint`` (DCP): one process, DDP and
FSDP2 alike. DCP writes each rank's shards (FSDP2) or de-duplicated replicas (DDP) and can load
them back at the same world size; ``get_state_dict`` strips wrapper prefixes."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every save and load without a process group that it assumes one process:
    that is the intent here, so the warning is dropped (and only that one)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def dcp_save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Collective when a process group is initialised."""
    import torch.distributed.checkpoint as dcp

    with _quiet_single_process():
        dcp.save(_state(model, optimizer), checkpoint_id=str(directory))


def dcp_load(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Load into ``model`` and ``optimizer`` in place (collective when a group is initialised)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, optimizer)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
