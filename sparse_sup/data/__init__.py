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
from .pipeline import KeyedMixup, TrainInput
from .sampler import EvalShardSampler, GlobalBatchSampler
from .transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALIZATION,
    KeyedErasing,
    Normalize,
    TimmTransform,
    crop_flip,
    crop_flip_batch,
    crop_flip_params,
    dataset_normalization,
    keyed_rng,
)

__all__ = [
    "BUNDLED_DIR",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EvalShardSampler",
    "GlobalBatchSampler",
    "ImageClassificationDataset",
    "KeyedErasing",
    "TimmTransform",
    "NORMALIZATION",
    "InMemoryLoader",
    "KeyedMixup",
    "TrainInput",
    "Normalize",
    "SplitDatasets",
    "crop_flip",
    "crop_flip_batch",
    "crop_flip_params",
    "dataset_normalization",
    "hash32",
    "keyed_rng",
    "load_split_datasets",
    "make_loader",
    "mix32",
    "recalibration_epoch",
    "sample_key",
    "sample_keys",
]
