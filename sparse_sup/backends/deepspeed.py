"""DeepSpeed ZeRO 1/2/3: masks live on the fp32 master partitions, where the real update lands.

DeepSpeed keeps a separate fp32 master copy, partitioned over ranks, and copies it into the model
weights after each step, so a mask applied to the module weights alone is overwritten (DeepSpeed
issues #2424, #3959). Here every target is *this rank's fragment of the fp32 master* (a contiguous
run of the weight's row-major flat elements); its gradient and optimizer state are the matching
fragments. The optimizer step is wrapped: before it, the sparse engine reads RigL scores from the
reduced gradient fragments and zeroes the masked ones; after it, masks are enforced and the step
counted only if DeepSpeed applied it (fp16 overflow skips count for nothing). This works whether
the step is called by ``engine.step()`` or inside ``accelerator.backward()``.

What differs by stage is where one parameter's pieces live: ``ZeroBackend`` holds everything
shared and builds targets / state tensors / layouts from per-parameter hooks that ``Zero12Backend``
(ZeRO-1/2) and ``Zero3Backend`` (ZeRO-3) implement; ``build_backend`` picks one by
``ZERO_BACKENDS[engine.zero_optimization_stage()]``.

Private DeepSpeed APIs used (pinned by tests/distributed): ZeRO-1/2 (``Zero12Backend``)
``param._hp_mapping`` (``lp_fragment_address``, ``hp_fragment``, ``get_hp_fragment``,
``get_lp_grad_fragment``, ``optim_fragment``, ``get_optim_state_keys``),
``param._index_in_param_group``, ``optimizer.update_lp_params()``; ZeRO-3 (``Zero3Backend``)
``param.ds_tensor``, ``ds_numel``, ``ds_shape``, ``ds_process_group``,
``optimizer._get_fp32_grad_state_partition``; both, the ZeRO optimizer's ``overflow`` flag. Nothing
here gathers a whole parameter except ``full_state`` / ``full_masks`` (the consolidated export and
tests).

Under bf16/fp16 DeepSpeed casts the module's parameters (not its buffers, unless
``data_types.buffer_dtype`` says so) and runs no autocast: ``input_dtype`` tells the loop to cast
inputs. The fp32 masters, optimizer state and masks stay in fp32; the gradient fragments the
optimizer steps from are in the gradient-accumulation dtype (bf16 unless configured).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

from ..core.collectives import Collectives
from ..core.names import normalize_name
from ..core.targets import Target
from .base import Layout, lr_ratios, set_lrs
from .collectives import ProcessGroupCollectives
from .deepspeed_config import refuse_offload


def deepspeed_input_dtype(ds_engine) -> torch.dtype | None:
    """The dtype of the module's parameters under DeepSpeed's bf16/fp16 modes, None in fp32: DeepSpeed
    casts the parameters itself and runs no autocast, so fp32 inputs fail at the first layer
    ("Input type (torch.FloatTensor) and weight type (CPUBFloat16Type) should be the same")."""
    if ds_engine.bfloat16_enabled():
        return torch.bfloat16
    if ds_engine.fp16_enabled():
        return torch.float16
    return None


class ZeroBackend:
    """Targets over a ``DeepSpeedEngine``'s fp32 master fragments: what every ZeRO stage shares
    (the step wrapper, backward, checkpoints, whole-tensor export, and targets / state tensors /
    layouts built from the per-parameter hooks). A subclass says where one parameter's pieces live:
    ``_fragment`` (the placement: this rank's contiguous run of the weight's row-major flat
    elements, as a global offset and an fp32 master view), ``_grad``, ``_states``, ``_shape`` and
    ``refresh_model_weights``. ``build_backend`` picks the subclass from the engine's ZeRO stage."""

    kind = "deepspeed"
    lockstep = False

    def __init__(self, ds_engine, target_names: list[str]) -> None:
        self.ds_engine = self.model = ds_engine
        self.optimizer = ds_engine.optimizer  # the ZeRO optimizer
        self.input_dtype = deepspeed_input_dtype(ds_engine)
        offload = {
            "offload_optimizer": ds_engine.zero_offload_optimizer(),
            "offload_param": ds_engine.zero_offload_param(),
        }
        refuse_offload({key: getattr(section, "device", None) for key, section in offload.items()})
        self.module = ds_engine.module
        self.target_names = [normalize_name(n) for n in target_names]
        self.shard: Collectives = ProcessGroupCollectives()
        self.data_parallel: Collectives = self.shard
        self.params = {normalize_name(n): p for n, p in self.module.named_parameters()}
        missing = [n for n in self.target_names if n not in self.params]
        if missing:
            raise KeyError(f"target parameters not found in the DeepSpeed model: {missing[:5]}")

    # ---- fragments of one parameter (per stage) ----------------------------------------------
    def _fragment(self, p: torch.nn.Parameter) -> tuple[int, torch.Tensor]:
        """(global flat offset, fp32 master fragment view) of this rank's piece of ``p``; a rank
        holding none of its elements gets an empty fragment at an offset inside ``[0, numel]``."""
        raise NotImplementedError

    def _grad(self, p: torch.nn.Parameter, n: int) -> torch.Tensor | None:
        """A view of the reduced (averaged) gradient fragment the optimizer steps from, in the
        gradient-accumulation dtype (bf16/fp16 under those modes); valid inside the step, before
        DeepSpeed's own step runs. Writes (masking) land where the optimizer reads."""
        raise NotImplementedError

    def _states(self, p: torch.nn.Parameter, n: int) -> list[torch.Tensor]:
        """Optimizer-state fragments (views; empty before the first applied step)."""
        raise NotImplementedError

    def _shape(self, p: torch.nn.Parameter) -> tuple[int, ...]:
        """The whole parameter's shape (not the local piece's)."""
        raise NotImplementedError

    @torch.no_grad()
    def refresh_model_weights(self) -> None:
        """Copy the fp32 masters into the model weights after the masters changed outside a step
        (mask changes, superposition swaps). Collective under ZeRO-1/2 (all-gather)."""
        raise NotImplementedError

    # ---- targets and layouts, from the per-parameter hooks ------------------------------------
    def targets(self) -> list[Target]:
        targets = []
        for name in self.target_names:
            p = self.params[name]
            offset, master = self._fragment(p)
            n = master.numel()
            targets.append(
                Target(
                    name=name,
                    param=master,
                    shape=self._shape(p),
                    offset=offset,
                    grad=lambda p=p, n=n: self._grad(p, n),
                    optimizer_states=lambda p=p, n=n: self._states(p, n),
                )
            )
        return targets

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """fp32 master fragments of every parameter, then the module's buffers."""
        tensors = {name: self._fragment(p)[1] for name, p in self.params.items()}
        tensors.update({normalize_name(n): b for n, b in self.module.named_buffers()})
        return tensors

    def layouts(self) -> dict[str, Layout]:
        layouts = {}
        for name, p in self.params.items():
            layouts[name] = Layout(self._shape(p), self._fragment(p)[0], False)
        for name, b in self.module.named_buffers():
            layouts[normalize_name(name)] = Layout(tuple(b.shape), 0, True)
        return layouts

    # ---- step wrapper -------------------------------------------------------------------------
    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """DeepSpeed counts micro-batches itself (``gradient_accumulation_steps`` of its config)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, accum_steps: int) -> None:
        """DeepSpeed divides by its accumulation steps and steps only at the boundary. Called
        directly (not through ``accelerator.backward``, which would mark every micro-batch a
        boundary outside ``accelerator.accumulate``), so both launchers behave the same."""
        self.ds_engine.backward(loss)
        self.ds_engine.step()

    last_skip = None  # DeepSpeed decides overflow itself, on the host (its own read)

    def optimizer_step(self, defer: bool = False) -> bool:
        """The step already ran inside the last ``backward`` (with the sparse engine around it).
        ``defer`` changes nothing: DeepSpeed reads its overflow flag on the host itself."""
        return bool(self.ds_engine.was_step_applied())

    def resolve_skips(self) -> int:
        return 0

    def save_training_state(self, directory: Path) -> None:
        self.ds_engine.save_checkpoint(str(directory), tag="engine")

    def load_training_state(self, directory: Path) -> None:
        path, _ = self.ds_engine.load_checkpoint(str(directory), tag="engine")
        if path is None:
            raise ValueError(f"{directory}: DeepSpeed found no engine checkpoint to load")

    def attach(self, sparse_engine) -> None:
        self.wrap_optimizer_step(sparse_engine)

    def wrap_optimizer_step(self, sparse_engine) -> None:
        """Run the sparse engine around DeepSpeed's real optimizer step (also inside backward)."""
        zero = self.optimizer
        original = zero.step
        ratios = lr_ratios(zero.optimizer.param_groups)  # layer-wise decay etc. survive the schedule

        def step(*args, **kwargs):
            set_lrs(zero.optimizer.param_groups, sparse_engine.lr(), ratios)
            sparse_engine.before_optimizer_step()
            result = original(*args, **kwargs)
            skipped = bool(getattr(zero, "overflow", False))
            sparse_engine.after_optimizer_step(skipped=skipped)
            return result

        zero.step = step

    # ---- whole tensors for ticket files (collective) ----------------------------------------
    def full_state(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        state = {name: safe_get_full_fp32_param(p).detach().clone() for name, p in self.params.items()}
        state.update({normalize_name(n): b for n, b in self.module.named_buffers()})
        return state

    def full_masks(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pieces = {}
        for t in self.targets():
            pieces[t.name] = (t.offset, masks[t.name].reshape(-1).cpu())
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, pieces)
        full = {}
        for t in self.targets():
            mask = torch.zeros(t.numel, dtype=torch.bool)
            for rank_pieces in everyone:
                offset, piece = rank_pieces[t.name]
                mask[offset : offset + piece.numel()] = piece
            full[t.name] = mask.view(t.shape)
        return full


class Zero12Backend(ZeroBackend):
    """ZeRO-1/2: every rank holds whole (cast) model weights; the fp32 master, its gradient and
    optimizer state are partitioned, and ``param._hp_mapping`` says which run of ``p`` is here."""

    def _fragment(self, p: torch.nn.Parameter) -> tuple[int, torch.Tensor]:
        mapping = p._hp_mapping
        if mapping is None:  # this rank holds no element of p
            return 0, torch.empty(0, dtype=torch.float32, device=p.device)
        return mapping.lp_fragment_address.start, mapping.hp_fragment.detach().view(-1)

    def _grad(self, p: torch.nn.Parameter, n: int) -> torch.Tensor | None:
        if n == 0 or not p.requires_grad:
            return None
        mapping = p._hp_mapping
        grad = mapping.get_lp_grad_fragment(p._index_in_param_group).view(-1)
        if grad.numel() == p.numel() and n != p.numel():  # BF16_Optimizer keeps the whole grad
            grad = grad[mapping.lp_fragment_address.start : mapping.lp_fragment_address.start + n]
        return grad

    def _states(self, p: torch.nn.Parameter, n: int) -> list[torch.Tensor]:
        if n == 0:
            return []
        mapping = p._hp_mapping
        if not mapping.optim_fragment:
            return []
        return [mapping.get_hp_fragment(k).view(-1) for k in mapping.get_optim_state_keys()]

    def _shape(self, p: torch.nn.Parameter) -> tuple[int, ...]:
        return tuple(p.shape)

    @torch.no_grad()
    def refresh_model_weights(self) -> None:
        """Collective (all-gather): every rank rebuilds its whole model weights from the masters."""
        self.optimizer.update_lp_params()


class Zero3Backend(ZeroBackend):
    """ZeRO-3: the model weights are partitioned too (``param.ds_tensor``, ``ceil(numel / world)``
    elements a rank, the last ranks' tails padding); this rank's master run is the same one."""

    lockstep = True  # ZeRO-3 forwards all-gather parameters

    def _fragment(self, p: torch.nn.Parameter) -> tuple[int, torch.Tensor]:
        from deepspeed.utils import safe_get_local_fp32_param

        rank = dist.get_rank(group=p.ds_process_group)
        per_rank = p.ds_tensor.numel()  # ceil(numel / world): the last ranks' tails are padding
        # on 3+ ranks a small parameter can leave a rank only padding (10 elements on 8 ranks:
        # ranks 6 and 7 would start at 12 and 14); an empty run must still lie inside the tensor
        offset = min(rank * per_rank, p.ds_numel)
        n = min(per_rank, p.ds_numel - offset)
        return offset, safe_get_local_fp32_param(p).detach().view(-1)[:n]

    def _grad(self, p: torch.nn.Parameter, n: int) -> torch.Tensor | None:
        if n == 0 or not p.requires_grad:
            return None
        # not safe_get_local_grad: its ``.float()`` copies a bf16/fp16 partition, so zeroing the
        # result would leave the optimizer's gradient unmasked. This is the tensor it wraps: a view
        # of the partition buffer that ``step()`` flattens into the fp32 master's ``.grad`` (or,
        # with optimizer offload, of that ``.grad`` itself)
        grad, _ = self.optimizer._get_fp32_grad_state_partition(p, release_swap_buffers=True)
        return grad.view(-1)[:n]

    def _states(self, p: torch.nn.Parameter, n: int) -> list[torch.Tensor]:
        if n == 0:
            return []
        from deepspeed.utils import safe_get_local_optimizer_state

        inner = self.optimizer.optimizer
        # per-element states only: torch Adam's 0-dim "step" makes DeepSpeed's narrow() raise
        first = next((s for s in inner.state.values() if s), {})
        keys = [k for k, v in first.items() if torch.is_tensor(v) and v.dim() >= 1]
        out = []
        for key in keys:
            state = safe_get_local_optimizer_state(p, key)
            if torch.is_tensor(state) and state.dim() >= 1 and state.numel() >= n:
                out.append(state.view(-1)[:n])
        return out

    def _shape(self, p: torch.nn.Parameter) -> tuple[int, ...]:
        return tuple(p.ds_shape)  # ``p.shape`` is (0,) while p is partitioned

    @torch.no_grad()
    def refresh_model_weights(self) -> None:
        """Local: each rank copies its master run into its own weight partition."""
        for p in self.params.values():
            _, master = self._fragment(p)
            p.ds_tensor.view(-1)[: master.numel()].copy_(master)
        # a parameter still gathered by an earlier forward (within ZeRO-3's reuse distance, e.g.
        # an evaluation inside the step) would keep its stale full copy: release every one
        self.ds_engine.empty_partition_cache()


# ZeRO stage -> backend (stage 0 has no partitioned fp32 master to mask: build_backend refuses it)
ZERO_BACKENDS: dict[int, type[ZeroBackend]] = {1: Zero12Backend, 2: Zero12Backend, 3: Zero3Backend}
