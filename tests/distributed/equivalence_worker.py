"""A short Sup-tickets run (topology updates, two cycles, superpositions) on a toy conv+BN net in
float64, as a single-process reference or under real DDP / FSDP2 process groups (gloo).

    torchrun --nproc_per_node=2 equivalence_worker.py --mode fsdp2 --method rigl --out r.pt
    torchrun --nproc_per_node=4 equivalence_worker.py --mode hsdp --method granet --out r.pt
    python equivalence_worker.py --mode reference --world 2 --method rigl --out ref.pt
    torchrun --nproc_per_node=2 equivalence_worker.py --mode zero3 --precision bf16 --out r.pt

The reference processes each rank's slice of every global batch separately (so BatchNorm sees the
same micro-batches) and sums the gradients / world size, exactly what DDP and FSDP2 compute.
Mode ``hsdp``: FSDP2 on a (replicate=W/2, shard=2) mesh. Sharded runs also evaluate at the end of
phase 1 and at each ticket without any save in between (a save's ``state_dict()`` reshards FSDP2
and would hide stale unsharded parameters).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sparse_sup.backends import build_backend  # noqa: E402
from sparse_sup.config import load_config, resolve_plan  # noqa: E402
from sparse_sup.core.collectives import LOCAL  # noqa: E402
from sparse_sup.data import GlobalBatchSampler  # noqa: E402
from sparse_sup.engine import EngineHooks, SupTicketsEngine  # noqa: E402
from sparse_sup.recalibration import recalibration_plan  # noqa: E402
from sparse_sup.tickets import Discard, recalibrate_batchnorm  # noqa: E402
from sparse_sup.train.evaluate import evaluate  # noqa: E402

NUM_TRAIN, NUM_TEST, BATCH, EVAL_BATCH, BN_BATCH = 48, 37, 12, 5, 8
TARGETS = ["stem.conv.weight", "body.conv.weight", "head.weight"]
EARLY_STEP = 2  # weights are also recorded here: before the first topology update (step 3)


class Block(nn.Module):  # the class name makes fsdp2_shard_model shard it separately
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class ToyNet(nn.Module):
    """Row counts 6, 10, 5: uneven shards at world 4 and an empty one (6 rows -> 2,2,2,0)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body, self.head = Block(3, 6), Block(6, 10), nn.Linear(10, 5)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


class PaddedToyNet(ToyNet):
    """ToyNet plus a 1-element parameter (PReLU): under ZeRO-3 on 3 ranks (and the 5-element head
    bias on 4) some rank holds only padding of it, at ``rank * ceil(n / W)`` past its end."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.PReLU()

    def forward(self, x):
        return self.head(self.act(self.body(self.stem(x)).mean((2, 3))))


MODELS = {"toy": ToyNet, "padded": PaddedToyNet}


class TensorData:
    """The minimal dataset interface of sparse_sup.data (in-memory, keyed batches)."""

    in_memory = True

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def get_batch(self, keys):
        idx = torch.tensor([k for _, k in keys])
        return self.x[idx], self.y[idx]


def make_data():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(NUM_TRAIN + NUM_TEST, 3, 6, 6, generator=g, dtype=torch.float64).to(
        torch.get_default_dtype()
    )
    y = torch.randint(0, 5, (NUM_TRAIN + NUM_TEST,), generator=g)
    return TensorData(x[:NUM_TRAIN], y[:NUM_TRAIN]), TensorData(x[NUM_TRAIN:], y[NUM_TRAIN:])


def make_config(method: str):
    return load_config(
        None,
        [
            f"--sparse.method={method}",
            "--sparse.density=0.3",
            "--sparse.update_interval=3",
            "--sparse.granet_initial_density=0.6",
            "--sparse.granet_prune_end_epoch=3",
            "--schedule.epochs=6",
            f"--schedule.batch_size={BATCH}",
            "--schedule.lr_milestones=[0.5]",
            "--tickets.num_cycles=2",
            "--tickets.cycles_fraction=0.25",
            "--tickets.reexplore_fraction=0.5",
            "--optim.lr=0.1",
            "--experiment.seed=7",
            "--sparse.check_ranks=true",
        ],
    )


class Recorder(EngineHooks):
    def __init__(self, run) -> None:
        self.run = run

    def on_phase1_end(self, engine):
        self.run.evaluate_between()  # P; the re-exploration then edits the shards

    def on_ticket(self, engine, index):
        self.run.evaluate_between()  # T_i; S_i is then swapped into the shards

    def on_topology_update(self, engine, kind, swapped):
        self.run.events.append((engine.step, kind, self.run.full_masks(engine.masks.masks)))

    def recalibrate_bn(self, engine):
        self.run.recalibrate()

    def on_superposed(self, engine, index):
        state = self.run.full_state()  # first: its state_dict() reshards FSDP2 (see the module doc)
        self.run.superposed.append({"accuracy": self.run.accuracy(), "state": state, "step": engine.step})


class ToyRun:
    def __init__(
        self,
        mode: str,
        method: str,
        world: int,
        dtype: torch.dtype = torch.float64,
        accum: int = 1,
        precision: str = "fp32",
        model: str = "toy",
        max_steps: int | None = None,
    ) -> None:
        torch.set_default_dtype(dtype)  # DeepSpeed keeps fp32 masters: its runs compare in float32
        self.mode, self.world, self.accum = mode, world, accum
        self.rank = int(os.environ.get("RANK", 0))
        self.train_data, self.test_data = make_data()
        torch.manual_seed(0)
        model = MODELS[model]()
        config = make_config(method)
        self.plan = resolve_plan(config, NUM_TRAIN)
        self.max_steps = min(max_steps or self.plan.total_steps, self.plan.total_steps)
        if mode == "reference":
            self.model, self.dp = model, LOCAL
            self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
            self.module = model
        else:
            from sparse_sup.backends.collectives import ProcessGroupCollectives

            self.dp = ProcessGroupCollectives()
            if mode == "ddp":
                self.model = nn.parallel.DistributedDataParallel(model)
                self.module = model
                self.optimizer = torch.optim.SGD(
                    self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4
                )
            elif mode.startswith("zero"):
                import deepspeed

                ds_config = {
                    "train_batch_size": BATCH,
                    "train_micro_batch_size_per_gpu": BATCH // (world * accum),
                    "gradient_accumulation_steps": accum,
                    "zero_allow_untested_optimizer": True,
                    "zero_optimization": {"stage": int(mode[-1]), "stage3_param_persistence_threshold": 0},
                    "steps_per_print": 10**9,
                    # bf16: DeepSpeed casts the parameters and keeps fp32 masters; it leaves buffers
                    # in fp32 unless told, and the CPU BatchNorm kernel rejects bf16 weights beside
                    # fp32 running statistics ("expected scalar type BFloat16 but found Float")
                    "bf16": {"enabled": precision.startswith("bf16")},
                    "data_types": {"buffer_dtype": "bf16"} if precision.startswith("bf16") else {},
                }
                if precision == "bf16-fp32-accum":  # ZeRO-1: DeepSpeed's BF16_Optimizer instead
                    ds_config["data_types"]["grad_accum_dtype"] = "fp32"
                optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
                self.model, self.optimizer, _, _ = deepspeed.initialize(
                    model=model, optimizer=optimizer, config=ds_config
                )
                self.module = self.model.module
                # masked elements found nonzero, summed over steps (this rank); "grad": where the
                # inner optimizer reads it, the others after every step
                self.masked_nonzero = dict.fromkeys(["grad", "master", "module", "state"], 0)
                self.checked_grads = 0
                self.watch_optimizer_reads(self.optimizer.optimizer)
            else:
                from torch.distributed.device_mesh import init_device_mesh

                from sparse_sup.backends.fsdp2 import fsdp2_shard_model

                mesh = None  # fsdp2: a 1-D mesh over all ranks; hsdp: shards replicated W/2 times
                if mode == "hsdp":
                    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("replicate", "shard"))
                self.model = self.module = fsdp2_shard_model(model, mesh=mesh)
                self.optimizer = torch.optim.SGD(
                    self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4
                )
        self.backend = build_backend(self.model, self.optimizer, TARGETS)  # the engine from the type
        self.input_dtype = self.backend.input_dtype  # the loop casts inputs to it (DeepSpeed bf16)
        self.events, self.superposed, self.checked_steps = [], [], 0
        self.engine = SupTicketsEngine.from_config(config, self.plan, self.backend, Recorder(self))

    def full_masks(self, masks):
        return {k: v.clone() for k, v in self.backend.full_masks(masks).items()}

    def full_state(self):
        return {k: v.detach().clone() for k, v in self.backend.full_state().items()}

    def accuracy(self):
        if self.mode != "reference":
            self.check_buffers_identical()
        return evaluate(
            self.module,
            self.test_data,
            EVAL_BATCH,
            self.dp,
            torch.device("cpu"),
            lockstep=self.mode in ("fsdp2", "hsdp", "zero3"),
        )

    def evaluate_between(self):
        """FSDP2 only: an evaluation forward between training steps, with no save after it."""
        if self.mode in ("fsdp2", "hsdp"):
            result = evaluate(
                self.module, self.test_data, EVAL_BATCH, self.dp, torch.device("cpu"), lockstep=True
            )
            assert result["count"] == NUM_TEST

    def watch_optimizer_reads(self, inner: torch.optim.Optimizer) -> None:
        """Count masked gradient elements that are nonzero where DeepSpeed's inner (torch) optimizer
        reads them: the ``.grad`` of its flat fp32 partitions, at the moment of its ``step()``. Each
        target's fp32 master fragment is a view into one of these flat partitions."""
        original = inner.step

        def step(*args, **kwargs):
            for group in inner.param_groups:
                for flat in group["params"]:
                    if flat.grad is not None:
                        self.count_masked_grads(flat)
            return original(*args, **kwargs)

        inner.step = step

    def count_masked_grads(self, flat: torch.Tensor) -> None:
        for t in self.engine.targets:
            n = t.param.numel()
            if n == 0 or t.param.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
                continue
            start = t.param.storage_offset() - flat.storage_offset()
            grad = flat.grad.reshape(-1)[start : start + n]
            keep = self.engine.masks.masks[t.name].reshape(-1)
            self.masked_nonzero["grad"] += int((grad[~keep] != 0).sum())
            self.checked_grads += 1

    def check_deepspeed_masks(self):
        """After every step: count masked positions that are nonzero in the fp32 master fragment,
        in this rank's piece of the (possibly bf16) model weights and in every optimizer-state
        fragment; ``masked_nonzero_totals`` asserts the counts are zero at the end."""
        from sparse_sup.backends.deepspeed import Zero3Backend

        for t in self.engine.targets:
            keep = self.engine.masks.masks[t.name].reshape(-1)
            p = self.backend.params[t.name]
            n = t.param.numel()
            if isinstance(self.backend, Zero3Backend):
                model_piece = p.ds_tensor.view(-1)[:n]
            else:
                model_piece = p.data.view(-1)[t.offset : t.offset + n]
            pieces = [("master", t.param), ("module", model_piece)]
            pieces += [("state", s) for s in t.optimizer_states()]
            for kind, tensor in pieces:
                self.masked_nonzero[kind] += int((tensor.reshape(-1)[~keep] != 0).sum())
        self.checked_steps += 1

    def masked_nonzero_totals(self) -> dict[str, int]:
        """The counts of ``check_deepspeed_masks`` and the inner-step gradient check, summed over
        ranks (collective)."""
        import torch.distributed as dist

        counts = torch.tensor(list(self.masked_nonzero.values()) + [self.checked_grads], dtype=torch.int64)
        dist.all_reduce(counts)
        totals = dict(zip([*self.masked_nonzero, "checked_grads"], counts.tolist()))
        return totals

    def check_buffers_identical(self):
        """Before every evaluation the loop syncs BN buffers; they must then match on all ranks."""
        import torch.distributed as dist

        from sparse_sup.backends.buffers import sync_buffers

        sync_buffers(self.module, self.dp)
        mine = [b.clone() for b in self.module.buffers()]
        everyone = [None] * self.dp.world_size
        dist.all_gather_object(everyone, mine)
        for other in everyone:
            assert all(torch.equal(a, b) for a, b in zip(mine, other)), "BN buffers differ across ranks"

    def recalibrate(self):
        """The front ends' plan (``sparse_sup.recalibration``): batch j of a seeded order goes to rank
        j mod W; lockstep padding under FSDP2 / ZeRO-3."""
        lockstep = self.mode in ("fsdp2", "hsdp", "zero3")
        plan = recalibration_plan(
            NUM_TRAIN, BN_BATCH, None, seed=0, counter=0, collectives=self.dp, lockstep=lockstep
        )

        def batches():
            for indices, discard in plan.rounds:
                x = self.train_data.x[indices].to(dtype=self.input_dtype)
                yield Discard(x) if discard else x

        recalibrate_batchnorm(self.module, batches(), self.dp, forward=self.model)

    def recalibrate_and_evaluate(self):
        """No training: BN recalibration and evaluation of the initial masked model."""
        self.engine.init_masks()
        self.recalibrate()
        return {"accuracy": self.accuracy(), "state": self.full_state(), "world": self.world}

    def train(self):
        """Every optimizer step through the backend's own step protocol (gradient sync, backward,
        optimizer step: the training loop's code path): the reference processes all
        ``world * accum`` micro-batches of a global batch, rank r its slices ``r * accum + a``."""
        self.engine.init_masks()
        self.events.append((0, "init", self.full_masks(self.engine.masks.masks)))
        sampler = GlobalBatchSampler(NUM_TRAIN, BATCH, 1, 0, 1, seed=3)
        parts = self.world * self.accum
        micro = BATCH // parts
        slices = (
            range(parts)
            if self.mode == "reference"
            else range(self.rank * self.accum, (self.rank + 1) * self.accum)
        )
        backend, early = self.backend, None
        while self.engine.step < self.max_steps:
            epoch, step = divmod(self.engine.step, self.plan.steps_per_epoch)
            batch = sampler.global_batch(epoch, step)
            for i, s in enumerate(slices):
                idx = torch.tensor(batch[s * micro : (s + 1) * micro])
                with backend.gradient_sync(i == len(slices) - 1):
                    x = self.train_data.x[idx].to(dtype=self.input_dtype)
                    logits = backend.model(x).to(self.train_data.x.dtype)  # bf16 logits: loss in fp32
                    loss = F.cross_entropy(logits, self.train_data.y[idx])
                    backend.backward(loss, len(slices))
            assert backend.optimizer_step()
            if self.engine.step == EARLY_STEP:
                early = self.full_state()
            if self.mode.startswith("zero"):
                self.check_deepspeed_masks()
        return {
            "events": self.events,
            "superposed": self.superposed,
            "early": early,
            "final": self.full_state(),
            "final_masks": self.full_masks(self.engine.masks.masks),
            "step": self.engine.step,
            "world": self.world,
            "checked_steps": self.checked_steps,
            "masked_nonzero": self.masked_nonzero_totals() if self.mode.startswith("zero") else None,
            "input_dtype": self.input_dtype,
            "optimizer": type(self.optimizer).__name__,
            "deepspeed_global_steps": getattr(self.model, "global_steps", None),
        }


def check_fsdp2_refusals(mesh) -> None:
    """HSDP mode: FSDP2Backend refuses, with a ValueError naming the fix, what its selection
    cannot handle: a shard on dim 1, tensor parallelism (two sharded mesh dims), a mesh over
    only some ranks, an unsharded parameter."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    from sparse_sup.backends.fsdp2 import FSDP2Backend

    def linear():
        return nn.Linear(4, 4, bias=False)

    tp = linear()
    tp.weight = nn.Parameter(distribute_tensor(tp.weight.detach(), mesh, [Shard(0), Shard(1)]))
    cases = {
        "sharded on dim 0": fully_shard(linear(), mesh=mesh, shard_placement_fn=lambda p: Shard(1)),
        "no tensor parallelism": tp,
        "span every rank": fully_shard(linear(), mesh=mesh["shard"]),
        "apply fully_shard": linear(),
    }
    for fix, model in cases.items():
        try:
            FSDP2Backend(model, None, ["weight"])
        except ValueError as e:
            assert fix in str(e), e
        else:
            raise AssertionError(f"FSDP2Backend accepted a model it must refuse ({fix})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--mode", choices=["reference", "ddp", "fsdp2", "hsdp", "zero1", "zero2", "zero3"], required=True
    )
    parser.add_argument("--float32", action="store_true", help="compute in float32 (DeepSpeed masters)")
    parser.add_argument("--method", default="rigl")
    parser.add_argument("--world", type=int, default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--bn-eval", action="store_true", help="only recalibrate BN and evaluate")
    parser.add_argument("--accum", type=int, default=1, help="gradient accumulation steps per rank")
    precisions = ["fp32", "bf16", "bf16-fp32-accum"]  # DeepSpeed only
    parser.add_argument("--precision", choices=precisions, default="fp32")
    parser.add_argument("--model", choices=sorted(MODELS), default="toy")
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (results: at that step)")
    parser.add_argument("--ticket", default=None, help="then write the model as a ticket to this dir")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = torch.float32 if args.float32 else torch.float64
    if args.mode == "reference":
        run = ToyRun("reference", args.method, args.world, dtype, args.accum)
        torch.save(run.recalibrate_and_evaluate() if args.bn_eval else run.train(), args.out)
        return
    import torch.distributed as dist

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    run = ToyRun(args.mode, args.method, world, dtype, args.accum, args.precision, args.model, args.max_steps)
    if args.mode == "hsdp":
        check_fsdp2_refusals(next(run.model.parameters()).device_mesh)
    result = run.recalibrate_and_evaluate() if args.bn_eval else run.train()
    if args.ticket:  # how the loop writes tickets and the final model (collective)
        from sparse_sup.backends.buffers import sync_buffers
        from sparse_sup.checkpoint.tickets import save_model_checkpoint

        sync_buffers(run.module, run.dp)  # each rank writes a part of the replicated BN buffers
        result["final"] = run.full_state()
        meta = {"step": run.engine.step}
        save_model_checkpoint(Path(args.ticket), run.backend, run.engine.masks.masks, meta)
    if dist.get_rank() == 0:
        torch.save(result, args.out)
    counts = result.get("masked_nonzero")
    if counts:  # after saving: a test reads the numbers, the exit status fails the older tests
        nonzero = [v for k, v in counts.items() if k != "checked_grads"]
        assert counts["checked_grads"] > 0 and not any(nonzero), (
            f"masked elements nonzero (summed over steps and ranks): {counts}"
        )
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo workers can abort at interpreter exit otherwise (PLATFORM.md)


if __name__ == "__main__":
    main()
