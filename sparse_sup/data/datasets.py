"""Loading image-classification splits and serving keyed, augmented batches.

``load_split_datasets`` returns Hugging Face datasets with exactly two columns, ``image`` and
``label``. ``ImageClassificationDataset`` is indexed by ``(epoch, index)`` keys (see ``sampler``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import datasets as hf
import huggingface_hub.constants
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ..config.errors import ConfigError
from .keys import sample_key, sample_keys
from .transforms import CIFAR10_MEAN, CIFAR10_STD, KeyedErasing, Normalize, TimmTransform, crop_flip_batch

log = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled" / "cifar10-mini"
IMAGE_NAMES = ("img", "image", "images", "pixel_values", "jpg", "jpeg", "png", "webp")  # + WebDataset's
LABEL_NAMES = ("label", "labels", "fine_label", "target", "cls")

Key = tuple[int, int]


class SplitDatasets(NamedTuple):
    train: hf.Dataset | hf.IterableDataset  # a stream with ``streaming=True``
    eval: hf.Dataset
    num_classes: int
    class_names: list[str]


# ----------------------------------------------------------------------------- loading splits


def load_split_datasets(
    source: str,
    image_column: str | None = None,
    label_column: str | None = None,
    train_split: str = "train",
    eval_split: str = "test",
    cache_dir: str | None = None,
    streaming: bool = False,
) -> SplitDatasets:
    """Load train/eval splits from ``"bundled"``, a local folder (parquet files, WebDataset ``.tar``
    shards or imagefolder layout) or a hub dataset name already in the local cache (never downloads).

    Image/label columns are detected when not given; the returned datasets have the columns renamed
    to ``image`` and ``label``. ``streaming``: the training split is read as an iterable (local
    folders only), the evaluation split as usual.
    """
    splits = (train_split, eval_split)
    if source == "bundled":
        if not BUNDLED_DIR.is_dir():
            raise FileNotFoundError(
                f"bundled CIFAR-10 mini split missing at {BUNDLED_DIR} (package data not installed?)"
            )
        dsd = _load_local(BUNDLED_DIR, splits, cache_dir, streaming)
    elif os.path.exists(os.path.expanduser(source)):
        dsd = _load_local(Path(source).expanduser(), splits, cache_dir, streaming)
    elif _looks_like_path(source):
        raise FileNotFoundError(f"dataset path does not exist: {os.path.abspath(os.path.expanduser(source))}")
    elif streaming:
        raise ConfigError(
            f"data.streaming=true with data.source={source!r}: streaming reads local files (parquet, "
            "WebDataset .tar shards or an image folder); hub downloads are impossible here. Pass the "
            "folder that holds the files, or data.streaming=false for a dataset in the local cache"
        )
    else:
        dsd = _load_hub_cached(source, cache_dir)

    missing = [s for s in splits if s not in dsd]
    if missing:
        raise ConfigError(f"split(s) {missing} not found in {source!r}; available splits: {list(dsd)}")
    train, eval_ = dsd[train_split], dsd[eval_split]
    features = eval_.features if streaming else train.features  # a stream may not know its own yet
    image_column = _pick_column(features, image_column, hf.Image, IMAGE_NAMES, "image")
    label_column = _pick_column(features, label_column, hf.ClassLabel, LABEL_NAMES, "label")
    lacking = {image_column, label_column} - set(eval_.column_names)
    if lacking:
        raise ConfigError(
            f"split {eval_split!r} lacks column(s) {sorted(lacking)}; columns: {eval_.column_names}"
        )

    class_names = _class_names(eval_ if streaming else train, eval_, label_column)
    train, eval_ = (_canonical(ds, image_column, label_column) for ds in (train, eval_))
    log.info(
        "loaded %r: %s train / %d eval examples, %d classes (image=%r, label=%r)",
        source,
        "a stream of" if streaming else len(train),
        len(eval_),
        len(class_names),
        image_column,
        label_column,
    )
    return SplitDatasets(train, eval_, len(class_names), class_names)


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or source.endswith(".parquet")


FILE_BUILDERS = {"parquet": "parquet", "tar": "webdataset"}  # file suffix -> datasets builder


def _load_local(root: Path, splits: Sequence[str], cache_dir: str | None, streaming: bool = False) -> dict:
    """``{split: dataset}`` of a local folder; with ``streaming`` the first split is a stream."""
    if not root.is_dir():
        raise ConfigError(f"expected a directory of parquet files or an imagefolder tree, got file {root}")
    suffix = next((x for x in FILE_BUILDERS if any(root.rglob(f"*.{x}"))), None)
    if suffix is not None:
        builder, files = FILE_BUILDERS[suffix], split_files(root, splits, suffix)
    else:
        log.info("no parquet or tar files under %s: loading it as an imagefolder", root)
        builder, files = "imagefolder", None
    if not streaming:
        if files is None:
            return hf.load_dataset("imagefolder", data_dir=str(root), cache_dir=cache_dir)
        return hf.load_dataset(builder, data_files=files, cache_dir=cache_dir)
    train, eval_ = splits
    where = {"data_dir": str(root)} if files is None else {"data_files": files}
    stream = hf.load_dataset(builder, **where, streaming=True)
    if train not in stream:
        return {}  # the caller names the missing split
    if files is None:
        evaluation = hf.load_dataset("imagefolder", data_dir=str(root), cache_dir=cache_dir, split=eval_)
    else:
        evaluation = hf.load_dataset(builder, data_files={eval_: files[eval_]}, cache_dir=cache_dir)[eval_]
    return {train: stream[train], eval_: evaluation}


def split_files(root: Path, splits: Sequence[str], suffix: str = "parquet") -> dict[str, list[str]]:
    """The ``.<suffix>`` files of each split: those named ``<split>*.<suffix>`` or under a
    ``<split>/`` folder."""
    files = sorted(root.rglob(f"*.{suffix}"))
    data_files = {}
    for split in splits:
        chosen = [
            str(f)
            for f in files
            if split in f.relative_to(root).parts[:-1]
            or f.stem == split
            or f.stem.startswith((f"{split}-", f"{split}_", f"{split}."))
        ]
        if not chosen:
            found = [str(f.relative_to(root)) for f in files]
            raise FileNotFoundError(f"no {suffix} files for split {split!r} under {root}; found: {found}")
        data_files[split] = chosen
    return data_files


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Force offline mode for the duration of one load, whatever the environment says."""
    saved = hf.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    hf.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _load_hub_cached(name: str, cache_dir: str | None) -> hf.DatasetDict:
    cache = cache_dir or hf.config.HF_DATASETS_CACHE
    try:
        with _hub_offline():
            return hf.load_dataset(name, cache_dir=cache_dir)
    except (OSError, ValueError) as err:  # ConnectionError / FileNotFoundError / cache mismatch
        raise FileNotFoundError(
            f"dataset {name!r} is not a local path and is not in the local Hugging Face datasets "
            f"cache ({cache}). Hub downloads are impossible here (offline mode). Pass a local folder "
            "(parquet files, or an imagefolder tree root/train/<class>/*.png, root/test/<class>/...), "
            f"use 'bundled', or pre-download it on a connected machine with "
            f"datasets.load_dataset({name!r}) and copy the cache directory (HF_HOME) here. "
            f"Loader said: {type(err).__name__}: {err}"
        ) from err


def _pick_column(
    features: hf.Features, given: str | None, kind: type, names: Sequence[str], what: str
) -> str:
    if given is not None:
        if given not in features:
            raise ConfigError(f"{what} column {given!r} not found; columns: {list(features)}")
        return given
    for name, feature in features.items():
        if isinstance(feature, kind):
            return name
    for name in names:
        if name in features:
            return name
    raise ConfigError(f"cannot detect the {what} column among {list(features)}; pass {what}_column=")


def _class_names(train: hf.Dataset, eval_: hf.Dataset, label_column: str) -> list[str]:
    feature = train.features[label_column]
    if isinstance(feature, hf.ClassLabel):
        other = eval_.features[label_column]
        if isinstance(other, hf.ClassLabel) and other.names != feature.names:
            raise ConfigError(f"train and eval class names differ: {feature.names} vs {other.names}")
        return list(feature.names)
    labels = _label_array(train, label_column)
    log.warning("label column %r is not a ClassLabel: using classes 0..%d", label_column, labels.max())
    return [str(i) for i in range(int(labels.max()) + 1)]


def _label_array(ds: hf.Dataset, label_column: str) -> np.ndarray:
    """Labels as int64 without touching (decoding) the other columns."""
    return np.asarray(ds.select_columns([label_column]).with_format("numpy")[:][label_column], dtype=np.int64)


def _canonical(ds: hf.Dataset, image_column: str, label_column: str) -> hf.Dataset:
    ds = ds.select_columns([image_column, label_column])
    feature = (ds.features or {}).get(image_column)
    if isinstance(feature, dict) and "bytes" in feature:  # encoded images without datasets' metadata
        ds = ds.cast_column(image_column, hf.Image())
    renames = {old: new for old, new in ((image_column, "image"), (label_column, "label")) if old != new}
    return ds.rename_columns(renames) if renames else ds


# ----------------------------------------------------------------------------- keyed dataset


def _to_rgb(image: Image.Image, size: int | None = None) -> Image.Image:
    image = image.convert("RGB")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return image


def _pil_to_uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


class ImageClassificationDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by ``(epoch, index)``; returns ``(float32 [3,H,W], label)``.

    Two halves, so the same numbers come out on the host or on the device: ``raw_batch`` (host,
    workers: decode + timm's per-sample PIL transforms, uint8) and ``finish`` (any device: CIFAR's
    padded crop + flip, normalisation, random erasing). Every draw comes from the sample key.

    ``style='cifar'``: pad-crop + flip on uint8 tensors (images resized to ``image_size`` if they
    differ); with ``image_size <= 64`` all images are decoded once into memory and ``raw_batch``
    is one gather (the fast path; a timm policy, ``auto_augment`` / ``color_jitter``, then runs per
    sample on PIL images). ``style='imagenet'``: lazy decoding with ``timm.data.create_transform``.
    """

    def __init__(
        self,
        hf_dataset: hf.Dataset,
        image_column: str = "image",
        label_column: str = "label",
        train: bool = True,
        seed: int = 0,
        style: Literal["cifar", "imagenet"] = "cifar",
        image_size: int = 32,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        padding: int = 4,
        auto_augment: str | None = None,
        color_jitter: float = 0.0,
        re_prob: float = 0.0,
        crop_pct: float | None = None,
    ) -> None:
        if style not in ("cifar", "imagenet"):
            raise ValueError(f"style must be 'cifar' or 'imagenet', got {style!r}")
        self.images_hf = hf_dataset.select_columns([image_column])
        self._raw_rows: hf.Dataset | None = None  # the image column undecoded (see _decode)
        self.image_column = image_column
        self.train, self.seed, self.style = train, seed, style
        self.image_size, self.padding = image_size, padding
        self.labels = torch.from_numpy(_label_array(hf_dataset, label_column))
        self.normalize = Normalize(mean, std)
        self.pil_transform = TimmTransform(
            train, image_size, style, auto_augment=auto_augment, color_jitter=color_jitter, crop_pct=crop_pct
        )
        self.erase = KeyedErasing(re_prob) if re_prob > 0 else None
        self.in_memory = style == "cifar" and image_size <= 64
        self.images: torch.Tensor | None = self._decode_all() if self.in_memory else None

    def _decode_all(self) -> torch.Tensor:
        start = time.perf_counter()
        arrays = []
        for batch in self.images_hf.iter(batch_size=1000):
            arrays += [np.asarray(_to_rgb(im, self.image_size)) for im in batch[self.image_column]]
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        log.info(
            "decoded %d images %s in %.2fs", len(images), tuple(images.shape[1:]), time.perf_counter() - start
        )
        return images

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device, memo: dict | None = None) -> ImageClassificationDataset:
        """Keep the decoded images and the labels on ``device`` (``data.on_device``): every batch is
        then gathered there. ``memo`` maps a tensor's ``id`` to its copy, so datasets that share images
        (``copy.copy``) share the device copy too."""
        if self.images is None:
            raise ValueError(
                "only in-memory images (style='cifar', image_size <= 64) can be kept on a device"
            )
        memo = {} if memo is None else memo
        for name in ("images", "labels"):
            tensor = getattr(self, name)
            if id(tensor) not in memo:
                memo[id(tensor)] = tensor.to(device)
            setattr(self, name, memo[id(tensor)])
        return self

    def _decode(self, index: int) -> Image.Image:
        """One image, opened by PIL from the file or bytes the Arrow row holds: the ``datasets``
        formatter (Image feature decode) costs ~1.5 ms more per row than the decode itself."""
        if self._raw_rows is None:
            feature = self.images_hf.features[self.image_column]
            if not isinstance(feature, hf.Image):  # arrays or the like: let datasets decode
                return self.images_hf[index][self.image_column]
            self._raw_rows = self.images_hf.cast_column(self.image_column, hf.Image(decode=False))
        row = self._raw_rows[index][self.image_column]
        source = io.BytesIO(row["bytes"]) if row.get("bytes") is not None else row["path"]
        image = Image.open(source)
        image.load()
        return image

    # ---- host half: uint8 -------------------------------------------------------------------
    def raw(self, key: Key) -> torch.Tensor:
        """uint8 [3,H,W] of one sample after decoding and the per-sample PIL transforms."""
        if self.images is not None:
            return self._policy(self.images[key[1]], key)
        return self.transform_image(self._decode(key[1]), key)

    def transform_image(self, image: Image.Image, key: Key) -> torch.Tensor:
        """uint8 [3,H,W] of a decoded image under sample key ``key`` (the per-sample PIL transforms;
        also what a stream of this dataset's images goes through, ``data.streaming``)."""
        if self.style == "imagenet":
            return self.pil_transform(_to_rgb(image), sample_key(self.seed, *key))
        return self._policy(_pil_to_uint8(_to_rgb(image, self.image_size)), key)

    def _policy(self, image: torch.Tensor, key: Key) -> torch.Tensor:
        """CIFAR style: a timm policy (``auto_augment`` / ``color_jitter``) on the uint8 image, if any."""
        if self.pil_transform.transform is None:
            return image
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        return self.pil_transform(pil, sample_key(self.seed, *key))

    def raw_batch(self, keys: Sequence[Key]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(uint8 images [B,3,H,W], int64 labels [B], int64 sample keys [B]): what crosses to the
        device. The in-memory fast path is one gather."""
        epochs, indices = torch.tensor(keys, dtype=torch.int64).reshape(-1, 2).unbind(1)
        skeys = sample_keys(self.seed, epochs, indices)
        if self.images is not None and self.pil_transform.transform is None:
            at = indices.to(self.images.device, non_blocking=True)  # images on the GPU: gather there
            return self.images[at], self.labels[at], skeys
        return torch.stack([self.raw(k) for k in keys]), self.labels[indices], skeys

    def host_loader(self, batch_sampler: Iterable[Sequence[Key]], num_workers: int, pin_memory: bool):
        """Training's host loader: ``(uint8 images, labels, sample keys)`` per micro-batch of keys."""
        if self.in_memory:
            return _MainProcessLoader(self, batch_sampler, pin_memory)
        return DataLoader(
            RawView(self),
            batch_sampler=batch_sampler,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            # the workers' base seed is drawn from this generator, not from the global RNG that
            # dropout uses; augmentation draws from sample keys, so the base seed changes no result
            generator=torch.Generator().manual_seed(0),
        )

    # ---- device half: float -----------------------------------------------------------------
    def finish(self, images: torch.Tensor, skeys: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] (host or device) -> normalised float32: CIFAR crop + flip, normalise,
        random erasing, each drawn from the sample keys ``skeys`` [B]."""
        if self.train and self.style == "cifar":
            images = crop_flip_batch(images, skeys, self.padding)
        images = self.normalize(images)
        if self.train and self.erase is not None:
            images = self.erase(images, skeys)
        return images

    # ---- both: the float API (evaluation, BN recalibration, tests) ------------------------------
    def __getitem__(self, key: Key) -> tuple[torch.Tensor, int]:
        images, labels, skeys = self.raw_batch([key])
        return self.finish(images, skeys)[0], int(labels[0])

    def get_batch(self, keys: Sequence[Key]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images float32 [B,3,H,W] and labels int64 [B] for a list of keys."""
        images, labels, skeys = self.raw_batch(keys)
        return self.finish(images, skeys), labels


class RawView(torch.utils.data.Dataset):
    """A dataset's host half for DataLoader workers: ``key -> (uint8 [3,H,W], label, sample key)``."""

    def __init__(self, dataset: ImageClassificationDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, int, int]:
        epoch, index = key
        return (
            self.dataset.raw(key),
            int(self.dataset.labels[index]),
            sample_key(self.dataset.seed, epoch, index),
        )


# ----------------------------------------------------------------------------- loaders


class _MainProcessLoader:
    """In-memory datasets: one gather per batch in the main process (no workers, no collate)."""

    def __init__(self, dataset: ImageClassificationDataset, batch_sampler, pin_memory: bool) -> None:
        self.dataset, self.batch_sampler, self.pin_memory = dataset, batch_sampler, pin_memory

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for keys in self.batch_sampler:
            images, labels, skeys = self.dataset.raw_batch(keys)
            if self.pin_memory and images.device.type == "cpu":  # not for images kept on the GPU
                images, labels, skeys = images.pin_memory(), labels.pin_memory(), skeys.pin_memory()
            yield images, labels, skeys

    def __len__(self) -> int:
        return len(self.batch_sampler)


class InMemoryLoader:
    """Batches straight from ``dataset.get_batch`` in the main process (no workers, no collate)."""

    def __init__(
        self,
        dataset: ImageClassificationDataset,
        batch_sampler: Iterable[Sequence[Key]],
        pin_memory: bool = False,
    ) -> None:
        self.dataset, self.batch_sampler, self.pin_memory = dataset, batch_sampler, pin_memory

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for keys in self.batch_sampler:
            images, labels = self.dataset.get_batch(keys)
            yield (images.pin_memory(), labels.pin_memory()) if self.pin_memory else (images, labels)

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]


def make_loader(
    dataset: ImageClassificationDataset,
    batch_sampler: Iterable[Sequence[Key]],
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Iterable of ``(images, labels)``; re-iterate it after ``batch_sampler.set_epoch``.

    In-memory datasets are served by ``get_batch`` in the main process (``num_workers`` ignored).
    """
    pin_memory = pin_memory and torch.cuda.is_available()
    if dataset.in_memory:
        return InMemoryLoader(dataset, batch_sampler, pin_memory)
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        # every iter() draws the workers' base seed from this generator; without one it draws from the
        # global RNG that dropout uses, and a resumed run (one iterator more) would see other dropout.
        # Augmentation draws from per-sample keys, so the base seed changes no result.
        generator=torch.Generator().manual_seed(0),
    )
