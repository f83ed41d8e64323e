"""Run ``sparse-sup train`` with this rank's wall clock shifted by ``RANK`` hours, so ranks that
name a timestamped run directory each from their own clock disagree for certain (as ranks on
either side of a second boundary do by chance). Only the clock moves: torch.distributed is real.
Each rank prints the run directory it was given (``rank R run_dir PATH``).

    torchrun --nproc_per_node=2 clock_worker.py --config ...
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    shift = 3600 * int(os.environ.get("RANK", "0"))
    strftime = time.strftime

    def shifted(fmt, *when):  # "now" only: logging passes its own time tuple and keeps it
        return strftime(fmt, *when) if when else strftime(fmt, time.localtime(time.time() + shift))

    time.strftime = shifted
    import sparse_sup.train.setup as setup
    from sparse_sup.cli import main as cli_main

    prepare = setup.prepare

    def reporting_prepare(*args, **kwargs):
        prepared = prepare(*args, **kwargs)
        print(f"rank {os.environ.get('RANK', '0')} run_dir {prepared.run_dir}", flush=True)
        return prepared

    setup.prepare = reporting_prepare

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
