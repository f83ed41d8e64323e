"""A real crash of a writer at a chosen point, for the checkpoint tests (no cleanup runs)."""

from __future__ import annotations

import os
import signal


def killed_writer(module, name: str, nth: int, work, after: bool = True) -> int:
    """Fork; the child wraps ``module.name`` to SIGKILL itself at its ``nth`` call (after it ran,
    or before), then runs ``work``. Returns the dead child's pid; its files stay as the kill left them."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            original, calls = getattr(module, name), [0]

            def wrapped(*args, **kwargs):
                calls[0] += 1
                if calls[0] == nth and not after:
                    os.kill(os.getpid(), signal.SIGKILL)
                result = original(*args, **kwargs)
                if calls[0] == nth:
                    os.kill(os.getpid(), signal.SIGKILL)
                return result

            setattr(module, name, wrapped)
            work()
        finally:
            os._exit(0)  # not killed: the parent's assertion below fails
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the writer was not killed"
    return pid
