"""Logging to the console and to files in the run directory."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOGGER_NAME = "kope"
FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


def setup_console(level: int = logging.INFO) -> None:
    """Console logging for the ``kope`` command (idempotent). Records stop at the ``kope`` logger: libraries
    that log through the root logger (open_clip's module-level ``logging.info``) give it a handler of its own,
    which would print every line twice."""
    root = logging.getLogger(LOGGER_NAME)
    root.setLevel(level)
    root.propagate = False
    if not any(getattr(handler, "_kope_console", False) for handler in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        handler._kope_console = True  # type: ignore[attr-defined]
        root.addHandler(handler)


@contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Copy every ``kope`` log record to ``path`` while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger(LOGGER_NAME)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
