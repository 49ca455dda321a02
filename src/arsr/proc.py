"""Child processes that never outlive their parent.

A process killed with SIGKILL cannot stop its children, and some of ours would carry on without
it: torchrun starts every training rank in a session of its own (so a ``kill -9`` of the runner's
process group misses them) and a multiprocessing pool worker waits forever on a queue whose
writer end it holds itself. Left alone, a rank trains to the end and writes ``model.pt`` and
``metrics.json`` behind the runner's back (DVC never records them); a pool worker lingers.

Linux ties a process to its parent with ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills it
when the parent exits. The child arms it itself, so two things need care:

- a parent that dies between starting the child and the ``prctl`` call is missed: the child
  compares ``os.getppid()`` with the parent's pid recorded before it started (an environment
  variable, an initializer argument) and, re-parented already, kills itself;
- the "parent" is the *thread* that started the child: a child started by a thread that ends
  while the child runs would be killed early. Every child armed here is started by a thread
  that outlives it (a main thread, or a pool's own worker-handler thread).

The setting survives ``execve`` (except of setuid programs), so a process can arm itself and then
exec the real command: :func:`main` is how the training launcher ties torchrun's ranks to the
torchrun agent, and the launcher arms itself before it execs torchrun (or the one training
process). Elsewhere than Linux every function here is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Sequence
from multiprocessing import get_context
from multiprocessing.pool import Pool
from typing import Any, NoReturn

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# The pid a process started through `python -m arsr.proc` must have as its parent (the training
# launcher sets it to its own pid, which torchrun keeps: the launcher execs it).
PARENT_PID_ENV = "ARSR_PARENT_PID"


def die_with_parent(parent_pid: int | None) -> None:
    """Have the kernel SIGKILL this process when its parent exits (Linux; a no-op elsewhere).

    ``parent_pid``: the parent's pid as recorded before this process started; when
    ``os.getppid()`` differs, the parent is gone already and this process kills itself now.
    ``None`` skips that check (the parent's pid is not known)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def _pool_worker_init(
    parent_pid: int, initializer: Callable[..., Any] | None, initargs: Sequence[Any]
) -> None:
    die_with_parent(parent_pid)
    if initializer is not None:
        initializer(*initargs)


def spawn_pool(
    processes: int, initializer: Callable[..., Any] | None = None, initargs: Sequence[Any] = ()
) -> Pool:
    """A ``spawn`` multiprocessing pool whose workers die with this process (then ``initializer``)."""
    return get_context("spawn").Pool(
        processes, initializer=_pool_worker_init, initargs=(os.getpid(), initializer, tuple(initargs))
    )


def main(argv: list[str] | None = None) -> NoReturn:
    """``python -m arsr.proc (-m MODULE | SCRIPT) [ARGS]``: die with the parent (checked against
    ``$ARSR_PARENT_PID`` when set), then exec ``python (-m MODULE | SCRIPT) ARGS`` with this
    interpreter's options (torchrun's ``-u``). torchrun runs this as each rank (``torchrun ... -m
    arsr.proc -m arsr.stages.train_base``): a rank's parent is the agent."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv == ["-m"]:
        sys.exit("usage: python -m arsr.proc (-m MODULE | SCRIPT) [ARGS]")
    parent = os.environ.pop(PARENT_PID_ENV, None)
    die_with_parent(int(parent) if parent else None)
    # sys.orig_argv = [python, *options, "-m", "arsr.proc", *sys.argv[1:]]
    options = sys.orig_argv[1 : len(sys.orig_argv) - len(sys.argv) - 1]
    os.execv(sys.executable, [sys.executable, *options, *argv])


if __name__ == "__main__":
    main()
