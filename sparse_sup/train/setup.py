"""Build everything a run needs from a ``Config``, validating all of it before any file is written."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, StepPlan, resolve_plan
from ..data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageClassificationDataset,
    load_split_datasets,
)
from ..models import build_model, select_targets

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Validated inputs of a run; nothing on disk has been touched yet."""

    config: Config
    model: torch.nn.Module
    target_names: list[str]
    train_set: ImageClassificationDataset
    eval_set: ImageClassificationDataset
    bn_set: ImageClassificationDataset  # training images, augmented unless tickets.bn_recal_augment=false
    plan: StepPlan
    run_dir: Path
    class_names: list[str]
    deepspeed_config: dict | None = None  # filled JSON when launched by the deepspeed launcher


def default_run_dir(config: Config) -> Path:
    if config.experiment.output_dir:
        return Path(config.experiment.output_dir)
    return Path("runs") / f"{config.experiment.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to write into a directory that already holds a run (unless told to)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"experiment.output_dir={str(run_dir)!r} exists and is not a directory")
    if (run_dir / "config.yaml").exists() and not overwrite:
        raise ValueError(
            f"experiment.output_dir={str(run_dir)!r} already holds a run; choose another directory "
            "or pass --experiment.overwrite=true"
        )


def prepare(config: Config) -> Prepared:
    """Model, data and step plan; raises ValueError/FileNotFoundError with a clear message on bad
    input, before anything is written."""
    run_dir = default_run_dir(config)
    check_run_dir(run_dir, config.experiment.overwrite)
    d = config.data
    splits = load_split_datasets(d.source, d.image_column, d.label_column, d.train_split, d.eval_split)
    train_hf, eval_hf = splits.train, splits.eval
    if d.max_train_samples:
        train_hf = train_hf.select(range(min(d.max_train_samples, len(train_hf))))
    if d.max_eval_samples:
        eval_hf = eval_hf.select(range(min(d.max_eval_samples, len(eval_hf))))
    num_classes = config.model.num_classes or splits.num_classes
    if num_classes < splits.num_classes:
        raise ValueError(
            f"model.num_classes={num_classes} is smaller than the dataset's {splits.num_classes} classes"
        )
    torch.manual_seed(config.experiment.seed)  # model init
    model = build_model(
        config.model.name,
        num_classes,
        cifar_stem=config.model.cifar_stem,
        drop_rate=config.model.drop_rate,
        kwargs=config.model.kwargs,
    )
    target_names = select_targets(model, config.sparse.include, config.sparse.exclude or None)
    if not target_names:
        raise ValueError("no parameter is sparsified: check sparse.include / sparse.exclude")
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if d.style == "cifar" else (IMAGENET_MEAN, IMAGENET_STD)
    common = dict(seed=config.experiment.seed, style=d.style, image_size=d.image_size, mean=mean, std=std)
    train_set = ImageClassificationDataset(train_hf, train=True, **common)
    eval_set = ImageClassificationDataset(eval_hf, train=False, **common)
    # BN statistics must match what the layers saw in training: by default recalibration draws its
    # batches through the training transform (with keys of its own, see recalibration_batches)
    if config.tickets.bn_recal_augment:
        bn_set = train_set
    elif train_set.in_memory:
        bn_set = copy.copy(train_set)  # shares the decoded images; no augmentation
        bn_set.train = False
    else:
        bn_set = ImageClassificationDataset(train_hf, train=False, **common)
    plan = resolve_plan(config, len(train_set))
    return Prepared(
        config, model, target_names, train_set, eval_set, bn_set, plan, run_dir, splits.class_names
    )
