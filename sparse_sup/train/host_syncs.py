"""Count the host reads of tensor values ("syncs": on a GPU each one waits for the device) that the
training loop makes per optimizer step. On a GPU ``torch.cuda.set_sync_debug_mode("error")`` finds
them; this counter works anywhere, the CPU included, by watching the Python-level calls that read a
tensor's value: ``item``, ``bool()``, ``float()``, ``int()``, ``index()``, ``tolist``, ``cpu()``,
``nonzero`` and boolean-mask indexing. Reads made under the DataLoader (``torch.utils.data``: the
sampler, the dataset, collation; host tensors, no device involved) are not counted. Reads inside C++ (a tensor
used as a Python scalar argument) are not seen: the GPU check covers those.

For tests and ``bench/host_syncs.py``; costs a Python call per torch function while active."""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

_READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "nonzero"}
_NOT_COUNTED = ("torch/utils/data/",)  # the DataLoader's host work: sampler, dataset, collate


def _bool_index(args) -> bool:
    if len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)


def _caller(exclude: tuple[str, ...]) -> str | None:
    """dir/file:line of the first frame outside torch's own Python code; None for data loading or
    when any frame's path contains one of ``exclude``."""
    frame, site = sys._getframe(2), None
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if any(part in path for part in _NOT_COUNTED + exclude):
            return None
        if site is None and "/torch/" not in path:
            site = f"{path.rsplit('/', 2)[-2]}/{path.rsplit('/', 1)[-1]}:{frame.f_lineno}"
            if not exclude:
                return site
        frame = frame.f_back
    return site or "torch"


class HostSyncCounter(TorchFunctionMode):
    """While active (``with HostSyncCounter() as c``): ``c.count`` reads so far, ``c.sites`` by
    caller (dir/file:line). ``exclude``: path fragments (e.g. ``core/invariants.py``: the checks a
    test asks for) whose reads, anywhere down the stack, are not counted."""

    def __init__(self, exclude: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.exclude = tuple(exclude)
        self.count = 0
        self.sites: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _READS or (name == "__getitem__" and _bool_index(args)):
            site = _caller(self.exclude)
            if site is not None:
                self.count += 1
                self.sites[site] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_loop_syncs(exclude: tuple[str, ...] = ()) -> Iterator[list[dict]]:
    """Patch the loop (``Run.train``, ``OptimizerStep``) so that ``train()`` runs under a
    ``HostSyncCounter`` and every optimizer-step attempt appends ``{"attempt", "step", "syncs",
    "sites"}``: the reads from the start of that attempt to the start of the next (the attempt's own
    and the host's work after it: logs, evaluation, checkpoints); ``step`` is the engine's step after
    it."""
    from .loop import Run
    from .step import OptimizerStep

    records: list[dict] = []
    train, optimizer_step = Run.train, OptimizerStep.__call__
    counter = HostSyncCounter(exclude)
    state = {"count": 0, "sites": Counter(), "run": None}

    def close_previous() -> None:
        if records:
            records[-1]["syncs"] = counter.count - state["count"]
            records[-1]["sites"] = dict(counter.sites - state["sites"])
        state["count"], state["sites"] = counter.count, Counter(counter.sites)

    def counted_step(self, *args, **kwargs):
        close_previous()
        records.append({"attempt": len(records)})
        result = optimizer_step(self, *args, **kwargs)
        records[-1]["step"] = state["run"].engine.step  # as the host knows it (deferred: speculative)
        return result

    def counted_train(self, *args, **kwargs):
        state["run"] = self
        with counter:
            try:
                return train(self, *args, **kwargs)
            finally:
                close_previous()

    Run.train, OptimizerStep.__call__ = counted_train, counted_step
    try:
        yield records
    finally:
        Run.train, OptimizerStep.__call__ = train, optimizer_step
