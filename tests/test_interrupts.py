"""SIGTERM handling across fork: workers forked inside `sigterm_as_interrupt` still stop on SIGTERM at once.

Regression: nnU-Net's planner lists files with a fork `Pool(12)` and ends it with SIGTERM right after the tiny job.
On a loaded machine a worker that had not yet run after fork() caught that SIGTERM with the inherited handler, Python
dropped it while setting up the child, and `mlops prepare` hung joining the worker.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

from mlops.interrupts import sigterm_as_interrupt

FORK = multiprocessing.get_context("fork")


def _report_sigterm_action(queue: multiprocessing.SimpleQueue) -> None:
    queue.put(signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)


def test_forked_worker_gets_default_sigterm_action() -> None:
    queue = FORK.SimpleQueue()
    with sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL  # the parent converts SIGTERM to KeyboardInterrupt
        worker = FORK.Process(target=_report_sigterm_action, args=(queue,))
        worker.start()
        worker.join(30)
    assert worker.exitcode == 0
    assert queue.get() is True


def test_sigterm_right_after_fork_is_never_lost() -> None:
    """SIGTERM sent the instant fork() returns, before the child ran any Python: every child dies of it."""
    with sigterm_as_interrupt():
        for _ in range(20):
            worker = FORK.Process(target=time.sleep, args=(60,))
            worker.start()
            os.kill(worker.pid, signal.SIGTERM)
            worker.join(10)
            alive = worker.is_alive()
            if alive:
                worker.kill()
            assert not alive and worker.exitcode == -signal.SIGTERM


def test_fork_pool_inside_a_command_ends() -> None:
    """nnU-Net's pattern, in a fresh process: a 12-worker fork pool for 3 tiny jobs, ended by SIGTERM, 10 times."""
    script = (
        "import multiprocessing as mp\n"
        "from mlops.interrupts import sigterm_as_interrupt\n"
        "with sigterm_as_interrupt():\n"
        "    for _ in range(10):\n"
        "        with mp.get_context('fork').Pool(12) as pool:\n"
        "            assert pool.map(abs, [-1, -2, -3]) == [1, 2, 3]\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_sigterm_inside_a_finalizer_stops_the_command_right_after_it() -> None:
    """CI repro: SIGTERM landed in nibabel's ``OrderedSet.__del__`` during `mlops prepare`. Python drops exceptions
    raised in finalizers and printed "Exception ignored ... Traceback"; the command must stop just after the
    finalizer instead, quietly, and never run on to its end."""
    script = (
        "import gc, os, signal, time\n"
        "from mlops.interrupts import sigterm_as_interrupt\n"
        "class Finalized:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        sum(range(100000))  # the handler runs here, inside the finalizer\n"
        "try:\n"
        "    with sigterm_as_interrupt():\n"
        "        f = Finalized(); del f\n"
        "        print('after the finalizer', flush=True)\n"
        "        time.sleep(5)\n"
        "        print('carried on', flush=True)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
    )
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["after", "the", "finalizer", "interrupted"]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert time.monotonic() - started < 5, "the interrupt waited for the sleep to end"
