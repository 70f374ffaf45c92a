"""SIGTERM handled like Ctrl-C, so that interrupted commands clean up after themselves.

docker stop, Kubernetes, Cloud Run and preemptible VMs send SIGTERM, whose default action kills the process without
running ``finally`` blocks: a download would leave its ``.part``, a conversion its staging folder, a training run
no checkpoint. Inside :func:`sigterm_as_interrupt` SIGTERM raises KeyboardInterrupt instead.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# How many sigterm_as_interrupt contexts are open in this process (the fork hooks below act only inside one).
_active = 0
_fork_state = threading.local()


def _before_fork() -> None:
    """Block SIGTERM across fork() so that a child cannot take it before Python's fork handling has run.

    Python clears signals that are pending at the Python level in a freshly forked child. A SIGTERM caught by the
    inherited handler in that window is lost, and the child lives on. nnU-Net's fork pools end with SIGTERM right
    after their (tiny) work, so on a loaded machine a worker that was not yet scheduled survived: `mlops prepare`
    then hung in Pool.terminate(), joining it forever.
    """
    if _active:
        _fork_state.mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _after_fork_parent() -> None:
    mask = getattr(_fork_state, "mask", None)
    if mask is not None:
        _fork_state.mask = None
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _after_fork_child() -> None:
    """A forked child (a worker) stops on SIGTERM, as its parent's library expects; a pending one is delivered now."""
    mask = getattr(_fork_state, "mask", None)
    if mask is not None:
        _fork_state.mask = None
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent, after_in_child=_after_fork_child)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (docker stop, Kubernetes, preemptible/Vertex AI VMs) like Ctrl-C: checkpoint, then exit.

    Forked workers (nnU-Net's data augmentation and its fork pools) get the default action back (terminate), because
    nnU-Net stops its workers with SIGTERM.
    """
    global _active
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    main_pid = os.getpid()

    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        received.append(signum)
        raise KeyboardInterrupt

    previous_hook = sys.unraisablehook

    timers: list[threading.Timer] = []

    def unraisable(info: sys.UnraisableHookArgs) -> None:
        """Our KeyboardInterrupt raised inside a finalizer: deliver the signal again just after it, without noise.

        Python drops an exception raised while it runs a finalizer (``__del__``, a weakref callback) and prints
        "Exception ignored ... Traceback" on stderr. A timer thread sends SIGTERM again a moment later, so the handler
        runs in ordinary code and the command stops there, as it would have without the finalizer. (Sending it from
        here would run the handler inside this hook, where the exception is dropped once more.)
        """
        if received and info.exc_type is not None and issubclass(info.exc_type, KeyboardInterrupt):
            timer = threading.Timer(0.01, os.kill, (main_pid, signal.SIGTERM))
            timer.daemon = True
            timers.append(timer)
            timer.start()
            return
        previous_hook(info)

    previous = signal.signal(signal.SIGTERM, handler)
    sys.unraisablehook = unraisable
    _active += 1
    try:
        yield
    finally:
        _active -= 1
        for timer in timers:
            timer.cancel()
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = previous_hook
    # A SIGTERM re-delivered in the last instants (see ``unraisable``) may have had no ordinary code left to land in.
    # Never lose one.
    if received:
        raise KeyboardInterrupt
