"""The Trainer and the CLI are one algorithm: a whole run of the CLI loop (``train.loop.Run``) and of
``SupTicketsTrainer``, one process, the tiny config, fed the same global batches (the Trainer gets the
CLI's own training input, checked batch by batch against what the CLI's model saw), give the same masks
after every topology update, the same tickets and superposed models, and the same S_M."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from test_hf_trainer import assert_masks_equal, load_snapshot  # noqa: E402

CONFIG = ROOT / "configs" / "tiny-test.yaml"
CLI_ARGS = [
    "--data.max_train_samples=256",  # 4 steps of 64 an epoch
    "--schedule.epochs=6",  # 24 steps: phase 1 = 18, 2 cycles x 3
    "--schedule.lr_schedule=constant",  # phase 1's LR: the Trainer's constant scheduler
    "--schedule.warmup_epochs=0",
    "--tickets.num_cycles=2",
    "--tickets.cycle_epochs=0.75",
    "--tickets.cycles_fraction=null",
    "--tickets.bn_recal_augment=false",  # recalibration on clean images: the Trainer's dataset items
    "--tickets.bn_recal_batches=2",
    "--sparse.update_interval=4",
    "--train.progress_bar=false",
]
LABELS = ["P", "T_1", "S_1", "T_2", "S_2"]


class Recorder:
    """The run's own hooks, plus the whole masks after every topology update (kind, step, masks)."""

    def __init__(self, inner) -> None:
        self.inner, self.updates = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def on_topology_update(self, engine, kind, swapped) -> None:
        masks = engine.backend.full_masks(engine.masks.masks)
        self.updates.append((kind, engine.step, {k: v.clone().cpu() for k, v in masks.items()}))
        self.inner.on_topology_update(engine, kind, swapped)


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_cli(run_dir: Path) -> dict:
    """The CLI loop in this process, recording masks and the images of every training forward."""
    from sparse_sup.config import load_config
    from sparse_sup.train.loop import Run
    from sparse_sup.train.run import make_accelerator
    from sparse_sup.train.setup import prepare

    config = load_config(CONFIG, [*CLI_ARGS, f"--experiment.output_dir={run_dir}"])
    reset_accelerate()
    run = Run(prepare(config), make_accelerator(config))
    run.start()
    recorder = run.engine.hooks = Recorder(run.engine.hooks)
    seen: list[torch.Tensor] = []
    run.module.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone()) if torch.is_grad_enabled() else None
    )
    summary = run.train()
    engine, backend = run.engine, run.backend
    out = {
        "updates": recorder.updates,
        "seen": seen,
        "summary": summary,
        "final_masks": {k: v.clone() for k, v in backend.full_masks(engine.masks.masks).items()},
        "final_state": {k: v.detach().clone() for k, v in backend.full_state().items()},
    }
    reset_accelerate()
    return out


def cli_batches(config, prepared, total_steps: int) -> list[dict]:
    """The CLI's global batches, drawn as ``Run.train`` draws them (one process, no accumulation)."""
    from sparse_sup.data import GlobalBatchSampler

    c, plan = config, prepared.plan
    sampler = GlobalBatchSampler(len(prepared.train_set), c.schedule.batch_size, 1, 0, 1, c.experiment.seed)
    loader = prepared.train_input.loader(sampler, 0)
    batches = []
    for epoch in range(total_steps // plan.steps_per_epoch):
        sampler.set_epoch(epoch, 0)
        for host in loader:
            images, labels = prepared.train_input.to_device(host, torch.device("cpu"), None, len(batches))
            batches.append({"pixel_values": images, "labels": labels})
    return batches


class CleanImages(torch.utils.data.Dataset):
    """The training images as the CLI's BN recalibration serves them (``bn_set``: no augmentation)."""

    def __init__(self, bn_set) -> None:
        self.bn_set = bn_set

    def __len__(self) -> int:
        return len(self.bn_set)

    def __getitem__(self, i: int) -> dict:
        images, labels = self.bn_set.get_batch([(0, i)])[:2]
        return {"pixel_values": images[0], "labels": labels[0]}


def run_trainer(output_dir: Path) -> dict:
    """``SupTicketsTrainer`` on the CLI's model (same init), optimizer, batches and settings."""
    from transformers import TrainerCallback, TrainingArguments

    from sparse_sup import SparsityArguments, SupTicketsTrainer
    from sparse_sup.config import load_config
    from sparse_sup.train.optim import build_optimizer
    from sparse_sup.train.setup import prepare

    config = load_config(CONFIG, [*CLI_ARGS, f"--experiment.output_dir={output_dir / 'unused'}"])
    prepared = prepare(config)
    plan, s, t, data = prepared.plan, config.sparse, config.tickets, prepared.train_input
    batches = cli_batches(config, prepared, plan.total_steps)
    model = prepared.model
    base = type(model)

    class KeywordInputs(base):  # the Trainer passes keyword inputs; parameter names (mask keys) unchanged
        def forward(self, pixel_values, labels=None):
            return base.forward(self, pixel_values)

    model.__class__ = KeywordInputs

    class CLIBatches(SupTicketsTrainer):
        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(batches, batch_size=None)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logits = model(inputs["pixel_values"])
            loss = data.loss(logits, inputs["labels"])  # the CLI's loss
            return (loss, {"logits": logits}) if return_outputs else loss

    recorders: list[Recorder] = []

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            engine = trainer.sparse_engine
            recorders.append(Recorder(engine.hooks))
            engine.hooks = recorders[0]

    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.schedule.batch_size,
        per_device_eval_batch_size=config.data.eval_batch_size,
        max_steps=plan.total_steps,
        learning_rate=config.optim.lr,
        lr_scheduler_type="constant",
        max_grad_norm=config.optim.max_grad_norm or 0.0,
        seed=config.experiment.seed,
        use_cpu=True,
        label_names=["labels"],
        remove_unused_columns=False,
        save_strategy="no",
        logging_steps=10**6,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    sparsity = SparsityArguments(
        sparse_method=s.method,
        sparse_density=s.density,
        sparse_distribution=s.distribution,
        sparse_update_interval=s.update_interval,
        sparse_drop_fraction=s.drop_fraction,
        sparse_seed=config.experiment.seed,
        tickets_num_cycles=t.num_cycles,
        tickets_cycle_steps=plan.cycle_steps,
        tickets_lr_low=t.lr_low,
        tickets_lr_high=t.lr_high,
        tickets_reexplore_fraction=t.reexplore_fraction,
        tickets_mask_in_cycles=t.mask_in_cycles,
        tickets_merge=t.merge,
        tickets_reprune=t.reprune,
        tickets_bn_recal_batches=t.bn_recal_batches,
        tickets_bn_recal_batch_size=config.data.eval_batch_size,
    )
    reset_accelerate()
    trainer = CLIBatches(
        model=model,
        args=args,
        train_dataset=CleanImages(prepared.bn_set),
        eval_dataset=CleanImages(prepared.eval_set),
        sparsity_args=sparsity,
        callbacks=[Record()],
        optimizers=(build_optimizer(model, config.optim), None),
    )
    trainer.train()
    engine, backend = trainer.sparse_engine, trainer.sparse_backend
    out = {
        "updates": recorders[0].updates,
        "batches": [b["pixel_values"] for b in batches],
        "summary": trainer.sup_tickets_summary(),
        "final_masks": {k: v.clone() for k, v in backend.full_masks(engine.masks.masks).items()},
        "final_state": {k: v.detach().clone() for k, v in backend.full_state().items()},
    }
    reset_accelerate()
    return out


def test_trainer_and_cli_give_the_same_run(tmp_path):
    cli = run_cli(tmp_path / "cli")
    hf = run_trainer(tmp_path / "trainer")
    # the same global batches: what the CLI's model saw in training is what the Trainer was fed
    assert len(cli["seen"]) == len(hf["batches"]) == 24
    for step, (a, b) in enumerate(zip(cli["seen"], hf["batches"])):
        assert torch.equal(a, b), f"batch of step {step + 1}"
    # the same masks after every topology update (RigL updates, re-exploration at cycle starts)
    assert [(k, s) for k, s, _ in hf["updates"]] == [(k, s) for k, s, _ in cli["updates"]]
    assert len(cli["updates"]) >= 5
    for (kind, step, a), (_, _, b) in zip(cli["updates"], hf["updates"]):
        assert a.keys() == b.keys(), (kind, step)
        for name in a:
            assert torch.equal(a[name], b[name]), (kind, step, name)
    # the same tickets and superposed models, and the same S_M
    for label in LABELS:
        a = load_snapshot(tmp_path / "cli" / "tickets" / label)
        b = load_snapshot(tmp_path / "trainer" / "tickets" / label)
        assert a["meta"]["step"] == b["meta"]["step"], label
        assert_masks_equal(a["masks"], b["masks"])
        for name in a["model"]:
            torch.testing.assert_close(b["model"][name], a["model"][name], rtol=0, atol=0, msg=name)
    assert cli["summary"]["final_is"] == hf["summary"]["final_is"] == "S_2"
    assert_masks_equal(hf["final_masks"], cli["final_masks"])
    for name, value in cli["final_state"].items():
        torch.testing.assert_close(hf["final_state"][name], value, rtol=0, atol=0, msg=name)
