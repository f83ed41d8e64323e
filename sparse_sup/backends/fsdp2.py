"""FSDP2 (``fully_shard``): parameters are DTensors sharded on dim 0; each rank holds a contiguous
run of rows of every weight. Targets, masks, gradient scores and the superposition side chain are
the *local shards* (plain tensors aliasing FSDP's storage), so a topology update or a re-prune
costs O(local shard) memory; selection all-reduces count histograms over the FSDP mesh.

Placement contract: ``Target.param`` = ``p.to_local()`` (rows [r0, r1) of the full weight),
``offset`` = r0 * row_numel from DTensor's own layout; gradients and optimizer state are the local
shards of their DTensors. BN buffers are replicated, so ``sync_buffers`` averages them over ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..config.errors import ConfigError
from ..core.collectives import Collectives
from ..core.names import normalize_name
from ..core.targets import Target
from .base import Layout, StepOptions, TorchOptimizerStep
from .collectives import ProcessGroupCollectives
from .dcp import dcp_load, dcp_save
from .local import unwrap_optimizer

BLOCK_CLASS_NAMES = ("BasicBlock", "Bottleneck", "Block", "ResidualBlock")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def fsdp2_flat_offset(p: torch.Tensor) -> int:
    """Global row-major flat index of the first element of this rank's shard of ``p``."""
    if not isinstance(p, DTensor):
        return 0
    _, global_offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    strides = torch.empty(p.shape, device="meta").stride()
    return sum(o * s for o, s in zip(global_offset, strides))


def fsdp2_shard_model(model: torch.nn.Module, mesh=None, mp_policy=None) -> torch.nn.Module:
    """Apply ``fully_shard`` per residual/transformer block, then to the root (torchtitan-style)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": mesh} if mesh is not None else {}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in BLOCK_CLASS_NAMES:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def check_fsdp2_mixed_precision(model: torch.nn.Module, mixed_precision: str) -> None:
    """Refuse FSDP2 mixed precision on a model with BatchNorm, before any step. FSDP2's
    ``MixedPrecisionPolicy`` casts every parameter, BatchNorm's affine ones too, to the low dtype
    while BatchNorm's running statistics stay float32, and cuDNN's BatchNorm backward rejects the
    mix (seen on an H200: "Expected running_mean to have type BFloat16 but got Float")."""
    if mixed_precision in (None, "no", "fp32"):
        return
    bn = [n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if bn:
        raise ConfigError(
            f"FSDP2 with {mixed_precision} mixed precision cannot train a model with BatchNorm "
            f"({len(bn)} layers, e.g. {bn[0]!r}): FSDP2 casts BatchNorm's weights to {mixed_precision} "
            "while its running statistics stay float32, which cuDNN rejects. Use DDP "
            "(launch/accelerate/ddp-gpu.yaml; ResNets fit one GPU each), or mixed_precision: 'no' "
            "in the Accelerate config; models with LayerNorm only (ViTs) are fine under FSDP2 bf16"
        )


class FSDP2Backend:
    """Local shards of a ``fully_shard``-ed model. ``shard`` and ``data_parallel`` are the same
    group here (pure FSDP: every rank holds different rows and sees different data)."""

    kind = "fsdp2"
    lockstep = True  # every forward all-gathers parameters
    input_dtype = None  # MixedPrecisionPolicy casts forward inputs itself

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer,
        target_names: list[str],
        group: dist.ProcessGroup | None = None,
        options: StepOptions | None = None,
    ) -> None:
        self.model = self.module = model
        self.optimizer = unwrap_optimizer(optimizer)
        self.target_names = [normalize_name(n) for n in target_names]
        self.shard: Collectives = ProcessGroupCollectives(group)
        self.data_parallel: Collectives = self.shard
        self._step = TorchOptimizerStep(self.optimizer, options)

    def _target(self, name: str, p: torch.nn.Parameter) -> Target:
        def grad() -> torch.Tensor | None:
            return None if p.grad is None else _local(p.grad)

        def states() -> list[torch.Tensor]:
            state = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
            return [_local(s) for s in state.values() if torch.is_tensor(s) and s.shape == p.shape]

        return Target(
            name=name,
            param=_local(p).detach(),
            shape=tuple(p.shape),
            offset=fsdp2_flat_offset(p),
            grad=grad,
            optimizer_states=states,
        )

    def targets(self) -> list[Target]:
        params = {normalize_name(n): p for n, p in self.model.named_parameters()}
        missing = [n for n in self.target_names if n not in params]
        if missing:
            raise KeyError(f"target parameters not found in the sharded model: {missing[:5]}")
        return [self._target(n, params[n]) for n in self.target_names]

    def refresh_model_weights(self) -> None:
        """Targets alias the model's own weights: nothing to propagate."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            normalize_name(n): _local(t).detach() for n, t in self.model.state_dict(keep_vars=True).items()
        }

    def layouts(self) -> dict[str, Layout]:
        return {
            normalize_name(n): Layout(tuple(t.shape), fsdp2_flat_offset(t), not isinstance(t, DTensor))
            for n, t in self.model.state_dict(keep_vars=True).items()
        }

    # ---- the step ------------------------------------------------------------------------------
    def attach(self, engine) -> None:
        self._step.engine = engine

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Inside accumulation FSDP2 keeps unsharded gradients and reduce-scatters on the last one."""
        self.model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def backward(self, loss: torch.Tensor, accum_steps: int) -> None:
        self._step.backward(loss, accum_steps)

    def optimizer_step(self) -> bool:
        return self._step.step()

    def save_training_state(self, directory: Path) -> None:
        dcp_save(self.model, self.optimizer, directory)

    def load_training_state(self, directory: Path) -> None:
        dcp_load(self.model, self.optimizer, directory)

    def full_state(self) -> dict[str, torch.Tensor]:
        """Whole tensors of the model state (collective: all-gathers every parameter)."""
        return {
            normalize_name(k): v.full_tensor() if isinstance(v, DTensor) else v
            for k, v in self.model.state_dict().items()
        }

    def full_masks(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole masks (collective): each local mask is laid out like its parameter's shard."""
        params = {normalize_name(n): p for n, p in self.model.named_parameters()}
        full = {}
        for name, mask in masks.items():
            p = params[name]
            as_dtensor = DTensor.from_local(
                mask.to(torch.uint8), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
            )
            full[name] = as_dtensor.full_tensor().bool()
        return full
