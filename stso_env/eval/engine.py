"""Run independent jobs serially, in local processes or on Ray, with a thread budget per worker.

Two torch processes with two threads each on a two-core machine slow each other tens of times
(measured: a tiny run fell from about 40 steps/s to 0.5), so every worker sets torch's intra-op
thread count, and ``workers * threads`` never exceeds the cores unless asked. A serial run with the
same thread count gives bit-identical results, because a job depends on nothing but its arguments
and the thread count (reductions are split by thread).

Engines:

* ``serial``: in this process (threads set here).
* ``local``: a ``concurrent.futures.ProcessPoolExecutor`` with ``spawn`` workers.
* ``ray``: Ray tasks (``ray.init(num_cpus=workers)`` on this machine, or ``address`` for a cluster),
  one CPU each; needs the ``distributed`` extra.
* ``auto``: ``serial`` for one worker, else ``ray`` when it is installed, else ``local``.

``fn`` must be importable by reference (a module-level function) and must return picklable data.

:func:`ray_init` is the one way every Ray user here connects (these jobs, the branch orchestrator's
verification rollouts, PBT's population actors) and :func:`ray_task` the one task wrapper (jobs and
verification rollouts), so a cluster address and the thread count mean the same everywhere.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Any

ENGINES = ("auto", "serial", "local", "ray")


def default_threads(workers: int) -> int:
    """Threads per worker so that workers x threads fits the cores (at least 1)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def set_threads(threads: int) -> None:
    """Fix torch's intra-op threads (and OpenMP's, for libraries that read it) in this process."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def _call(fn: Callable[..., Any], threads: int, *args: Any) -> Any:
    set_threads(threads)
    return fn(*args)


def resolve_engine(engine: str, workers: int) -> str:
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    if workers <= 1:
        return "serial"
    try:
        import ray  # noqa: F401
    except ImportError:
        return "local"
    return "ray"


def run_jobs(fn: Callable[[Any], Any], jobs: Iterable[Any], *, workers: int = 1, threads: int | None = None,
             engine: str = "auto", address: str | None = None) -> Iterator[tuple[Any, Any]]:
    """Yield ``(job, fn(job))`` as jobs finish (in submission order for ``serial``).

    Raises ``ValueError`` for bad settings; an exception inside a job propagates when its result is
    collected, after the other running jobs were cancelled or finished.
    """
    jobs = list(jobs)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    threads = default_threads(workers) if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    kind = resolve_engine(engine, workers)
    if kind == "serial":
        set_threads(threads)
        for job in jobs:
            yield job, fn(job)
        return
    # Children read OMP_NUM_THREADS when torch starts; set it before they are spawned.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if kind == "local":
        yield from _run_local(fn, jobs, workers, threads)
    else:
        yield from _run_ray(fn, jobs, workers, threads, address)


def _run_local(fn: Callable[[Any], Any], jobs: list[Any], workers: int, threads: int) -> Iterator[tuple[Any, Any]]:
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        pending = {pool.submit(_call, fn, threads, job): job for job in jobs}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    job = pending.pop(fut)
                    yield job, fut.result()
        finally:
            for fut in pending:
                fut.cancel()


def ray_init(address: str | None = None, *, num_cpus: int | None = None, threads: int = 1) -> bool:
    """Connect this process to Ray unless it already is (a Ray worker always is): to the running cluster
    at ``address`` (``host:port`` of its head, or ``"auto"``), else to a new local Ray of ``num_cpus`` CPUs.
    Workers started for this driver get ``OMP_NUM_THREADS=threads``. Returns True when this call
    connected, so the caller that wants a short-lived connection shuts it down (``ray.shutdown()``).

    An existing connection is kept as it is, whatever ``address`` says."""
    import ray

    if ray.is_initialized():
        return False
    env = {"env_vars": {"OMP_NUM_THREADS": str(threads)}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, runtime_env=env)
    return True


def ray_task(fn: Callable[..., Any], threads: int, **options: Any) -> Callable[..., Any]:
    """``fn`` as a Ray task (one CPU unless ``options`` say otherwise) that runs with ``threads`` torch
    threads: the returned function submits ``fn(*args)`` and gives its ``ObjectRef`` (``ObjectRef``
    arguments arrive resolved). Needs a connection (:func:`ray_init`)."""
    import ray

    remote = ray.remote(**{"num_cpus": 1, **options})(_call)
    return functools.partial(remote.remote, fn, threads)


def _run_ray(fn: Callable[[Any], Any], jobs: list[Any], workers: int, threads: int,
             address: str | None) -> Iterator[tuple[Any, Any]]:
    import ray

    started = ray_init(address, num_cpus=workers, threads=threads)
    try:
        submit = ray_task(fn, threads)
        refs = {submit(job): job for job in jobs}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                job = refs.pop(ref)
                yield job, ray.get(ref)
    finally:
        if started:
            ray.shutdown()
