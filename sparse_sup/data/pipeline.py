"""The training input path, timm-prefetcher style: uint8 batches on the host (workers, or one gather
for in-memory CIFAR), pinned and copied ``non_blocking``; crop/flip, normalisation, random erasing and
mixup/cutmix on the device. Every draw is keyed -- per sample by ``(seed, epoch, index)``, mixup per
optimizer step by ``(seed, step)`` -- so a global batch comes out the same at any world size,
accumulation and worker count.

Mixup pairs: timm's ``Mixup`` mixes a batch with its reverse (``x.flip(0)``), which would pair samples
across whatever the local micro-batch happens to be. Here the micro-batch is reordered so that
the reverse pairs each even position ``2k`` of the global batch with ``2k+1``; one ``Mixup`` call
(one ``lam``, one cutmix box per step, drawn from the step key) then mixes exactly the same pairs at
any world size, and the batch is put back in order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .datasets import ImageClassificationDataset, RawView
from .keys import mix32

Key = tuple[int, int]
HostBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # uint8 images, labels, sample keys

_MIX_SALT = 0x4D495855  # "MIXU"


class KeyedMixup:
    """``timm.data.Mixup`` (batch mode) whose draws come from ``(seed, step)`` and whose pairs are
    fixed positions of the global batch (``2k`` with ``2k+1``)."""

    def __init__(
        self, mixup: float, cutmix: float, num_classes: int, label_smoothing: float, seed: int
    ) -> None:
        from timm.data import Mixup

        self.mixup = Mixup(
            mixup_alpha=mixup,
            cutmix_alpha=cutmix,
            label_smoothing=label_smoothing,
            num_classes=num_classes,
            mode="batch",
        )
        self.seed = seed

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = len(images)
        if b % 2:
            raise ValueError(
                f"mixup/cutmix need an even micro-batch (samples are mixed in pairs), got {b}: choose "
                "schedule.batch_size divisible by 2 * world size * grad_accum_steps"
            )
        # [0, 2, 4, ..., 5, 3, 1]: flip(0) of this order pairs 2k with 2k+1
        order = torch.cat([torch.arange(0, b, 2), torch.arange(b - 1, 0, -2)]).to(images.device)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(b, device=order.device)
        state = np.random.get_state()
        np.random.seed(mix32(self.seed, step, _MIX_SALT))
        try:
            x, y = self.mixup(images[order].contiguous(), labels[order])
        finally:
            np.random.set_state(state)
        return x[inverse], y[inverse]


class TrainInput:
    """Host loader of uint8 batches + the device-side finish, augmentation and loss of training."""

    def __init__(
        self,
        dataset: ImageClassificationDataset,
        num_classes: int,
        label_smoothing: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        pin_memory: bool = True,
    ) -> None:
        self.dataset = dataset
        self.label_smoothing = label_smoothing
        self.mix = (
            KeyedMixup(mixup, cutmix, num_classes, label_smoothing, dataset.seed) if mixup or cutmix else None
        )
        self.pin_memory = pin_memory
        self._soft_loss = None
        if self.mix is not None:
            from timm.loss import SoftTargetCrossEntropy

            self._soft_loss = SoftTargetCrossEntropy()

    # ---- host side -------------------------------------------------------------------------
    def loader(self, batch_sampler: Iterable[Sequence[Key]], num_workers: int = 0) -> Iterable[HostBatch]:
        """Iterable of ``(uint8 images, labels, sample keys)``; re-iterate after ``set_epoch``."""
        pin = self.pin_memory and torch.cuda.is_available()
        if self.dataset.in_memory:
            return _MainProcessLoader(self.dataset, batch_sampler, pin)
        return DataLoader(
            RawView(self.dataset),
            batch_sampler=batch_sampler,
            num_workers=num_workers,
            pin_memory=pin,
            persistent_workers=num_workers > 0,
            # the workers' base seed is drawn from this generator, not from the global RNG that
            # dropout uses; augmentation draws from sample keys, so the base seed changes no result
            generator=torch.Generator().manual_seed(0),
        )

    # ---- device side -----------------------------------------------------------------------
    def to_device(
        self, batch: HostBatch, device: torch.device, dtype: torch.dtype, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(model input in ``dtype``, targets: int64 labels, or soft float targets under mixup).
        ``step`` keys mixup: the run's data position (optimizer steps taken, skipped ones included)."""
        images, labels, skeys = batch
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        images = self.dataset.finish(images, skeys)  # crop/flip, normalise, erase (keys stay on host)
        if self.mix is not None:
            images, labels = self.mix(images, labels, step)
        return images.to(dtype), labels

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy in fp32: soft targets (timm ``SoftTargetCrossEntropy``, smoothing already in
        the targets) under mixup/cutmix, else hard labels with ``label_smoothing``."""
        if self._soft_loss is not None:
            return self._soft_loss(logits.float(), targets)
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)


class _MainProcessLoader:
    """In-memory datasets: one gather per batch in the main process (no workers, no collate)."""

    def __init__(self, dataset: ImageClassificationDataset, batch_sampler, pin_memory: bool) -> None:
        self.dataset, self.batch_sampler, self.pin_memory = dataset, batch_sampler, pin_memory

    def __iter__(self) -> Iterator[HostBatch]:
        for keys in self.batch_sampler:
            images, labels, skeys = self.dataset.raw_batch(keys)
            if self.pin_memory:
                images, labels, skeys = images.pin_memory(), labels.pin_memory(), skeys.pin_memory()
            yield images, labels, skeys

    def __len__(self) -> int:
        return len(self.batch_sampler)
