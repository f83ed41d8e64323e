"""Data loading: splits, keyed augmentation and rank-independent batch sampling."""

from .datasets import (
    BUNDLED_DIR,
    ImageClassificationDataset,
    InMemoryLoader,
    SplitDatasets,
    load_split_datasets,
    make_loader,
)
from .keys import hash32, mix32, recalibration_epoch, sample_key, sample_keys
from .sampler import EvalShardSampler, GlobalBatchSampler
from .transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageNetTransform,
    Normalize,
    crop_flip,
    crop_flip_batch,
    crop_flip_params,
)

__all__ = [
    "BUNDLED_DIR",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EvalShardSampler",
    "GlobalBatchSampler",
    "ImageClassificationDataset",
    "ImageNetTransform",
    "InMemoryLoader",
    "Normalize",
    "SplitDatasets",
    "crop_flip",
    "crop_flip_batch",
    "crop_flip_params",
    "hash32",
    "load_split_datasets",
    "make_loader",
    "mix32",
    "recalibration_epoch",
    "sample_key",
    "sample_keys",
]
