"""Training input throughput: sparse_sup's keyed pipeline against ``timm.data.create_loader``.

Both read the same generated JPEG folder (CIFAR-10 images from the bundled split, upscaled to
``--src`` px and saved as JPEG, imagefolder layout) and run the same timm augmentation:
RandomResizedCrop + flip + RandAugment ``rand-m9-mstd0.5-inc1`` at ``--size`` px, random erasing
(p=0.25, per-pixel), mixup 0.8 / cutmix 1.0, normalisation on the device (``--device``).

* ``sparse_sup``: ``ImageClassificationDataset`` (style imagenet, HF imagefolder) +
  ``TrainInput.loader`` (uint8 batches from workers, pinned on a GPU) + ``TrainInput.to_device``
  (non_blocking copy, normalise, keyed erasing, keyed mixup) -- every draw from a sample key;
* ``timm``: ``timm.data.ImageDataset`` + ``create_loader(use_prefetcher=True)`` (uint8 from workers,
  timm's ``PrefetchLoader``: normalisation and erasing on the device) + ``timm.data.Mixup``,
  drawing from global RNGs.

Also the CIFAR-size path (``--cifar``): the in-memory gather (pad crop + flip on the device) against
the same dataset served per sample by DataLoader workers.

And BN recalibration's batches (``--recal``): the same JPEG folder through the training transform
(no mixup), one pass of ``recalibration_batches`` decoded in the main process (``data.num_workers=0``,
the only way before issue 19) against ``--workers`` DataLoader workers.

Images/s over ``--batches`` batches after ``--warmup``; the pipelines of a row alternate over
``--rounds`` rounds (rotating order) and the median is shown, so load from other processes on a shared
machine hits both alike. "per worker" divides by the worker count. A markdown table goes to stdout.

Usage: python bench/input_pipeline.py [--workers 1 2] [--batch 32] [--batches 8] [--rounds 5] [--cifar]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

AA, RE, MIXUP, CUTMIX = "rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0


def make_jpeg_folder(root: Path, n: int, src: int) -> Path:
    """``root/train/<class>/*.jpg`` and ``root/test/<class>/*.jpg`` from bundled CIFAR-10 images."""
    from PIL import Image

    from sparse_sup.data import load_split_datasets

    splits = load_split_datasets("bundled")
    for split, ds, count in (("train", splits.train, n), ("test", splits.eval, 8)):
        for i in range(count):
            row = ds[i]
            folder = root / split / splits.class_names[row["label"]]
            folder.mkdir(parents=True, exist_ok=True)
            image = row["image"].convert("RGB").resize((src, src), Image.Resampling.BICUBIC)
            image.save(folder / f"{i:05d}.jpg", quality=90)
    return root


def timed(batches, consume, warmup: int, count: int) -> float:
    """Images/s over ``count`` batches after ``warmup``."""
    it = iter(batches)
    for _ in range(warmup):
        consume(next(it))
    start, images = time.perf_counter(), 0
    for _ in range(count):
        images += consume(next(it))
    return images / (time.perf_counter() - start)


def ours(folder: Path, size: int, batch: int, workers: int, device, args):
    from sparse_sup.data import (
        GlobalBatchSampler,
        ImageClassificationDataset,
        TrainInput,
        load_split_datasets,
    )

    splits = load_split_datasets(str(folder))
    ds = ImageClassificationDataset(
        splits.train, train=True, style="imagenet", image_size=size, auto_augment=AA, re_prob=RE, seed=0
    )
    inp = TrainInput(ds, splits.num_classes, 0.1, MIXUP, CUTMIX)
    sampler = GlobalBatchSampler(len(ds), batch, seed=0)
    epochs, step = iter(range(10**6)), iter(range(10**9))

    def consume(b):
        x, y = inp.to_device(b, device, torch.float32, next(step))
        _sync(device, x)
        return len(x)

    def make():
        loader = inp.loader(sampler, workers)  # a new DataLoader: its workers end with it

        def forever():
            while True:
                sampler.set_epoch(next(epochs))
                yield from loader

        return forever(), consume

    return make


def timm_loader(folder: Path, size: int, batch: int, workers: int, device, args):
    from timm.data import ImageDataset, Mixup, create_loader

    ds = ImageDataset(str(folder / "train"))
    mix = Mixup(mixup_alpha=MIXUP, cutmix_alpha=CUTMIX, label_smoothing=0.1, num_classes=10)

    def consume(b):
        x, y = mix(*b)
        _sync(device, x)
        return len(x)

    def make():
        loader = create_loader(
            ds,
            input_size=(3, size, size),
            batch_size=batch,
            is_training=True,
            use_prefetcher=True,
            auto_augment=AA,
            re_prob=RE,
            re_mode="pixel",
            num_workers=workers,
            device=device,
            persistent_workers=True,
            pin_memory=device.type == "cuda",
        )

        def forever():
            while True:
                yield from loader

        return forever(), consume

    return make


def cifar(batch: int, workers: int, device, args) -> list:
    """[in-memory gather, DataLoader workers] on bundled CIFAR-10 at 32 px, pad crop + flip."""
    from torch.utils.data import DataLoader

    from sparse_sup.data import (
        GlobalBatchSampler,
        ImageClassificationDataset,
        TrainInput,
        load_split_datasets,
    )
    from sparse_sup.data.datasets import RawView

    ds = ImageClassificationDataset(load_split_datasets("bundled").train, train=True, seed=0)
    inp = TrainInput(ds, 10)
    sampler = GlobalBatchSampler(len(ds), batch, seed=0)

    def consume(b):
        x, _ = inp.to_device(b, device, torch.float32, 0)
        _sync(device, x)
        return len(x)

    def maker(build):
        def make():
            loader = build()

            def forever():
                while True:
                    yield from loader

            return forever(), consume

        return make

    return [
        maker(lambda: inp.loader(sampler, 0)),
        maker(
            lambda: DataLoader(
                RawView(ds), batch_sampler=sampler, num_workers=workers, persistent_workers=True
            )
        ),
    ]


def recal(folder: Path, size: int, batch: int, workers: int, device, args):
    """One BN recalibration pass over the JPEG folder (style imagenet, RandAugment + erasing), its
    batches decoded by ``workers`` DataLoader workers (0: the main process); a new pass per timing."""
    from sparse_sup.core.collectives import LOCAL
    from sparse_sup.data import ImageClassificationDataset, load_split_datasets
    from sparse_sup.train.evaluate import recalibration_batches

    splits = load_split_datasets(str(folder))
    ds = ImageClassificationDataset(
        splits.train, train=True, style="imagenet", image_size=size, auto_augment=AA, re_prob=RE, seed=0
    )
    counters = iter(range(10**6))

    def consume(x):
        _sync(device, x)
        return len(x)

    def make():
        args_ = (ds, batch, None, 0, LOCAL, device, torch.float32)
        return recalibration_batches(*args_, counter=next(counters), num_workers=workers), consume

    return make


def interleaved(makers: list, args, batches: int) -> list[float]:
    """Median images/s of each pipeline over ``--rounds`` rounds that time every pipeline once, in
    rotating order, so load from other processes on a shared machine hits all of them alike. Each
    timing builds a fresh loader and ends its workers after, so only one pipeline runs at a time."""
    rates: list[list[float]] = [[] for _ in makers]
    for r in range(args.rounds):
        for j in range(len(makers)):
            k = (j + r) % len(makers)
            it, consume = makers[k]()
            rates[k].append(timed(it, consume, args.warmup, batches))
            it.close()
            del it
            gc.collect()
    return [statistics.median(x) for x in rates]


class _Timed:
    """Wraps an iterable; adds the CPU time of this process spent in its ``next`` to ``self.cpu``."""

    def __init__(self, inner) -> None:
        self.inner, self.cpu = inner, 0.0

    def __iter__(self):
        it = iter(self.inner)
        while True:
            start = time.process_time()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self.cpu += time.process_time() - start
            yield item

    def __len__(self) -> int:
        return len(self.inner)


def cpu_cost(folder: Path, size: int, batch: int, device, batches: int) -> dict[str, tuple[float, float]]:
    """CPU ms per image of the host half (what one worker does: decode, PIL transforms, collate) and
    of the main-process half (normalise, erase, mixup; on the device when there is one), measured in
    one process (no workers) with ``time.process_time``: other load on a shared machine does not
    count, unlike wall-clock images/s."""
    from timm.data import ImageDataset, Mixup, create_loader

    from sparse_sup.data import (
        GlobalBatchSampler,
        ImageClassificationDataset,
        TrainInput,
        load_split_datasets,
    )

    out = {}
    splits = load_split_datasets(str(folder))
    ds = ImageClassificationDataset(
        splits.train, train=True, style="imagenet", image_size=size, auto_augment=AA, re_prob=RE, seed=0
    )
    inp = TrainInput(ds, splits.num_classes, 0.1, MIXUP, CUTMIX)
    sampler = GlobalBatchSampler(len(ds), batch, seed=0)
    host = _Timed(inp.loader(sampler, 0))
    start, n = time.process_time(), 0
    for step, b in zip(range(batches), host, strict=False):
        x, _ = inp.to_device(b, device, torch.float32, step)
        _sync(device, x)
        n += len(x)
    total = time.process_time() - start
    out["sparse_sup"] = (1e3 * host.cpu / n, 1e3 * (total - host.cpu) / n)

    loader = create_loader(
        ImageDataset(str(folder / "train")),
        input_size=(3, size, size),
        batch_size=batch,
        is_training=True,
        use_prefetcher=True,
        auto_augment=AA,
        re_prob=RE,
        re_mode="pixel",
        num_workers=0,
        device=device,
    )
    host = loader.loader = _Timed(loader.loader)  # timm's PrefetchLoader: the DataLoader inside
    mix = Mixup(mixup_alpha=MIXUP, cutmix_alpha=CUTMIX, label_smoothing=0.1, num_classes=10)
    start, n = time.process_time(), 0
    for _, b in zip(range(batches), loader, strict=False):
        x, _ = mix(*b)
        _sync(device, x)
        n += len(x)
    total = time.process_time() - start
    out["timm create_loader"] = (1e3 * host.cpu / n, 1e3 * (total - host.cpu) / n)
    return out


def _sync(device, x) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--images", type=int, default=512, help="JPEGs in the generated training folder")
    p.add_argument("--src", type=int, default=256, help="side of the generated JPEGs")
    p.add_argument("--size", type=int, default=224, help="training crop")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cifar", action="store_true", help="also time the CIFAR in-memory path")
    p.add_argument("--recal", action="store_true", help="also time BN recalibration's batches")
    p.add_argument("--smoke", action="store_true", help="seconds-long run of every part (tests)")
    args = p.parse_args()
    if args.smoke:
        args.workers, args.images, args.batches, args.warmup, args.rounds = [1], 32, 2, 1, 1
        args.batch, args.size, args.src = 8, 64, 80  # --cifar stays opt-in (decodes 10k images)
    torch.set_num_threads(1)
    np.random.seed(0)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_jpeg_folder(Path(tmp) / "jpegs", args.images, args.src)
        rows = []
        for w in args.workers:
            pipes = [ours(folder, args.size, args.batch, w, device, args)]
            pipes.append(timm_loader(folder, args.size, args.batch, w, device, args))
            rows.append((w, *interleaved(pipes, args, args.batches)))
        cost = cpu_cost(folder, args.size, args.batch, device, args.batches)
        cifar_rows = []
        for w in args.workers if args.cifar else []:
            pipes = cifar(args.batch * 4, w, device, args)
            cifar_rows.append((w, *interleaved(pipes, args, args.batches * 4)))
        recal_rows, recal_batches = [], args.images // args.batch - args.warmup  # one pass each
        if args.recal and recal_batches < 1:
            p.error(f"--recal: --images {args.images} hold {args.images // args.batch} batches, <= --warmup")
        for w in args.workers if args.recal else []:
            pipes = [recal(folder, args.size, args.batch, n, device, args) for n in (0, w)]
            recal_rows.append((w, *interleaved(pipes, args, recal_batches)))
    host = f"{os.cpu_count()} CPUs"
    print(
        f"\n{datetime.date.today()}, device {device}, {host}, torch {torch.__version__}, batch {args.batch}, "
        f"{args.images} JPEGs {args.src}px -> {args.size}px, {AA} + RE {RE} + mixup {MIXUP}/cutmix {CUTMIX}\n"
    )
    print("CPU time per image, one process (robust to other load):\n")
    print("| pipeline | host half (one worker) ms/img | main-process half ms/img | images/s per worker |")
    print("|---|---|---|---|")
    for name, (h, d) in cost.items():
        print(f"| {name} | {h:.2f} | {d:.2f} | {1e3 / h:.0f} |")
    print("\nWall clock with DataLoader workers (median of rounds; noisy on a shared machine):\n")
    print("| workers | sparse_sup img/s | per worker | timm create_loader img/s | per worker | ratio |")
    print("|---|---|---|---|---|---|")
    for w, a, b in rows:
        print(f"| {w} | {a:.0f} | {a / w:.0f} | {b:.0f} | {b / w:.0f} | {a / b:.2f} |")
    if cifar_rows:
        title = f"CIFAR-10 32px, pad crop + flip, batch {args.batch * 4}"
        columns = ("in-memory gather img/s (main process)", "DataLoader workers img/s", "ratio")
        paired_table(title, columns, [(w, a, b, a / b) for w, a, b in cifar_rows])
    if recal_rows:
        title = f"BN recalibration batches, {args.size}px, batch {args.batch}, {recal_batches} per pass"
        columns = ("main process img/s", "DataLoader workers img/s", "workers / main process")
        paired_table(title, columns, [(w, a, b, b / a) for w, a, b in recal_rows])


def paired_table(title: str, columns: tuple[str, str, str], rows: list[tuple]) -> None:
    """Rows of (workers, img/s, img/s, ratio) under ``title``."""
    print(f"\n{title}:\n\n| workers | {' | '.join(columns)} |\n|---|---|---|---|")
    for w, a, b, ratio in rows:
        print(f"| {w} | {a:.0f} | {b:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
