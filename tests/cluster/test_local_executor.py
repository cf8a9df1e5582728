"""The local executor's wait: a rank that fails ends the others instead of leaving them in a collective."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from cluster.executors import wait_all_or_stop


def python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)  # as the executors start ranks


def test_a_failed_process_stops_the_others_after_the_grace_period():
    started = time.monotonic()
    codes = wait_all_or_stop([python("import time; time.sleep(60)"), python("raise SystemExit(3)")], grace_s=0.5)
    assert codes == [-signal.SIGTERM, 3]
    assert time.monotonic() - started < 30


def test_processes_that_all_succeed_are_waited_for():
    assert wait_all_or_stop([python("import time; time.sleep(1)"), python("pass")], grace_s=0.1) == [0, 0]
