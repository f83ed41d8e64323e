"""Run ``sparse-sup train`` with every optimizer-step attempt's host reads counted
(``sparse_sup.train.host_syncs``); each rank writes ``OUT.rank<R>.json``: the per-attempt records.
``SYNC_NO_DEFER=1``: every step treated as one where the host acts
(the skip decision read at once): the reference a deferred run must equal. ``SYNC_CUDA_ERROR=1``
(GPU): ``torch.cuda.set_sync_debug_mode("error")`` from the start of every deferred (steady-state)
step until the loop resolves skips or starts a step where the host acts: any device sync there raises.

Reads made by ``sparse.check_invariants`` (tests' own checks) are not counted.

    python host_sync_worker.py OUT --config ...        (or under accelerate launch / torchrun)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    from sparse_sup.cli import main as cli_main
    from sparse_sup.train.host_syncs import count_loop_syncs
    from sparse_sup.train.loop import Run
    from sparse_sup.train.step import HostSteps, OptimizerStep

    if os.environ.get("SYNC_NO_DEFER") == "1":
        HostSteps.acts = lambda self, step: True
    if os.environ.get("SYNC_CUDA_ERROR") == "1":
        import torch

        step, resolve = OptimizerStep.__call__, Run.resolve_skips

        def guarded_step(self, micro, accum, position, defer=False):
            torch.cuda.set_sync_debug_mode("error" if defer else "default")
            return step(self, micro, accum, position, defer)

        def guarded_resolve(self):
            torch.cuda.set_sync_debug_mode("default")
            return resolve(self)

        OptimizerStep.__call__, Run.resolve_skips = guarded_step, guarded_resolve
    with count_loop_syncs(exclude=("core/invariants.py",)) as records:  # the checks tests ask for
        counted = Run.train

        def train_and_write(self):
            try:
                return counted(self)
            finally:
                rank = self.accelerator.process_index
                Path(f"{out}.rank{rank}.json").write_text(json.dumps(records))

        Run.train = train_and_write
        return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
