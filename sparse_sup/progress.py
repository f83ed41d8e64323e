"""Progress bars for long operations (evaluation, BN recalibration, checkpoint reads and writes,
merge): tqdm on rank 0 only, and quiet under ``train.progress_bar=false`` or when stdout is not a
terminal (CI logs get the log lines instead).

    for batch in progress(loader, desc="evaluate", total=len(sampler)):
        ...
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm.auto import tqdm

_enabled: bool | None = None  # None: not configured (rank 0 of the environment's launcher)


def configure(enabled: bool) -> None:
    """Set once per process by the run (``train.progress_bar`` and rank 0)."""
    global _enabled
    _enabled = enabled


def progress_enabled() -> bool:
    if _enabled is None:
        rank0 = int(os.environ.get("RANK", "0")) == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0
        if not rank0:
            return False
    elif not _enabled:
        return False
    return sys.stdout.isatty()


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    leave: bool = False,
) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one with ``total``), disabled where bars are quiet."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        leave=leave,
        disable=not progress_enabled(),
        dynamic_ncols=True,
    )
