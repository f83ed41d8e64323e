"""``data.streaming``: the training split read as a stream -- parquet files or WebDataset ``.tar``
shards through ``datasets``' iterable loaders -- into the same loop as the map-style path.

Kept: uint8 batches and the device-side finish, keyed per-sample augmentation, sharding over ranks
(``datasets.distributed.split_dataset_by_node``: whole files when their number divides by the
ranks, else every W-th sample) and over DataLoader workers (``datasets`` hands each worker its own
files), and exact mid-epoch resume (a resumed epoch reads its first micro-batches again and drops
them, so it continues with the very samples the interrupted run would have used).

Given up: the order is the stream's (files shuffled, then a shuffle buffer, both reseeded every
epoch), so which samples form a step, and the keys of their augmentations, depend on the world
size and the number of workers; a map-style run's do not. BatchNorm recalibration draws from the
first samples of the stream, kept in memory (the same set on every rank); evaluation reads the
evaluation split map-style. A parquet stream ends with ``datasets``' 5 s pause for pyarrow's
threads (arrow issue 45214): once per epoch and rank.
"""

from __future__ import annotations

import itertools
import logging
import tarfile
from collections.abc import Iterator
from pathlib import Path

import datasets as hf
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config.errors import ConfigError
from .datasets import BUNDLED_DIR, ImageClassificationDataset, split_files
from .keys import mix32, sample_key
from .sampler import GlobalBatchSampler

log = logging.getLogger(__name__)

_SHUFFLE_SALT = 0x53545245  # "STRE"


def stream_size(source: str, split: str) -> int | None:
    """Samples in the ``split`` files of a local ``source`` without reading them: parquet footers
    (row counts), or the sample keys of tar shards (member headers). None for other layouts."""
    root = BUNDLED_DIR if source == "bundled" else Path(source).expanduser()
    if any(root.rglob("*.parquet")):
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in split_files(root, [split], "parquet")[split])
    if any(root.rglob("*.tar")):
        total = 0
        for f in split_files(root, [split], "tar")[split]:
            with tarfile.open(f) as tar:  # WebDataset: a sample is the members sharing a name up to "."
                total += len({m.name.split(".", 1)[0] for m in tar if m.isfile()})
        return total
    return None


def stream_head(stream: hf.IterableDataset, num_samples: int) -> hf.Dataset:
    """The first ``num_samples`` rows of ``stream`` (columns ``image``, ``label``) in memory: the
    BatchNorm recalibration set of a streamed run, the same on every rank."""
    rows = list(itertools.islice(iter(stream), num_samples))
    features = hf.Features({"image": hf.Image(), "label": hf.Value("int64")})
    rows = [{"image": r["image"], "label": int(r["label"])} for r in rows]
    return hf.Dataset.from_list(rows, features=features)


class StreamingImages:
    """The training set of a ``data.streaming`` run: ``stream`` (rows ``image``, ``label``) of
    ``num_samples`` samples, each image through ``transforms`` (an ``ImageClassificationDataset``
    built with the run's training transform: its per-sample PIL half and its device half)."""

    in_memory = False

    def __init__(
        self,
        stream: hf.IterableDataset,
        num_samples: int,
        transforms: ImageClassificationDataset,
        shuffle_buffer: int,
    ) -> None:
        self.stream, self.num_samples, self.transforms = stream, num_samples, transforms
        self.shuffle_buffer = shuffle_buffer
        self.seed = transforms.seed

    def __len__(self) -> int:
        return self.num_samples

    def finish(self, images: torch.Tensor, skeys: torch.Tensor) -> torch.Tensor:
        return self.transforms.finish(images, skeys)

    def host_loader(self, sampler: GlobalBatchSampler, num_workers: int, pin_memory: bool) -> _StreamLoader:
        return _StreamLoader(self, sampler, num_workers, pin_memory)

    def epoch_stream(self, epoch: int, rank: int, world_size: int) -> hf.IterableDataset:
        """This rank's part of the epoch's shuffled stream."""
        from datasets.distributed import split_dataset_by_node

        ds = self.stream.shuffle(seed=mix32(self.seed, _SHUFFLE_SALT), buffer_size=self.shuffle_buffer)
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        ds.set_epoch(epoch)  # after the split, which drops it: reseeds the file order and the buffer
        return ds


class _KeyedRows(IterableDataset):
    """Rows of a rank's stream as ``(uint8 image, label, sample key)``, decoded in the workers. The
    ``j``-th row a worker reads is sample ``(j * workers + worker) * W + rank`` of the epoch: a key
    no other row of the epoch shares."""

    def __init__(self, rows: hf.IterableDataset, transforms: ImageClassificationDataset, epoch, rank, world):
        self.rows, self.transforms = rows, transforms
        self.epoch, self.rank, self.world = epoch, rank, world

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for j, row in enumerate(self.rows):
            index = (j * workers + worker) * self.world + self.rank
            key = (self.epoch, index)
            image = self.transforms.transform_image(row["image"], key)
            yield image, int(row["label"]), sample_key(self.transforms.seed, self.epoch, index)


class _StreamLoader:
    """The micro-batches of the sampler's current epoch on this rank, from its start step on."""

    def __init__(self, images: StreamingImages, sampler: GlobalBatchSampler, num_workers: int, pin: bool):
        self.images, self.sampler, self.num_workers, self.pin = images, sampler, num_workers, pin

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        s = self.sampler
        rows = self.images.epoch_stream(s.epoch, s.rank, s.world_size)
        keyed = _KeyedRows(rows, self.images.transforms, s.epoch, s.rank, s.world_size)
        loader = DataLoader(
            keyed,
            batch_size=s.micro_batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin,
            drop_last=True,
            # every iter() draws a base seed; from the global RNG (dropout's) a resumed run, which
            # builds this epoch's iterator once more, would see other dropout than the uninterrupted one
            generator=torch.Generator().manual_seed(0),
        )
        batches = iter(loader)
        needed = s.steps_per_epoch * s.grad_accum_steps
        for n in range(needed):
            batch = next(batches, None)
            if batch is None:
                raise ConfigError(
                    f"data.streaming: rank {s.rank}'s part of the training stream ended after {n} of its "
                    f"{needed} micro-batches of epoch {s.epoch}: its files hold fewer samples than "
                    f"{len(self.images)} / {s.world_size} (whole files go to each rank when their number "
                    "divides by the ranks). Use files of equal size, or a number of files the ranks do not "
                    "divide (then every rank takes every W-th sample), or set data.train_samples lower"
                )
            if n >= s.start_step * s.grad_accum_steps:  # a resumed epoch drops what it had consumed
                yield batch

    def __len__(self) -> int:
        return len(self.sampler)
