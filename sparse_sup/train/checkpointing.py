"""Run checkpoints of the reference loop, the torchtitan way: one manager over named ``Stateful``
objects (``state_dict`` / ``load_state_dict``), saved and restored as one state in the
run-checkpoint format (``checkpoint.run_state``). Tensors keyed by parameter FQN (masks, the
superposition chain, the mask history) are written sharded with their global layout, so a run
written by W processes resumes at W' (``checkpoint.state_pieces``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import torch

from ..checkpoint.run_state import load_run_checkpoint, save_run_checkpoint
from ..checkpoint.state_pieces import parameter_layouts, read_state, split_state

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class ModuleBuffers:
    """This rank's module buffers as they are. BN statistics differ between ranks (each tracks its
    own micro-batches; DDP broadcasts rank 0's at the next forward, FSDP2 never does): they are
    saved per rank rather than averaged in place, so saving changes nothing the run computes next."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: buffer.detach().clone() for name, buffer in self.module.named_buffers()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, buffer in self.module.named_buffers():
                buffer.copy_(state[name])


class RngState:
    """The CPU generator, and the GPU's where the model is there (dropout / drop-path draw from it)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def state_dict(self) -> dict:
        return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if self.cuda else None}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if self.cuda and state["cuda"] is not None:
            torch.cuda.set_rng_state(state["cuda"])


class RunCheckpointer:
    """Saves and restores ``states`` (name -> Stateful, the engine's under ``"engine"``) with the
    backend's model and optimizer, at the steps ``checkpoint.*`` asks for."""

    def __init__(self, run_dir: Path, config, plan, backend, states: dict[str, Stateful], metrics) -> None:
        self.run_dir, self.config, self.plan = run_dir, config.checkpoint, plan
        self.backend, self.states, self.metrics = backend, states, metrics
        self.engine = states["engine"]

    def due(self, step: int) -> bool:
        """``checkpoint.every_steps``, or the end of phase 1 and of every cycle
        (``checkpoint.at_cycle_ends``)."""
        periodic = self.config.every_steps is not None and step % self.config.every_steps == 0
        event = step == self.plan.pre_steps or self.engine.phases.cycle_end(step) is not None
        return periodic or (self.config.at_cycle_ends and event)

    def save(self) -> Path:
        """Collective: model + optimizer (the engine's format), the sharded pieces and this rank's
        rest."""
        state = {name: stateful.state_dict() for name, stateful in self.states.items()}
        pieces, rest = split_state(state, parameter_layouts(self.backend))
        step = self.engine.step
        path = save_run_checkpoint(self.run_dir, step, self.backend, rest, self.config.keep_last, pieces)
        log.info("checkpoint written: %s", path)
        self.metrics.write(event="checkpoint", step=step, path=str(path))
        return path

    def load(self, path: Path) -> None:
        """Continue exactly where the checkpoint left off: bit-identical at the world size that
        wrote it; at another one (one process, DDP, FSDP2) the pieces are read in the new placement,
        and only float reduction order differs (BatchNorm models: also the per-rank batch
        statistics, which depend on the world size in any run; every rank takes rank 0's)."""
        rest, sharded = load_run_checkpoint(path, self.backend)
        self.engine.rebind()  # the engine's own load may have replaced tensors (DeepSpeed)
        state = read_state(rest, sharded, self.backend)
        for name, stateful in self.states.items():  # the engine first: the others follow its masks
            if state.get(name) is None:  # e.g. train.ema switched on for the resumed run
                log.warning("checkpoint %s holds no %r state: it starts afresh", path, name)
                continue
            stateful.load_state_dict(state[name])
        self.backend.refresh_model_weights()
        log.info("resumed from %s at step %d", path, self.engine.step)
