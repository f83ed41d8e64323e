"""Typed configuration, one dataclass per component. Values are checked in ``__post_init__``;
errors name the key, the value and what is allowed. Epoch-based settings are converted to
optimizer steps once, in ``plan.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def _choice(key: str, value: Any, allowed: tuple) -> None:
    _check(value in allowed, key, value, f"allowed values are {', '.join(map(repr, allowed))}")


@dataclass(kw_only=True)
class ExperimentConfig:
    name: str = "run"
    seed: int = 0
    output_dir: str | None = None  # default: runs/<name>-<timestamp>
    overwrite: bool = False  # allow writing into a directory that already holds a run

    def __post_init__(self) -> None:
        _check(
            bool(self.name) and "/" not in self.name,
            "experiment.name",
            self.name,
            "a non-empty name without '/'",
        )
        _check(self.seed >= 0, "experiment.seed", self.seed, "a non-negative integer")


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "resnet18"
    num_classes: int | None = None  # None: taken from the dataset
    cifar_stem: bool = False
    drop_rate: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False  # timm's weights, from the local HF / torch hub cache only (never downloads)
    checkpoint: str | None = None  # local weights file (safetensors / torch); classifier may differ

    def __post_init__(self) -> None:
        for key, value in self.kwargs.items():
            # YAML flow style without a space ({img_size:32}) gives the key 'img_size:32' with no value
            _check(
                ":" not in str(key) and value is not None,
                "model.kwargs",
                self.kwargs,
                f"key {key!r} has no value; YAML needs a space after ':', e.g. "
                "--model.kwargs='{img_size: 32, patch_size: 4}'",
            )


@dataclass(kw_only=True)
class DataConfig:
    source: str = "bundled"  # "bundled", a local parquet/image folder, or a cached HF dataset name
    image_column: str | None = None
    label_column: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    style: str = "cifar"  # augmentation family: cifar (crop+flip, <=64px) or imagenet (224px)
    image_size: int = 32
    num_workers: int = 0
    eval_batch_size: int = 256  # also the batch size of BN recalibration
    mean: list[float] | None = None  # per-channel normalisation; null: the dataset's (see data.NORMALIZATION)
    std: list[float] | None = None
    max_train_samples: int | None = None  # use only the first N (smoke tests, debugging)
    max_eval_samples: int | None = None
    # timm augmentation, every draw keyed by (seed, epoch, index) or, for mixup, (seed, step)
    auto_augment: str | None = None  # timm policy string, e.g. rand-m9-mstd0.5-inc1, augmix-m5-w3
    color_jitter: float = 0.0  # brightness/contrast/saturation strength (unused with auto_augment)
    re_prob: float = 0.0  # random erasing probability (timm RandomErasing, per-pixel noise)
    crop_pct: float | None = None  # eval centre-crop fraction (imagenet style); null: timm's 0.875
    mixup: float = 0.0  # mixup alpha (0: off); soft targets with timm SoftTargetCrossEntropy
    cutmix: float = 0.0  # cutmix alpha (0: off); with both on, timm switches with probability 0.5
    pin_memory: bool = True  # training batches pinned (GPU only) and copied non_blocking
    # in-memory datasets (style cifar, <= 64 px): the decoded images kept on the training device, every
    # batch gathered, cropped and normalised there (no host copy per step; CIFAR-10 is 150 MB of uint8)
    on_device: bool = False
    # the training split read as a stream (local parquet files or WebDataset .tar shards): sharded
    # over ranks and workers, resumable mid-epoch; its order depends on the world size and workers
    streaming: bool = False
    shuffle_buffer: int = 10_000  # streaming: samples in the shuffle buffer (files are shuffled too)
    train_samples: int | None = None  # streaming: samples per epoch where the files do not say

    def __post_init__(self) -> None:
        _choice("data.style", self.style, ("cifar", "imagenet"))
        _check(self.color_jitter >= 0, "data.color_jitter", self.color_jitter, "a number >= 0")
        _check(0 <= self.re_prob <= 1, "data.re_prob", self.re_prob, "a probability in [0, 1]")
        _check(
            self.crop_pct is None or 0 < self.crop_pct <= 1,
            "data.crop_pct",
            self.crop_pct,
            "null or in (0, 1]",
        )
        for key in ("mixup", "cutmix"):
            _check(getattr(self, key) >= 0, f"data.{key}", getattr(self, key), "an alpha >= 0 (0: off)")
        if self.auto_augment is not None:  # the whole string is parsed by timm in data/ (prepare)
            _check(
                self.auto_augment.split("-")[0]
                in ("rand", "augmix", "original", "originalr", "v0", "v0r", "3a"),
                "data.auto_augment",
                self.auto_augment,
                "a timm policy string such as rand-m9-mstd0.5-inc1, augmix-m5-w3, original, v0, 3a",
            )
        _check(self.image_size > 0, "data.image_size", self.image_size, "a positive integer")
        if self.on_device:  # a gather on the device needs every image decoded up front, no PIL step
            lazy = [
                (self.streaming, "data.streaming=true (a stream is read from its files as it goes)"),
                (self.style != "cifar", f"data.style={self.style!r} (images decoded per sample)"),
                (self.image_size > 64, f"data.image_size={self.image_size} (> 64 px: decoded per sample)"),
                (bool(self.auto_augment), f"data.auto_augment={self.auto_augment!r} (PIL, per sample)"),
                (self.color_jitter > 0, f"data.color_jitter={self.color_jitter} (PIL, per sample)"),
            ]
            why = next((reason for hit, reason in lazy if hit), None)
            _check(
                why is None,
                "data.on_device",
                True,
                "it keeps in-memory images (data.style=cifar, <= 64 px, no PIL transform) on the device, "
                f"and this run has {why}; set data.on_device=false (batches then come from the host)",
            )
        _check(self.num_workers >= 0, "data.num_workers", self.num_workers, "an integer >= 0")
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer", self.shuffle_buffer, "an integer >= 1")
        _check(
            self.train_samples is None or self.train_samples >= 1,
            "data.train_samples",
            self.train_samples,
            "null or an integer >= 1",
        )
        _check(self.eval_batch_size > 0, "data.eval_batch_size", self.eval_batch_size, "a positive integer")
        for key in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, key)
            _check(value is None or value > 0, f"data.{key}", value, "null or a positive integer")
        _check(
            (self.mean is None) == (self.std is None),
            "data.mean" if self.std is None else "data.std",
            self.mean if self.std is None else self.std,
            "set data.mean and data.std together (or neither: the dataset's own statistics)",
        )
        _check(self.mean is None or len(self.mean) == 3, "data.mean", self.mean, "3 values (R, G, B)")
        _check(
            self.std is None or (len(self.std) == 3 and min(self.std) > 0),
            "data.std",
            self.std,
            "3 positive values (R, G, B)",
        )


@dataclass(kw_only=True)
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    decay_norms_and_biases: bool = True  # ImageNet recipe: False (no weight decay on norms/biases)
    betas: tuple[float, float] = (0.9, 0.999)
    label_smoothing: float = 0.0
    max_grad_norm: float | None = None
    # name: any timm.optim.create_optimizer_v2 name (sgd follows nesterov; adamw, lamb, lars, ...)
    layer_decay: float | None = None  # layer-wise LR decay (timm param groups); null: off
    fused: bool | None = None  # null: fused kernels for SGD/Adam/AdamW on CUDA, foreach elsewhere

    def __post_init__(self) -> None:
        _check(
            isinstance(self.name, str) and bool(self.name), "optim.name", self.name, "a timm optimizer name"
        )
        _check(
            self.layer_decay is None or 0 < self.layer_decay <= 1,
            "optim.layer_decay",
            self.layer_decay,
            "null or in (0, 1]",
        )
        _check(self.lr > 0, "optim.lr", self.lr, "a positive number")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "a number >= 0")
        _check(0 <= self.label_smoothing < 1, "optim.label_smoothing", self.label_smoothing, "in [0, 1)")
        _check(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "optim.max_grad_norm",
            self.max_grad_norm,
            "null or a positive number",
        )
        self.betas = tuple(self.betas)


@dataclass(kw_only=True)
class ScheduleConfig:
    epochs: float = 10.0  # the whole budget, cycles included
    batch_size: int = 128  # global batch per optimizer step (all ranks, all accumulation steps)
    grad_accum_steps: int = 1
    lr_schedule: str = "step"  # base LR in phase 1: step, cosine or constant
    # fractions of phase 1 (of the whole budget with tickets.schedule=tail or tail_cycles)
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    lr_gamma: float = 0.1
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.1

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "schedule.epochs", self.epochs, "a positive number")
        _check(self.batch_size > 0, "schedule.batch_size", self.batch_size, "a positive integer")
        _check(
            self.grad_accum_steps >= 1, "schedule.grad_accum_steps", self.grad_accum_steps, "an integer >= 1"
        )
        _check(
            self.batch_size % self.grad_accum_steps == 0,
            "schedule.grad_accum_steps",
            self.grad_accum_steps,
            f"a divisor of schedule.batch_size={self.batch_size} (the global batch is split into "
            "equal micro-batches)",
        )
        _choice("schedule.lr_schedule", self.lr_schedule, ("step", "cosine", "constant"))
        _check(
            all(0 < m < 1 for m in self.lr_milestones),
            "schedule.lr_milestones",
            self.lr_milestones,
            "fractions of phase 1 strictly between 0 and 1",
        )
        _check(self.warmup_epochs >= 0, "schedule.warmup_epochs", self.warmup_epochs, "a number >= 0")


@dataclass(kw_only=True)
class SparseConfig:
    method: str = "rigl"  # set (random regrowth), rigl (gradient regrowth), granet (+ gradual prune)
    density: float = 0.1  # final fraction of target weights kept
    distribution: str = "erk"
    update_interval: int = 1000  # optimizer steps between topology updates (ΔT)
    drop_fraction: float = 0.5
    drop_fraction_schedule: str = "constant"  # constant or cosine (drop_fraction -> final)
    drop_fraction_final: float = 0.005
    granet_initial_density: float = 0.5
    granet_prune_start_epoch: float = 0.0
    granet_prune_end_epoch: float = 110.0
    include: list[str] | None = None  # glob patterns of target names (default: conv/linear weights)
    exclude: list[str] = field(default_factory=list)
    enforce_every_step: bool = True  # re-zero masked weights and optimizer state after each step
    check_ranks: bool = False  # debug: compare a mask checksum across ranks at every update
    # debug: after every optimizer step assert exact per-layer counts, zero masked weights, gradients
    # and optimizer state, and identical masks on every rank (a few passes and collectives per step)
    check_invariants: bool = False

    def __post_init__(self) -> None:
        from ..methods import METHODS  # the registry: a new method adds a file, not a branch here

        _choice("sparse.method", self.method, tuple(METHODS))
        _check(0 < self.density <= 1, "sparse.density", self.density, "a fraction of weights kept in (0, 1]")
        _choice("sparse.distribution", self.distribution, ("erk", "uniform"))
        _check(
            self.update_interval >= 1,
            "sparse.update_interval",
            self.update_interval,
            "an integer >= 1 (steps)",
        )
        _check(0 <= self.drop_fraction < 1, "sparse.drop_fraction", self.drop_fraction, "in [0, 1)")
        _choice("sparse.drop_fraction_schedule", self.drop_fraction_schedule, ("constant", "cosine"))
        _check(
            0 <= self.drop_fraction_final <= self.drop_fraction,
            "sparse.drop_fraction_final",
            self.drop_fraction_final,
            "in [0, sparse.drop_fraction]",
        )
        METHODS[self.method].check_config(self)


@dataclass(frozen=True)
class TicketSchedule:
    """What a ``tickets.schedule`` value means, for the plan, the timeline and the Trainer alike."""

    # the base LR schedule's milestones (or cosine) span the whole budget, so phase 1 follows the
    # base run's own course until the tickets begin; False: it is compressed into phase 1
    base_lr_over_whole_budget: bool
    # each ticket trains under a triangle lr_low -> lr_high -> lr_low; False: the base schedule goes on
    cyclic_lr: bool
    default_reexplore: float  # tickets.reexplore_fraction when it is null


TICKET_SCHEDULES = {
    # the paper's: the base LR schedule compressed into phase 1, then a triangle LR per cycle
    "cycles": TicketSchedule(base_lr_over_whole_budget=False, cyclic_lr=True, default_reexplore=0.5),
    # the tickets are the models at equal steps through the base schedule's own last part; no step
    # leaves it, and a weight regrown at zero could not learn at its LR
    "tail": TicketSchedule(base_lr_over_whole_budget=True, cyclic_lr=False, default_reexplore=0.0),
    # phase 1 is the base run itself until the cycles start; the paper's cycles replace its last part
    "tail_cycles": TicketSchedule(base_lr_over_whole_budget=True, cyclic_lr=True, default_reexplore=0.0),
}


@dataclass(kw_only=True)
class TicketsConfig:
    num_cycles: int = 3  # 0: plain DST for the whole budget (the base method)
    schedule: str = "cycles"  # a key of TICKET_SCHEDULES: cycles, tail or tail_cycles
    cycle_epochs: float | None = None  # length of one cycle; or give cycles_fraction
    cycles_fraction: float | None = None  # fraction of the whole budget in cycles (default 0.1)
    lr_low: float = 1e-3
    lr_high: float = 5e-3
    # drop/regrow-by-gradient at each cycle start; 0: off; null: the schedule's default (0.5 with
    # cycles, 0 with tail and tail_cycles)
    reexplore_fraction: float | None = None
    mask_in_cycles: str = "frozen"  # frozen (CIFAR recipe) or update (ImageNet recipe)
    merge: str = "caa"  # caa (cumulative average) or ema
    ema_ticket_weight: float = 0.5  # ema: S <- (1 - w) * S + w * T_i (w weights the new ticket)
    reprune: str = "every"  # every merge, or once at the end
    include_phase1_model: bool = True  # S_0 = P; False leaves P out of the average
    bn_recalibration: bool = True
    bn_recal_batches: int | None = None  # None: one pass over the training data
    bn_recal_augment: bool = True  # recalibrate on training-transform batches; False: clean images

    def __post_init__(self) -> None:
        _check(self.num_cycles >= 0, "tickets.num_cycles", self.num_cycles, "an integer >= 0")
        _choice("tickets.schedule", self.schedule, tuple(TICKET_SCHEDULES))
        if self.reexplore_fraction is None:
            self.reexplore_fraction = self.schedule_spec.default_reexplore
        _check(
            self.cycle_epochs is None or self.cycles_fraction is None,
            "tickets.cycle_epochs",
            self.cycle_epochs,
            "set at most one of tickets.cycle_epochs and tickets.cycles_fraction",
        )
        _check(
            self.cycle_epochs is None or self.cycle_epochs > 0,
            "tickets.cycle_epochs",
            self.cycle_epochs,
            "a positive number",
        )
        _check(
            self.cycles_fraction is None or 0 < self.cycles_fraction < 1,
            "tickets.cycles_fraction",
            self.cycles_fraction,
            "a fraction in (0, 1)",
        )
        _check(
            0 < self.lr_low <= self.lr_high,
            "tickets.lr_low",
            self.lr_low,
            f"a positive number <= tickets.lr_high={self.lr_high}",
        )
        _check(
            0 <= self.reexplore_fraction < 1,
            "tickets.reexplore_fraction",
            self.reexplore_fraction,
            "in [0, 1)",
        )
        _choice("tickets.mask_in_cycles", self.mask_in_cycles, ("frozen", "update"))
        _choice("tickets.merge", self.merge, ("caa", "ema"))
        _check(
            0 < self.ema_ticket_weight < 1,
            "tickets.ema_ticket_weight",
            self.ema_ticket_weight,
            "in (0, 1): the weight of the new ticket in S <- (1 - w) * S + w * T_i",
        )
        _choice("tickets.reprune", self.reprune, ("every", "end"))
        _check(
            self.bn_recal_batches is None or self.bn_recal_batches > 0,
            "tickets.bn_recal_batches",
            self.bn_recal_batches,
            "null (one pass) or a positive integer",
        )

    @property
    def schedule_spec(self) -> TicketSchedule:
        return TICKET_SCHEDULES[self.schedule]


@dataclass(kw_only=True)
class TrainConfig:
    precision: str = "fp32"  # fp32, bf16 or fp16 (fp16 uses a loss scaler: skipped steps count for nothing)
    log_every: int = 20  # optimizer steps between log lines
    eval_every_epochs: float = 0.0  # 0: evaluate only at P, tickets and S
    skip_nonfinite: bool = True  # skip (and do not count) a step whose gradients are inf/NaN
    compile: bool = False  # torch.compile: the wrapped model (one process, DDP) or each block (FSDP2)
    channels_last: bool = False  # convnets: weights and input batches in channels_last (one process, DDP)
    # FSDP2 only: HSDP over a 2-D mesh (dp_replicate, world / dp_replicate): parameters sharded within
    # each group of world / dp_replicate ranks (a node, say), the groups replicas of each other
    # (gradients all-reduced across them); 1: plain FSDP over every rank
    dp_replicate: int = 1
    ema: bool = False  # EMA of the weights (timm ModelEmaV3) inside the masks, evaluated beside
    ema_decay: float = 0.9998  # horizon ~ 1 / (1 - decay) optimizer steps
    save_tickets: bool = True
    max_steps: int | None = None  # stop early after this many optimizer steps (debugging)
    # fault injection (tests, debugging): the steps taken with these 0-based indices (applied and
    # skipped steps both count) get an infinite loss, so their gradients overflow and the step is
    # skipped (by the loss scaler under fp16) -- the path a real overflow takes
    nonfinite_steps: list[int] = field(default_factory=list)
    progress_bar: bool = True
    # experiment trackers through Accelerate (tensorboard, trackio, wandb, mlflow, or none);
    # null: tensorboard when it is installed, else none. metrics.jsonl is written either way.
    report_to: list[str] | str | None = None

    def __post_init__(self) -> None:
        _choice("train.precision", self.precision, ("fp32", "bf16", "fp16"))
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        for tracker in self.report_to or ():
            _choice("train.report_to", tracker, ("tensorboard", "trackio", "wandb", "mlflow", "none"))
        _check(self.log_every >= 1, "train.log_every", self.log_every, "an integer >= 1")
        _check(self.dp_replicate >= 1, "train.dp_replicate", self.dp_replicate, "an integer >= 1")
        _check(0 < self.ema_decay < 1, "train.ema_decay", self.ema_decay, "in (0, 1)")
        _check(
            self.max_steps is None or self.max_steps >= 1, "train.max_steps", self.max_steps, "null or >= 1"
        )
        _check(
            isinstance(self.nonfinite_steps, list)
            and all(isinstance(i, int) and i >= 0 for i in self.nonfinite_steps),
            "train.nonfinite_steps",
            self.nonfinite_steps,
            "a list of step indices >= 0",
        )


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int | None = 1000  # run checkpoint every N optimizer steps (null: only at cycle ends)
    at_cycle_ends: bool = True  # also after every ticket and superposition
    keep_last: int = 2  # older run checkpoints are deleted once a newer one is published

    def __post_init__(self) -> None:
        _check(
            self.every_steps is None or self.every_steps >= 1,
            "checkpoint.every_steps",
            self.every_steps,
            "null or an integer >= 1 (optimizer steps)",
        )
        _check(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "an integer >= 1")


@dataclass(kw_only=True)
class Config:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    tickets: TicketsConfig = field(default_factory=TicketsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
