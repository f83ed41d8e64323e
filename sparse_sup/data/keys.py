"""Counter-based hashing for per-sample randomness.

A sample's random choices are a pure function of ``(seed, epoch, index)``, so they do not depend
on world size, rank, worker count or iteration order. ``mix32`` (Python ints) and ``hash32``
(int64 tensors) implement the same fold, so ``mix32(a, b, i) == hash32(tensor([i]), mix32(a, b))``.
"""

from __future__ import annotations

import torch

from ..core.hashing import MASK32
from ..core.hashing import mix32 as _lowbias32_t  # lowbias32 on int64 tensors
from ..core.hashing import mix32_int as _lowbias32  # lowbias32 on Python ints

_MASK64 = (1 << 64) - 1
_INIT = 0x9E3779B9


def _fold(h: int, value: int) -> int:
    """Absorb one int (as 64-bit two's complement: low word, then high word if non-zero)."""
    value &= _MASK64
    h = _lowbias32(h ^ (value & MASK32))
    if value >> 32:
        h = _lowbias32(h ^ (value >> 32))
    return h


def mix32(*values: int) -> int:
    """Hash any number of ints (64-bit range) into one value in [0, 2**32)."""
    h = _INIT
    for v in values:
        h = _fold(h, int(v))
    return h


def hash32(x: torch.Tensor, salt: int) -> torch.Tensor:
    """Element-wise ``_fold(salt, x)`` of an int64 tensor; result int64 in [0, 2**32)."""
    x = x.to(torch.int64)
    h = _lowbias32_t((x & MASK32) ^ (salt & MASK32))
    high = (x >> 32) & MASK32
    return torch.where(high != 0, _lowbias32_t(h ^ high), h)


def sample_key(seed: int, epoch: int, index: int) -> int:
    """Key seeding the randomness of sample ``index`` in ``epoch``."""
    return mix32(seed, epoch, index)


def recalibration_epoch(counter: int) -> int:
    """The key "epoch" of BN-recalibration pass ``counter`` (0, 1, ...): negative, so its
    augmentations and sample order never coincide with those of a training epoch (epochs >= 0)."""
    if counter < 0:
        raise ValueError(f"recalibration counter must be >= 0, got {counter}")
    return -1 - counter


def sample_keys(seed: int, epochs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Vectorised ``sample_key`` for int64 tensors of epochs and indices (same shape)."""
    out = torch.empty_like(indices, dtype=torch.int64)
    for epoch in torch.unique(epochs).tolist():
        sel = epochs == epoch
        out[sel] = hash32(indices[sel], mix32(seed, epoch))
    return out
