"""A short ``SupTicketsTrainer`` run on tiny HF / timm models and a slice of the bundled CIFAR-10 mini,
checking after every optimizer step that masked weights are exactly zero and per-layer counts exact.
Used in-process by tests/integration/test_hf_trainer.py and under torchrun for DDP / DeepSpeed:

    torchrun --nproc_per_node=2 hf_trainer_worker.py '{"model": "vit", "out": "r.pt", ...}'
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

NUM_TRAIN, NUM_EVAL = 192, 64

DEFAULTS = dict(
    model="vit",  # vit | resnet | timm
    dtype="float32",
    seed=0,
    per_device_batch=8,
    accum=2,
    epochs=2,  # 192 / 16 = 12 steps per epoch -> 24 steps
    max_steps=-1,
    cycles=2,
    cycle_steps=3,
    schedule="cycles",  # tickets_schedule: cycles | tail | tail_cycles
    method="rigl",
    density=0.2,
    update_interval=4,
    lr=0.05,
    optim=None,  # default: sgd (momentum 0.9) for the ResNets, adamw_torch otherwise
    deepspeed=None,  # None | 2 | 3
    fsdp=False,  # the Trainer's fsdp= option with FSDP2 (GPUs only)
    save_steps=None,
    stop_at=None,  # a callback stops training after this step (a crash mid-run)
    skip_at=(),  # Trainer steps (1-based) whose loss is made infinite: the optimizer step is skipped
    scaler=False,  # an fp16-style GradScaler("cpu") on the accelerator (Accelerate builds none on CPU)
    lr_scheduler_type="linear",
    head_lr_groups=False,  # two parameter groups: the classifier at lr (group 0), the rest at lr / 2
    resume=None,  # checkpoint directory to resume from
    out=None,
    output_dir=None,
)


class Data(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def datasets(dtype: torch.dtype) -> tuple[Data, Data]:
    from sparse_sup.data import load_split_datasets

    splits = load_split_datasets("bundled")

    def tensors(ds, n):
        ds = ds.select(range(n))
        images = np.stack([np.asarray(im.convert("RGB")) for im in ds["image"]])
        x = torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype) / 255.0
        return Data((x - 0.5) / 0.25, torch.tensor(ds["label"], dtype=torch.int64))

    return tensors(splits.train, NUM_TRAIN), tensors(splits.eval, NUM_EVAL)


class TimmClassifier(torch.nn.Module):
    """A timm model as the Trainer wants it: keyword inputs, a loss when labels are given."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values, labels=None):
        logits = self.model(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out = {"loss": torch.nn.functional.cross_entropy(logits, labels), **out}
        return out


def build_model(kind: str, seed: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "vit":
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=10,
        )
        model = ViTForImageClassification(config)
    elif kind == "resnet":
        from transformers import ResNetConfig, ResNetForImageClassification

        config = ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=10
        )
        model = ResNetForImageClassification(config)
    else:
        import timm

        model = TimmClassifier(timm.create_model("test_resnet", num_classes=10))
    return model.to(dtype)


def digest(mask: torch.Tensor) -> str:
    return hashlib.sha1(np.packbits(mask.reshape(-1).cpu().numpy()).tobytes()).hexdigest()[:16]


def make_checker(trainer_ref: list):
    from transformers import TrainerCallback

    class CheckMasks(TrainerCallback):
        """After every optimizer step: masked target pieces exactly zero, per-layer counts as at
        the start (RigL/SET keep them; only the final prune to S_M changes them), mask digests."""

        def __init__(self) -> None:
            self.steps: list[dict] = []
            self.initial: dict | None = None
            self.counts0: dict | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            engine = trainer_ref[0].sparse_engine
            backend = trainer_ref[0].sparse_backend
            self.initial = {k: v.clone().cpu() for k, v in backend.full_masks(engine.masks.masks).items()}
            self.counts0 = dict(engine.masks.counts)

        def on_optimizer_step(self, args, state, control, **kwargs):
            trainer = trainer_ref[0]
            engine, backend = trainer.sparse_engine, trainer.sparse_backend
            for t in engine.targets:
                mask = engine.masks.masks[t.name]
                zeros = t.param.reshape(-1)[~mask.reshape(-1)]
                if zeros.numel() and zeros.abs().max().item() != 0:
                    raise AssertionError(f"step {engine.step}: masked weights of {t.name} are not zero")
                for s in t.optimizer_states():
                    masked = s.reshape(-1)[~mask.reshape(-1)]
                    if masked.numel() and masked.abs().max().item() != 0:
                        raise AssertionError(f"step {engine.step}: optimizer state of {t.name} not masked")
            counts = dict(engine.masks.counts)
            engine.masks.recount()  # the counts are global (all-reduced) and must match the tensors
            if dict(engine.masks.counts) != counts:
                raise AssertionError(f"step {engine.step}: mask counts out of date")
            if engine.step < engine.plan.total_steps and counts != self.counts0:
                raise AssertionError(
                    f"step {engine.step}: per-layer counts changed: {counts} vs {self.counts0}"
                )
            if self.steps and self.steps[-1]["step"] == engine.step:
                return  # a skipped step: checked above, nothing new to record
            full = backend.full_masks(engine.masks.masks)
            self.steps.append(
                {
                    "step": engine.step,
                    "active": sum(counts.values()),
                    "digests": {k: digest(v) for k, v in full.items()},
                    "lr": engine.lr(engine.step - 1),
                    "group_lrs": [g["lr"] for g in trainer.optimizer.param_groups],  # what the step used
                }
            )

    return CheckMasks()


class StopAt:
    def __new__(cls, step: int):
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= step:
                    control.should_training_stop = True

        return _Stop()


def trainer_class(skip_at):
    """``SupTicketsTrainer`` whose loss is infinite at the Trainer steps ``skip_at`` (every micro-batch),
    so that optimizer step is skipped: by the GradScaler (overflow) or as non-finite."""
    from sparse_sup import SupTicketsTrainer

    class InjectSkips(SupTicketsTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            if self.state.global_step + 1 in skip_at:
                loss = loss * float("inf")
            return loss

    return InjectSkips if skip_at else SupTicketsTrainer


def head_lr_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Layer-wise LRs: the classifier head at ``lr`` (group 0), every other parameter at ``lr / 2``."""
    head = [p for n, p in model.named_parameters() if n.startswith(("classifier", "model.fc"))]
    ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in ids]
    return torch.optim.AdamW([{"params": head, "lr": lr}, {"params": body, "lr": lr / 2}], weight_decay=0.01)


def run(**overrides) -> dict:
    trainer, checker, _ = build(**overrides)
    trainer.train(resume_from_checkpoint={**DEFAULTS, **overrides}["resume"])
    return collect(trainer, checker, **overrides)


def build(**overrides):
    """(trainer, mask checker, stop callback or None) of a run, not yet trained."""
    c = {**DEFAULTS, **overrides}
    from transformers import TrainingArguments

    if c["deepspeed"]:
        from accelerate import PartialState

        # DeepSpeed on CPU: a gloo state marked for DeepSpeed, configured before the Trainer
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
    from sparse_sup import SparsityArguments

    dtype = getattr(torch, c["dtype"])
    train_set, eval_set = datasets(dtype)
    model = build_model(c["model"], c["seed"], dtype)
    extra = {}
    if c["deepspeed"]:
        extra["deepspeed"] = {
            "zero_optimization": {
                "stage": c["deepspeed"],
                "stage3_param_persistence_threshold": 0,
                "stage3_gather_16bit_weights_on_model_save": True,  # save_model() writes S_M whole
            },
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        extra["accelerator_config"] = {"use_configured_state": True}
    if c["fsdp"]:
        extra.update(fsdp="full_shard", fsdp_config={"fsdp_version": 2})
    if c["save_steps"]:
        extra.update(save_strategy="steps", save_steps=c["save_steps"])
    else:
        extra.update(save_strategy="no")
    args = TrainingArguments(
        output_dir=c["output_dir"],
        per_device_train_batch_size=c["per_device_batch"],
        per_device_eval_batch_size=32,
        gradient_accumulation_steps=c["accum"],
        num_train_epochs=c["epochs"],
        max_steps=c["max_steps"],
        learning_rate=c["lr"],
        lr_scheduler_type=c["lr_scheduler_type"],
        optim=c["optim"] or ("sgd" if c["model"] == "resnet" else "adamw_torch"),
        optim_args="momentum=0.9",
        weight_decay=0.01,
        max_grad_norm=1.0,
        seed=c["seed"],
        use_cpu=not c["fsdp"],
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        **extra,
    )
    sparsity = SparsityArguments(
        sparse_method=c["method"],
        sparse_density=c["density"],
        sparse_update_interval=c["update_interval"],
        tickets_num_cycles=c["cycles"],
        tickets_schedule=c["schedule"],
        tickets_cycle_steps=c["cycle_steps"],
        tickets_bn_recal_batch_size=32,
    )
    ref: list = []
    checker = make_checker(ref)
    stop = StopAt(c["stop_at"]) if c["stop_at"] else None
    trainer = trainer_class(set(c["skip_at"]))(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        sparsity_args=sparsity,
        callbacks=[checker] + ([stop] if stop else []),
        optimizers=(head_lr_optimizer(model, c["lr"]) if c["head_lr_groups"] else None, None),
    )
    if c["scaler"]:  # prepared with the optimizer at train(): Accelerate's fp16 path, on CPU
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ref.append(trainer)
    return trainer, checker, stop


def collect(trainer, checker, **overrides) -> dict:
    """What a finished (or stopped) run produced, after an evaluation and ``save_model()``."""
    c = {**DEFAULTS, **overrides}
    engine, backend = trainer.sparse_engine, trainer.sparse_backend
    metrics = trainer.evaluate()
    final_dir = Path(trainer.args.output_dir) / "final"
    trainer.save_model(str(final_dir))
    result = {
        "initial_masks": checker.initial,
        "steps": checker.steps,
        "final_masks": {k: v.clone().cpu() for k, v in backend.full_masks(engine.masks.masks).items()},
        "final_state": {k: v.detach().clone().cpu() for k, v in backend.full_state().items()},
        "summary": trainer.sup_tickets_summary(),
        "table": trainer.sup_tickets_table()
        if trainer.sparse_results.get("final", {}).get("accuracy") is not None
        else None,
        "eval": metrics,
        "log_history": trainer.state.log_history,
        "plan": {"pre_steps": trainer.sparse_plan.pre_steps, "total_steps": trainer.sparse_plan.total_steps},
        "target_names": list(trainer.target_names),
        "world_size": trainer.args.world_size,
        "kind": backend.kind,
        "global_step": trainer.state.global_step,
    }
    if c["out"] and trainer.args.process_index == 0:
        torch.save(result, c["out"])
    del trainer, engine, backend
    gc.collect()
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)
    overrides = json.loads(sys.argv[1])
    run(**overrides)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's exit crash (PLATFORM.md)
