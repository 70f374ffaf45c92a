"""SIGTERM handled like Ctrl-C, so that interrupted commands clean up after themselves.

docker stop, Kubernetes, Cloud Run and preemptible VMs send SIGTERM, whose default action kills the process without
running ``finally`` blocks: a download would leave its ``.part``, a conversion its staging folder, a training run
no checkpoint. Inside :func:`sigterm_as_interrupt` SIGTERM raises KeyboardInterrupt instead.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (docker stop, Kubernetes, preemptible/Vertex AI VMs) like Ctrl-C: checkpoint, then exit.

    Forked data-augmentation workers inherit the handler; in them it falls back to the default (terminate), because
    nnU-Net stops its workers with SIGTERM.
    """
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

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
    # Python drops an exception raised while it runs a finalizer (``__del__``, a weakref callback): a SIGTERM that
    # lands there would be lost and the command would carry on as if nothing happened. Never lose one.
    if received:
        raise KeyboardInterrupt
