"""Run ``sparse-sup train`` and SIGKILL this process at a chosen point (a real kill: no cleanup,
no atexit, files left half-written), for the resume tests.

    python crash_worker.py POINT N -- --config ...   (POINT: step, update, checkpoint or
                                                      superposition; N: kill at its N-th call)
Under torchrun only rank 0 is killed; the launcher then ends the others, as on a real node failure.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def killing(original, nth: int, after: bool):
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        due = calls[0] == nth and os.environ.get("RANK", "0") == "0"
        if due and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if due:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    return wrapped


def main() -> int:
    point, nth, argv = sys.argv[1], int(sys.argv[2]), sys.argv[4:]
    import sparse_sup.checkpoint.run_state as run_state
    import sparse_sup.engine as engine
    from sparse_sup.cli import main as cli_main
    from sparse_sup.tickets.superpose import SuperpositionChain

    if point == "step":  # the weights moved, the masks are not yet enforced, no counter advanced
        engine.SupTicketsEngine.after_optimizer_step = killing(
            engine.SupTicketsEngine.after_optimizer_step, nth, after=False
        )
    elif point == "update":  # masks changed, not yet logged or propagated
        engine.drop_and_grow = killing(engine.drop_and_grow, nth, after=True)
    elif point == "checkpoint":  # model/optimizer files written, sparse state and manifest not
        run_state.atomic_torch_save = killing(run_state.atomic_torch_save, nth, after=False)
    elif point == "superposition":  # S re-pruned, not yet swapped in, recalibrated or saved
        SuperpositionChain.reprune = killing(SuperpositionChain.reprune, nth, after=True)
    else:
        raise SystemExit(f"unknown kill point {point!r}")
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
