"""``train.py`` with one rank's input checks made slow or refusing, to reproduce what launch timing
does by chance: a rank that loads its extensions or data later checks the run directory after a
faster rank has started writing it; or a rank-local refusal (a file only one node lacks).

``python uneven_rank_train.py slow|refuse <train.py arguments>``: on rank 1 only, ``check_run_dir``
sleeps 3 s first (``slow``) or raises ConfigError (``refuse``). Everything else is the real CLI."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sparse_sup.cli import main  # noqa: E402
from sparse_sup.config import ConfigError  # noqa: E402
from sparse_sup.train import setup  # noqa: E402

mode, argv = sys.argv[1], sys.argv[2:]
if os.environ.get("RANK") == "1":
    real_check = setup.check_run_dir

    def uneven_check(run_dir, overwrite):
        if mode == "refuse":
            raise ConfigError(f"rank-local refusal of {run_dir.name}")
        time.sleep(3)
        real_check(run_dir, overwrite)

    setup.check_run_dir = uneven_check
sys.exit(main(argv, default="train"))
