"""Logging set-up: rank-0 console, a per-run log file, and a JSON-lines metrics file."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


class _RankZeroFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(rank: int, log_file: Path | None = None, level: int = logging.INFO) -> None:
    root = logging.getLogger("sparse_sup")
    root.setLevel(level)
    root.handlers.clear()
    root.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    console.addFilter(_RankZeroFilter(rank))
    root.addHandler(console)
    if log_file is not None and rank == 0:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.addHandler(file_handler)


class MetricsWriter:
    """Appends one JSON object per event to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, **record: object) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
