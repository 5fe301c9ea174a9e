"""One background thread that runs checkpoint writes, one at a time.

The training thread hands over a job (compress, checksum, write, rename, prune) and goes on
training; at most one job is in flight, so memory holds at most one snapshot. A job's
exception is kept and re-raised in the caller's thread at the next :meth:`wait` (which
``save``, ``wait`` and ``close`` of the store all call): write errors are never swallowed.

The thread runs at a lower CPU priority (nice +10 by default, Linux only): on a machine with
few cores the training thread's OpenMP workers wait on each other at every parallel region,
so a writer that holds a core at equal priority stalls the whole step; at nice +10 the
scheduler lets the training threads go first and the write takes longer instead.

The thread is a daemon so a forgotten store cannot hang interpreter exit; an ``atexit`` hook
still waits for writes in flight, because a daemon killed mid-write would drop the newest
checkpoint (the previous one is safe either way: files only appear by atomic rename).
"""

from __future__ import annotations

import atexit
import os
import queue
import sys
import threading
import weakref
from collections.abc import Callable

from stso_env.errors import CheckpointError

#: Niceness increment of the writer thread unless the caller picks another.
DEFAULT_WRITER_NICE = 10

_live_writers: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()


class _Job:
    def __init__(self, fn: Callable[[], None], label: str) -> None:
        self.fn = fn
        self.label = label
        self.done = threading.Event()
        self.error: BaseException | None = None


class BackgroundWriter:
    """Runs submitted jobs on one thread; errors resurface on :meth:`wait`.

    Args:
        name: thread name (shows in debuggers and ``py-spy``).
        nice: niceness increment for the thread (Linux); None or 0 leaves it unchanged.
    """

    def __init__(self, name: str = "stso-cp-writer", nice: int | None = DEFAULT_WRITER_NICE) -> None:
        self._name = name
        self._nice = nice
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pending: _Job | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        _live_writers.add(self)

    @property
    def busy(self) -> bool:
        """Whether a job is queued or running."""
        job = self._pending
        return job is not None and not job.done.is_set()

    def submit(self, fn: Callable[[], None], label: str) -> None:
        """Queue ``fn``; waits first for the job in flight (and re-raises its error).

        Args:
            fn: the work; runs on the writer thread.
            label: names the job in error messages (e.g. the target file).
        """
        self.wait()
        with self._lock:
            if self._closed:
                raise CheckpointError("the checkpoint writer is closed; open a new CheckpointStore")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            job = _Job(fn, label)
            self._pending = job
            self._queue.put(job)

    def wait(self) -> None:
        """Block until no job is in flight; re-raise a failed job's error as CheckpointError."""
        job = self._pending
        if job is None:
            return
        job.done.wait()
        with self._lock:
            if self._pending is job:
                self._pending = None
        if job.error is not None:
            err = job.error
            job.error = None
            if isinstance(err, CheckpointError):
                raise CheckpointError(f"background checkpoint write failed: {err}") from err
            raise CheckpointError(
                f"background checkpoint write of {job.label} failed: {type(err).__name__}: {err}"
            ) from err

    def close(self) -> None:
        """Wait for the job in flight (re-raising its error) and stop the thread."""
        try:
            self.wait()
        finally:
            with self._lock:
                if not self._closed:
                    self._closed = True
                    if self._thread is not None:
                        self._queue.put(None)
            thread = self._thread
            if thread is not None and thread is not threading.current_thread():
                thread.join()
            _live_writers.discard(self)

    def _run(self) -> None:
        if self._nice and sys.platform.startswith("linux"):
            # On Linux each thread has its own nice value; PRIO_PROCESS with a thread id
            # changes only this thread. Raising niceness needs no privileges.
            try:
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + self._nice)
            except OSError:
                pass
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                job.fn()
            except BaseException as err:
                job.error = err
            finally:
                job.fn = _done  # drop the snapshot as soon as it is written
                job.done.set()


def _done() -> None:
    return None


def _flush_at_exit() -> None:
    for writer in list(_live_writers):
        if writer._pid != os.getpid():
            # A forked child inherits the writer object but not its thread: waiting on the
            # parent's job would hang the child's exit.
            continue
        try:
            writer.close()
        except CheckpointError as err:
            print(f"stso checkpoint: {err}", file=sys.stderr)


atexit.register(_flush_at_exit)
