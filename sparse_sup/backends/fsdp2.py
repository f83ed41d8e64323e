"""FSDP2 (``fully_shard``): parameters are DTensors sharded on dim 0; each rank holds a contiguous
run of rows of every weight. Targets, masks, gradient scores and the superposition side chain are
the *local shards* (plain tensors aliasing FSDP's storage), so a topology update or a re-prune
costs O(local shard) memory; selection all-reduces count histograms over the *shard* group.

Placement contract: ``Target.param`` = ``p.to_local()`` (rows [r0, r1) of the full weight),
``offset`` = r0 * row_numel from DTensor's own layout; gradients and optimizer state are the local
shards of their DTensors. BN buffers are replicated, so ``sync_buffers`` averages them over ranks.

Meshes: a 1-D mesh (FSDP: placements ``(Shard(0),)``) or a 2-D one (HSDP: ``(Replicate(),
Shard(0))``, every shard held by each replica). The shard group is the mesh dim of the ``Shard``
placement, read from the parameters' own DTensor mesh; the data-parallel group is every rank.

Staleness: after a forward that no backward follows (evaluation, BN recalibration) FSDP2 leaves the
root module unsharded (the root's ``reshard_after_forward`` is False), and the next forward would
use that copy instead of the local shards the engine edits in place. The backend reshards after
every such forward and whenever the engine edits the shards (``refresh_model_weights``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..config.errors import ConfigError
from ..core.collectives import Collectives
from ..core.names import normalize_name
from ..core.targets import Target
from .base import Layout, StepOptions, TorchOptimizerStep, TorchStepMethods
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


def fsdp2_replica_index(t: torch.Tensor) -> int:
    """This rank's coordinate on the replicate mesh dim (HSDP), 0 without one: the ranks with the
    same shard coordinate hold the same local shard, and only replica 0 writes it."""
    if not isinstance(t, DTensor):
        return 0
    coordinate = t.device_mesh.get_coordinate()
    return sum(c for c, pl in zip(coordinate, t.placements) if isinstance(pl, Replicate))


def fsdp2_reshard(model: torch.nn.Module) -> None:
    """Free the unsharded parameters of every FSDP module of ``model`` (local, no collective), so
    the next forward all-gathers the current local shards. A no-op where already sharded."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _reshard_after_inference(module: torch.nn.Module, inputs, output) -> None:
    """Forward hook on the root, run after FSDP's own: a forward in eval mode or without grad
    (evaluation, BN recalibration) is resharded at once. A backward after an eval-mode forward
    with grad still works: FSDP's pre-backward hook all-gathers again, as for non-root modules."""
    if not (torch.is_grad_enabled() and module.training):
        fsdp2_reshard(module)


def fsdp2_mesh_groups(model: torch.nn.Module) -> tuple[dist.ProcessGroup, dist.ProcessGroup | None]:
    """(shard group, data-parallel group) of a ``fully_shard``-ed model, read from its parameters'
    DTensor mesh and placements. The shard group spans ranks holding different rows of the same
    tensors (the mesh dim of ``Shard(0)``); the data-parallel group spans every rank (replicas
    and shards alike: each sees different data), i.e. the default group. Raises ``ValueError``
    for what the selection cannot handle: unsharded parameters, several meshes, a shard on
    another dim than 0, tensor parallelism (two sharded mesh dims) or a mesh not spanning all ranks."""
    meshes = {}
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor):
            raise ValueError(
                f"FSDP2: parameter {name!r} is not a DTensor (not managed by fully_shard); apply "
                "fully_shard to the root module too (fsdp2_shard_model does) so every weight is sharded"
            )
        meshes.setdefault((p.device_mesh, tuple(p.placements)), name)
    if len(meshes) != 1:
        described = "; ".join(f"{n!r} on {m} with {pl}" for (m, pl), n in meshes.items())
        raise ValueError(
            f"FSDP2: parameters are sharded over different meshes or placements ({described}); "
            "the selection needs one shard group: shard every module with the same mesh"
        )
    ((mesh, placements),) = meshes
    shard_dims = [i for i, pl in enumerate(placements) if not isinstance(pl, Replicate)]
    ok = (
        mesh.ndim in (1, 2)
        and len(shard_dims) == 1
        and type(placements[shard_dims[0]]) is Shard
        and placements[shard_dims[0]].dim == 0
    )
    if not ok:
        raise ValueError(
            f"FSDP2: placements {placements} on a {mesh.ndim}-D mesh {mesh.mesh_dim_names} are not "
            "supported: sparse_sup needs parameters sharded on dim 0 over exactly one mesh dim "
            "((Shard(0),) for FSDP or (Replicate(), Shard(0)) for HSDP); use fully_shard's default "
            "shard_placement_fn and no tensor parallelism"
        )
    if mesh.size() != dist.get_world_size():
        raise ValueError(
            f"FSDP2: the mesh {tuple(mesh.shape)} spans {mesh.size()} of {dist.get_world_size()} ranks; "
            "sparse_sup needs it to span every rank (evaluation and BN statistics pool over all of them)"
        )
    return mesh.get_group(shard_dims[0]), None


def fsdp2_mixed_precision(param_dtype: torch.dtype | None):
    """(policy for blocks and the root, policy for BatchNorm units) for ``param_dtype`` (None: fp32,
    no policy). Gradients are reduced in float32 (gloo has no bf16 reduce-scatter on CPU; on GPUs it
    is the accurate choice). BatchNorm keeps float32 weights next to its float32 running statistics:
    its inputs are cast to float32 and its outputs back to ``param_dtype`` (FSDP1's default)."""
    if param_dtype is None or param_dtype == torch.float32:
        return None, None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    batchnorm = MixedPrecisionPolicy(
        param_dtype=torch.float32,
        reduce_dtype=torch.float32,
        output_dtype=param_dtype,
        cast_forward_inputs=True,
    )
    return policy, batchnorm


def fsdp2_shard_model(
    model: torch.nn.Module,
    mesh=None,
    mp_policy=None,
    param_dtype: torch.dtype | None = None,
    compile_blocks: bool = False,
) -> torch.nn.Module:
    """Apply ``fully_shard`` per residual/transformer block, then to the root (torchtitan-style); the
    project's own sharding on CPU and GPUs alike (no reliance on Accelerate's wrap policy: timm
    models have no ``_no_split_modules``). ``param_dtype`` (bf16/fp16): compute in that dtype through
    ``fsdp2_mixed_precision``, every BatchNorm in its own float32 unit (sharded first: its weights
    leave the block's unit). ``mp_policy``: one policy for every unit instead (no BatchNorm units).
    ``compile_blocks``: each block ``torch.compile``-d before it is sharded (torchtitan's order:
    FSDP's hooks stay outside the compiled graph); refused with BatchNorm units (their FSDP hooks
    would sit inside the compiled block)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": mesh} if mesh is not None else {}
    batchnorm_policy = None
    if mp_policy is None:
        mp_policy, batchnorm_policy = fsdp2_mixed_precision(param_dtype)
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    batchnorms = (
        [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if batchnorm_policy is not None
        else []
    )
    if compile_blocks and batchnorms:
        raise ConfigError(
            f"train.compile under FSDP2 with {param_dtype} mixed precision and BatchNorm "
            f"({len(batchnorms)} layers): BatchNorm runs in float32 units of its own, whose FSDP hooks "
            "would sit inside the compiled blocks. Use train.compile=false, precision fp32, or DDP "
            "(launch/accelerate/ddp-*.yaml), where the whole model is compiled after wrapping"
        )
    for bn in batchnorms:
        fully_shard(bn, **{**kwargs, "mp_policy": batchnorm_policy})
    # bottom-up: a block inside another block is sharded first
    blocks = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child).__name__ in BLOCK_CLASS_NAMES
    ]
    for parent, name, block in reversed(blocks):
        if compile_blocks:
            # static shapes: ResNet blocks share one forward's code at different sizes, and the
            # automatic dynamic recompile's backward fails in CPU inductor ("Cannot convert
            # expression to float"); one graph per block shape instead
            block = torch.compile(block, dynamic=False)
            parent.register_module(name, block)
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def fsdp2_describe(model: torch.nn.Module) -> str:
    """The FSDP units of ``model`` by kind and compute dtype, e.g. "5 units (bfloat16), 9 BatchNorm
    units (float32)" (logs and tests)."""
    from collections import Counter

    from torch.distributed.fsdp import FSDPModule

    units = Counter()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            dtype = module._get_fsdp_state()._mp_policy.param_dtype or torch.float32
            kind = "BatchNorm units" if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) else "units"
            units[(kind, str(dtype).removeprefix("torch."))] += 1
    return ", ".join(f"{n} {kind} ({dtype})" for (kind, dtype), n in sorted(units.items(), reverse=True))


def check_fsdp2_mixed_precision(model: torch.nn.Module, mixed_precision: str) -> None:
    """For a model sharded by Accelerate's FSDP2 plugin (the Trainer's path; the CLI shards with
    ``fsdp2_shard_model``, BatchNorm in float32 units, and needs no refusal): refuse mixed precision
    on a model with BatchNorm, before any step. FSDP2's
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


class FSDP2Backend(TorchStepMethods):
    """Local shards of a ``fully_shard``-ed model. ``shard`` sums over the shard group (the mesh
    dim of ``Shard(0)``: every rank under FSDP, one replica's ranks under HSDP), ``data_parallel``
    over every rank (see ``fsdp2_mesh_groups``)."""

    kind = "fsdp2"
    lockstep = True  # every forward all-gathers parameters
    input_dtype = None  # MixedPrecisionPolicy casts forward inputs itself

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer,
        target_names: list[str],
        options: StepOptions | None = None,
    ) -> None:
        self.model = self.module = model
        self.optimizer = unwrap_optimizer(optimizer)
        self.target_names = [normalize_name(n) for n in target_names]
        fsdp2_reshard(model)  # named_parameters() gives the DTensors only while sharded
        shard_group, data_parallel_group = fsdp2_mesh_groups(model)
        self.shard: Collectives = ProcessGroupCollectives(shard_group)
        self.data_parallel: Collectives = ProcessGroupCollectives(data_parallel_group)
        self._step = TorchOptimizerStep(self.optimizer, options)
        self._step.nonfinite_group = self.shard  # local gradient shards: one flag reduction per step
        if getattr(model, "_sparse_sup_reshard_hook", None) is None:  # once per model
            model._sparse_sup_reshard_hook = model.register_forward_hook(_reshard_after_inference)

    @property
    def casts_forward(self) -> bool:
        """Whether the root's ``MixedPrecisionPolicy`` computes in a low dtype (the loop then runs
        no autocast on top of it)."""
        state = self.model._get_fsdp_state()
        return getattr(state._mp_policy, "param_dtype", None) not in (None, torch.float32)

    def _parameters(self) -> dict[str, torch.nn.Parameter]:
        """The sharded parameters (DTensors) by name; resharding first, since an unsharded FSDP
        module registers its plain unsharded tensors instead (local, no collective)."""
        fsdp2_reshard(self.model)
        return {normalize_name(n): p for n, p in self.model.named_parameters()}

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
        params = self._parameters()
        missing = [n for n in self.target_names if n not in params]
        if missing:
            raise KeyError(f"target parameters not found in the sharded model: {missing[:5]}")
        return [self._target(n, params[n]) for n in self.target_names]

    def refresh_model_weights(self) -> None:
        """Targets alias the local shards, but an unsharded copy may outlive a forward (see the
        module doc): reshard every FSDP module, so the next forward all-gathers the edited shards.
        Local, no collective."""
        fsdp2_reshard(self.model)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            normalize_name(n): _local(t).detach() for n, t in self.model.state_dict(keep_vars=True).items()
        }

    def layouts(self) -> dict[str, Layout]:
        """Parameters: this rank's run of the full tensor; buffers: whole (``replicated``). Under
        HSDP every replica holds the same run of a parameter; ``replica`` (its coordinate on the
        replicate dim) lets replica 0 alone write it."""
        return {
            normalize_name(n): Layout(
                tuple(t.shape), fsdp2_flat_offset(t), not isinstance(t, DTensor), fsdp2_replica_index(t)
            )
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

    def save_training_state(self, directory: Path) -> None:
        dcp_save(self.model, self.optimizer, directory)

    def load_training_state(self, directory: Path) -> None:
        dcp_load(self.model, self.optimizer, directory)
        fsdp2_reshard(self.model)  # the loaded shards, not an older unsharded copy, feed the next forward

    def full_state(self) -> dict[str, torch.Tensor]:
        """Whole tensors of the model state (collective: all-gathers every parameter over the
        shard group)."""
        return {
            normalize_name(k): v.full_tensor() if isinstance(v, DTensor) else v
            for k, v in self.model.state_dict().items()
        }

    def full_masks(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole masks (collective: all-gathers each over the shard group; under HSDP every
        replica holds the same shards): each local mask is laid out like its parameter's shard."""
        params = self._parameters()
        full = {}
        for name, mask in masks.items():
            p = params[name]
            as_dtensor = DTensor.from_local(
                mask.to(torch.uint8), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
            )
            full[name] = as_dtensor.full_tensor().bool()
        return full
