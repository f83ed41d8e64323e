"""``data.streaming``: a rank's part of each epoch's stream, through real ``datasets`` iterable
loaders and torch DataLoader workers. Rows carry their own id as the label, so which samples a
rank sees can be read off the batches."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import datasets as hf
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sparse_sup.config import ConfigError, load_config
from sparse_sup.data import GlobalBatchSampler, ImageClassificationDataset, load_split_datasets
from sparse_sup.data.streaming import StreamingImages, stream_head, stream_size
from sparse_sup.train.setup import check_streaming

ROOT = Path(__file__).resolve().parents[2]
N = 96  # training rows: ids 0..95


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(root: Path, files: int) -> Path:
    """``files`` training parquet files holding rows 0..N-1 (label = id) and one test file."""
    root.mkdir(parents=True, exist_ok=True)
    per = N // files
    for f in range(files):
        ids = range(f * per, (f + 1) * per)
        table = pa.table({"image": [{"bytes": png(i), "path": None} for i in ids], "label": list(ids)})
        pq.write_table(table, root / f"train-{f:05d}-of-{files:05d}.parquet")
    table = pa.table({"image": [{"bytes": png(i), "path": None} for i in range(8)], "label": list(range(8))})
    pq.write_table(table, root / "test-00000-of-00001.parquet")
    return root


def write_tars(root: Path, files: int) -> Path:
    """The same rows as WebDataset shards: ``<key>.png`` + ``<key>.cls`` per sample."""
    root.mkdir(parents=True, exist_ok=True)
    per = N // files

    def shard(path: Path, ids) -> None:
        with tarfile.open(path, "w") as tar:
            for i in ids:
                for suffix, data in (("png", png(i)), ("cls", str(i).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))

    for f in range(files):
        shard(root / f"train-{f:05d}.tar", range(f * per, (f + 1) * per))
    shard(root / "test-00000.tar", range(8))
    return root


def streamed(root: Path, buffer: int = 16) -> StreamingImages:
    splits = load_split_datasets(str(root), streaming=True)
    head = ImageClassificationDataset(stream_head(splits.train, 4), train=True, seed=3, image_size=8)
    return StreamingImages(splits.train, stream_size(str(root), "train"), head, buffer)


def epoch_ids(images: StreamingImages, world: int, rank: int, epoch: int, start: int = 0, workers: int = 0):
    """The ids of the samples one rank reads in ``epoch`` from optimizer step ``start`` on."""
    sampler = GlobalBatchSampler(len(images), 16, world, rank, grad_accum_steps=2, seed=3)
    sampler.set_epoch(epoch, start)
    batches = list(images.host_loader(sampler, workers, False))
    assert len(batches) == len(sampler)
    assert all(b[0].shape == (4 if world == 2 else 8, 3, 8, 8) for b in batches)
    return [int(i) for _, labels, _ in batches for i in labels]


@pytest.mark.parametrize(
    "layout, files, workers, epochs",
    # every parquet stream ends with datasets' 5 s pause for pyarrow's threads: one epoch of it
    [("tar", 4, 0, 2), ("tar", 4, 2, 2), ("tar", 3, 0, 2), ("tar", 3, 2, 2), ("parquet", 4, 0, 1)],
)
def test_each_epoch_reads_every_sample_at_most_once_over_the_ranks(tmp_path, layout, files, workers, epochs):
    """4 files over 2 ranks: whole files per rank; 3 files: every 2nd sample per rank. The ranks'
    samples never overlap and fill the epoch's 6 steps x 16, a resumed epoch continues with exactly
    the samples the whole epoch would have read, and the order changes every epoch."""
    root = (write_parquet if layout == "parquet" else write_tars)(tmp_path / layout, files)
    images = streamed(root)
    assert len(images) == N
    for epoch in range(epochs):
        ranks = [epoch_ids(images, 2, r, epoch, workers=workers) for r in (0, 1)]
        seen = ranks[0] + ranks[1]
        assert len(seen) == len(set(seen)) == 6 * 16 and set(seen) <= set(range(N))
        resumed = epoch_ids(images, 2, 1, epoch, start=4, workers=workers)
        assert resumed == ranks[1][-len(resumed) :] and len(resumed) == 2 * 2 * 4
    if epochs > 1:
        orders = [epoch_ids(images, 1, 0, e, workers=workers) for e in (0, 1)]
        assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1]) == list(range(N))


def test_sample_keys_are_unique_and_the_images_are_the_rows(tmp_path):
    images = streamed(write_tars(tmp_path / "t", 2))
    sampler = GlobalBatchSampler(N, 16, 1, 0, seed=3)
    raw, labels, keys = next(iter(images.host_loader(sampler, 0, False)))
    assert len(set(keys.tolist())) == len(keys)
    for image, label in zip(raw, labels):
        assert (image == int(label)).all()  # uint8 of the row's own image (no crop on the host)


def test_a_rank_whose_files_run_short_is_told_why(tmp_path):
    images = streamed(write_tars(tmp_path / "t", 2))
    images.num_samples = 2 * N  # claims more samples than the files hold
    sampler = GlobalBatchSampler(len(images), 16, 2, 0, grad_accum_steps=2, seed=3)
    with pytest.raises(ConfigError, match="rank 0's part of the training stream ended after 12 of its 24"):
        list(images.host_loader(sampler, 0, False))


def test_streaming_refuses_what_it_cannot_do(tmp_path):
    config = load_config(ROOT / "configs" / "tiny-test.yaml", ["--data.streaming=true"])
    config.tickets.bn_recal_batches = None
    with pytest.raises(ConfigError, match="tickets.bn_recal_batches=null"):
        check_streaming(config)
    with pytest.raises(ConfigError, match="streaming reads local files"):
        load_split_datasets("some/hub-dataset", streaming=True)
    assert isinstance(load_split_datasets("bundled", streaming=True).train, hf.IterableDataset)


def test_an_epochs_loader_leaves_the_global_rng_alone(tmp_path):
    """Dropout draws from the global RNG, and a resumed run builds its epoch's loader once more than
    the uninterrupted run: the loader must not draw from it (with 0 and 2 workers)."""
    import torch

    images = streamed(write_tars(tmp_path / "t", 2))
    for workers in (0, 2):
        torch.manual_seed(0)
        expected = torch.rand(1)
        torch.manual_seed(0)
        list(images.host_loader(GlobalBatchSampler(N, 16, 1, 0, seed=3), workers, False))
        assert torch.equal(torch.rand(1), expected), workers
