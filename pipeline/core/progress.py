"""Progress for long loops: a tqdm bar on a terminal, a log line every few seconds otherwise.

Batch jobs write to files where a redrawn bar is noise, so they get periodic lines instead.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
DEFAULT_EVERY_S = 30.0


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", log: logging.Logger | None = None,
             every_s: float = DEFAULT_EVERY_S) -> Iterator[T]:
    """Yield from ``iterable`` while reporting progress in the way that suits the output."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        yield from tqdm(iterable, total=total, desc=desc, dynamic_ncols=True)
        return
    log = log or logging.getLogger("kope")
    start = last = time.monotonic()
    count = 0
    for count, item in enumerate(iterable, start=1):
        yield item
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            log.info("%s", _line(desc, count, total, now - start))
    log.info("%s", _line(desc, count, total, time.monotonic() - start))


def _line(desc: str, count: int, total: int | None, elapsed: float) -> str:
    rate = count / elapsed if elapsed > 0 else 0.0
    of_total = f"/{total} ({100 * count / total:.0f}%)" if total else ""
    return f"{desc}: {count}{of_total} in {elapsed:.0f}s, {rate:.1f}/s"
