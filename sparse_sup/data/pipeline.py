"""The training input path, timm-prefetcher style: uint8 batches on the host (workers, or one gather
for in-memory CIFAR), pinned and copied ``non_blocking``; crop/flip, normalisation, random erasing and
mixup/cutmix on the device. Every draw is keyed -- per sample by ``(seed, epoch, index)``, mixup per
optimizer step by ``(seed, step)`` -- so a global batch comes out the same at any world size,
accumulation and worker count.

Mixup pairs: timm's ``Mixup`` mixes a batch with its reverse (``x.flip(0)``), which would pair samples
across whatever the local micro-batch happens to be. Here position ``2k`` of the global batch is
mixed with ``2k+1`` (a micro-batch is a contiguous, even slice of it), with timm's draws (``lam``,
mixup or cutmix, the box: one per optimizer step, from the step key) and timm's soft targets, so
exactly the same pairs are mixed at any world size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import ImageClassificationDataset
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
        """Mix ``images`` (float, in place) and return soft targets. timm draws ``lam`` (and the
        cutmix box) from NumPy seeded by ``(seed, step)``; the pair of position ``2k`` is ``2k+1``."""
        from timm.data.mixup import cutmix_bbox_and_lam, mixup_target

        b = len(images)
        if b % 2:
            raise ValueError(
                f"mixup/cutmix need an even micro-batch (samples are mixed in pairs), got {b}: choose "
                "schedule.batch_size divisible by 2 * world size * grad_accum_steps"
            )
        m = self.mixup
        state = np.random.get_state()
        np.random.seed(mix32(self.seed, step, _MIX_SALT))
        try:
            lam, use_cutmix = m._params_per_batch()  # timm's draw (mix_prob, switch_prob, beta)
            if lam != 1.0 and use_cutmix:
                (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(
                    images.shape, lam, ratio_minmax=m.cutmix_minmax, correct_lam=m.correct_lam
                )
        finally:
            np.random.set_state(state)
        pairs = images.view(b // 2, 2, *images.shape[1:])
        if lam != 1.0:
            if use_cutmix:  # the box of each sample comes from its partner
                box = pairs[..., yl:yh, xl:xh]
                box.copy_(box.flip(1))
            else:  # lam * x + (1 - lam) * partner, copying half the batch rather than all of it
                first = pairs[:, 0].clone()
                pairs[:, 0].lerp_(pairs[:, 1], 1.0 - lam)
                pairs[:, 1].lerp_(first, 1.0 - lam)
        # timm's targets pair i with b-1-i: feed it the order whose reverse pairs 2k with 2k+1
        order = torch.cat([torch.arange(0, b, 2), torch.arange(b - 1, 0, -2)]).to(labels.device)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(b, device=order.device)
        targets = mixup_target(labels[order], m.num_classes, lam, m.label_smoothing)
        return images, targets[inverse]


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
        """Iterable of ``(uint8 images, labels, sample keys)``; re-iterate after ``set_epoch``. The
        dataset builds it (``host_loader``): a map-style one from the sampler's keys, a stream
        (``data.streaming``) from the sampler's epoch, rank and position."""
        pin = self.pin_memory and torch.cuda.is_available()
        return self.dataset.host_loader(batch_sampler, num_workers, pin)

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
