"""The process pool the data stages write and plan with: light to start, at most two calls per process in flight.

Workers fork from a clean server process that imported only the data modules: no threads are inherited
(unlike plain fork), the package's imports are paid once (unlike spawn), and the parent's main module is
never imported (see :class:`_LightWorker`). Functions and their arguments must live in importable modules.
"""

from __future__ import annotations

import multiprocessing
import sys
import types
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, TypeVar

from pipeline.core.signals import ignore_stop_signals

PRELOADED = ["pipeline.data.shard_writer", "pipeline.data.imagenet_source", "pipeline.data.datacomp_source"]
Key = TypeVar("Key")


class _LightWorker(multiprocessing.context.ForkServerProcess):
    """A worker process that does not import the parent's ``__main__``.

    multiprocessing imports the parent's main module again in every child it starts (fork aside). When that is
    a training script or a notebook that imported torch, each worker would pay for it (1.5-3 s and a few
    hundred MB each) and need none of it. While the child is started, the main module is replaced by an empty
    one, which the child then skips."""

    def start(self) -> None:
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            super().start()
        finally:
            if main is not None:
                sys.modules["__main__"] = main


class _LightContext(multiprocessing.context.ForkServerContext):
    Process = _LightWorker


def worker_context() -> multiprocessing.context.BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = _LightContext()
    context.set_forkserver_preload(PRELOADED)
    return context


def run_all(function: Callable[..., Any], calls: Iterable[tuple[Key, tuple]], workers: int
            ) -> Iterator[tuple[Key, Any]]:
    """``(key, function(*args))`` for every ``(key, args)`` of ``calls``, in this process (``workers <= 1``)
    or in ``workers`` light processes (which leave stop signals to this one), in completion order. Arguments
    are made as they are needed: at most two calls per process are in flight."""
    calls = iter(calls)
    if workers <= 1:
        for key, args in calls:
            yield key, function(*args)
        return
    pending: dict[Future, Key] = {}
    pool = ProcessPoolExecutor(workers, mp_context=worker_context(), initializer=ignore_stop_signals)
    try:
        def submit_next() -> None:
            call = next(calls, None)
            if call is not None:
                pending[pool.submit(function, *call[1])] = call[0]

        for _ in range(2 * workers):
            submit_next()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                key = pending.pop(future)
                yield key, future.result()
                submit_next()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
