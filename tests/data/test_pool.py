"""The data stages' process pool: results keyed by call, the same in a pool as in this process, and workers
that leave stop signals to the stage process (which stops the pool and keeps finished shards)."""

from __future__ import annotations

import operator
import signal

from pipeline.core.signals import STOP_SIGNALS
from pipeline.data.pool import run_all


def test_a_pool_gives_what_this_process_gives_keyed_by_call():
    calls = [(index, (index, 10)) for index in range(7)]
    here = dict(run_all(operator.mul, calls, 1))
    assert here == {index: index * 10 for index in range(7)}
    assert dict(run_all(operator.mul, calls, 2)) == here


def test_pool_workers_ignore_stop_signals():
    calls = [(int(sig), (sig,)) for sig in STOP_SIGNALS] * 2
    handlers = list(run_all(signal.getsignal, calls, 2))
    assert len(handlers) == 2 * len(STOP_SIGNALS)
    assert all(handler == signal.SIG_IGN for _, handler in handlers)
