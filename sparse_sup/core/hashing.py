"""Counter-based hashing: random choices that any shard can reproduce for its own elements.

A key is a pure function of (seed, step, layer, global flat index), so a rank holding elements
[a, b) of a layer computes exactly the keys a single process would, with no RNG state to keep in
sync and no ``randperm`` over a whole layer.
"""

from __future__ import annotations

import zlib

import torch

MASK32 = 0xFFFFFFFF


def mix32_int(x: int) -> int:
    """lowbias32 (C. Wellons) on a Python int, result in [0, 2**32)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    x ^= x >> 16
    return x


def combine(*values: int) -> int:
    """Fold any number of non-negative ints (arbitrary size) into one 32-bit salt."""
    h = 0x9E3779B9
    for v in values:
        while True:
            h = mix32_int(h ^ (v & MASK32))
            v >>= 32
            if v == 0:
                break
    return h


def name_id(name: str) -> int:
    """Stable 32-bit id of a (normalised) parameter name, independent of layer order."""
    return zlib.crc32(name.encode())


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on an int64 tensor of values in [0, 2**32). Only the low 32 bits of each
    product are kept, so int64 wraparound is harmless."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def uniform_keys(salt: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Keys in [0, 2**32) as float64 (exact) for global flat indices start .. start+count-1."""
    index = torch.arange(start, start + count, dtype=torch.int64, device=device)
    low = mix32((index & MASK32) ^ (salt & MASK32))
    high = mix32((index >> 32) ^ mix32_int(salt ^ 0x5BD1E995))
    return mix32(low ^ high).to(torch.float64)
