"""Build everything a run needs from a ``Config``, validating all of it before any file is written."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, ConfigError, StepPlan, resolve_plan
from ..data import ImageClassificationDataset, TrainInput, dataset_normalization, load_split_datasets
from ..data.streaming import StreamingImages, stream_head, stream_size
from ..models import build_model, select_targets
from .optim import check_optimizer_name

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Validated inputs of a run; nothing on disk has been touched yet."""

    config: Config
    model: torch.nn.Module
    target_names: list[str]
    train_set: ImageClassificationDataset | StreamingImages  # a stream with data.streaming
    eval_set: ImageClassificationDataset
    bn_set: ImageClassificationDataset  # training images, augmented unless tickets.bn_recal_augment=false
    plan: StepPlan
    run_dir: Path
    class_names: list[str]
    deepspeed_config: dict | None = None  # filled JSON when launched by the deepspeed launcher
    resume_from: Path | None = None  # run checkpoint to continue from (--resume)
    train_input: TrainInput | None = None  # uint8 host batches, device-side finish/mixup/loss


def default_run_dir(config: Config) -> Path:
    """``experiment.output_dir``, else ``runs/<name>-<time>``. Collective when torch.distributed
    is initialised: ranks reach this line at different moments, and two clocks on either side of a
    second boundary would split one run over two folders, so rank 0 chooses for every rank."""
    if config.experiment.output_dir:
        return Path(config.experiment.output_dir)
    name = f"{config.experiment.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    return Path("runs") / name


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to write into a directory that already holds a run (unless told to)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"experiment.output_dir={str(run_dir)!r} exists and is not a directory")
    if (run_dir / "config.yaml").exists() and not overwrite:
        raise ConfigError(
            f"experiment.output_dir={str(run_dir)!r} already holds a run; choose another directory "
            "or pass --experiment.overwrite=true"
        )


def check_streaming(config: Config) -> int:
    """The samples a streamed run keeps in memory for BN recalibration (0 without streaming). A
    stream has no random access, so recalibration draws from its first
    ``tickets.bn_recal_batches x data.eval_batch_size`` samples: that number must be given."""
    d, t = config.data, config.tickets
    if not d.streaming:
        return 0
    if t.num_cycles and t.bn_recalibration and t.bn_recal_batches is None:
        raise ConfigError(
            "data.streaming=true with tickets.bn_recal_batches=null (one pass over the training set): a "
            "stream is recalibrated from its first samples, kept in memory; set tickets.bn_recal_batches=N "
            f"(N x data.eval_batch_size={d.eval_batch_size} samples), or tickets.bn_recalibration=false"
        )
    return max(1, (t.bn_recal_batches or 1) * d.eval_batch_size)


def prepare(config: Config, resume: str | None = None) -> Prepared:
    """Model, data and step plan; raises ConfigError/FileNotFoundError with a clear message on bad
    input, before anything is written. ``resume``: ``auto`` or a checkpoint/run path (``--resume``)."""
    resume_from = None
    if resume:
        from .resume import resolve_resume, run_dir_of

        resume_from = resolve_resume(resume, config)  # the run directory may exist: it is continued
        run_dir = run_dir_of(resume, config)
    else:
        run_dir = default_run_dir(config)
        check_run_dir(run_dir, config.experiment.overwrite)
    check_optimizer_name(config.optim)  # timm's registry, before anything is written
    d = config.data
    recal_samples = check_streaming(config)
    splits = load_split_datasets(
        d.source, d.image_column, d.label_column, d.train_split, d.eval_split, streaming=d.streaming
    )
    train_hf, eval_hf = splits.train, splits.eval
    if d.streaming:
        num_train = d.train_samples or stream_size(d.source, d.train_split)
        if num_train is None:
            raise ConfigError(
                f"data.streaming: the number of training samples of {d.source!r} is not written in its "
                "files (an image folder); set data.train_samples=N"
            )
        if d.max_train_samples:
            num_train = min(num_train, d.max_train_samples)
            train_hf = train_hf.take(num_train)
        train_hf_head = stream_head(train_hf, recal_samples)  # BN recalibration's set, in memory
    elif d.max_train_samples:
        train_hf = train_hf.select(range(min(d.max_train_samples, len(train_hf))))
    if d.max_eval_samples:
        eval_hf = eval_hf.select(range(min(d.max_eval_samples, len(eval_hf))))
    num_classes = config.model.num_classes or splits.num_classes
    if num_classes < splits.num_classes:
        raise ConfigError(
            f"model.num_classes={num_classes} is smaller than the dataset's {splits.num_classes} classes"
        )
    torch.manual_seed(config.experiment.seed)  # model init
    model = build_model(
        config.model.name,
        num_classes,
        cifar_stem=config.model.cifar_stem,
        drop_rate=config.model.drop_rate,
        kwargs=config.model.kwargs,
        pretrained=config.model.pretrained,
        checkpoint=config.model.checkpoint,
    )
    target_names = select_targets(model, config.sparse.include, config.sparse.exclude or None)
    if not target_names:
        raise ConfigError("no parameter is sparsified: check sparse.include / sparse.exclude")
    if d.mean is not None:
        mean, std = tuple(d.mean), tuple(d.std)
    else:
        which, mean, std = dataset_normalization(d.source, d.style)
        log.info("normalisation of %s: mean %s, std %s (set data.mean/data.std to change)", which, mean, std)
    common = dict(seed=config.experiment.seed, style=d.style, image_size=d.image_size, mean=mean, std=std)
    common.update(
        auto_augment=d.auto_augment, color_jitter=d.color_jitter, re_prob=d.re_prob, crop_pct=d.crop_pct
    )
    if d.streaming:  # the stream's images go through the training transform of its head's dataset
        images = ImageClassificationDataset(train_hf_head, train=True, **common)
        train_set = StreamingImages(train_hf, num_train, images, d.shuffle_buffer)
    else:
        images = train_set = ImageClassificationDataset(train_hf, train=True, **common)
    train_input = TrainInput(
        train_set, num_classes, config.optim.label_smoothing, d.mixup, d.cutmix, pin_memory=d.pin_memory
    )
    eval_set = ImageClassificationDataset(eval_hf, train=False, **common)
    # BN statistics must match what the layers saw in training: by default recalibration draws its
    # batches through the training transform (with keys of its own, see recalibration_batches)
    if config.tickets.bn_recal_augment:
        bn_set = images
    elif images.in_memory:
        bn_set = copy.copy(images)  # shares the decoded images; no augmentation
        bn_set.train = False
    else:
        bn_set = ImageClassificationDataset(train_hf_head if d.streaming else train_hf, train=False, **common)
    plan = resolve_plan(config, len(train_set))
    return Prepared(
        config,
        model,
        target_names,
        train_set,
        eval_set,
        bn_set,
        plan,
        run_dir,
        splits.class_names,
        resume_from=resume_from,
        train_input=train_input,
    )


def place_data(prepared: Prepared, device: torch.device) -> None:
    """``data.on_device``: move the decoded images of every split to the model's ``device``, once."""
    if not prepared.config.data.on_device:
        return
    memo: dict = {}  # bn_set may share the training images: one copy on the device
    for dataset in (prepared.train_set, prepared.eval_set, prepared.bn_set):
        dataset.to(device, memo)
    if device.type != "cpu":
        log.info(
            "data.on_device: %.0f MB of images on %s", sum(t.nbytes for t in memo.values()) / 2**20, device
        )
