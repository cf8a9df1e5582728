"""img2dataset with our download limits: its fetch (``urllib.request.urlopen`` in each of its worker processes)
goes through :func:`pipeline.data.fetch_limits.limited_opener`.

img2dataset runs its ``Downloader`` in processes it spawns, so an opener installed in this process would not
reach them. :func:`limits_applied` makes img2dataset build a :class:`LimitedDownloader` instead, which is
pickled to each worker with the limits and installs the opener there before downloading a shard; everything
else (reading, resizing, writing, resuming) stays img2dataset's own.
"""

from __future__ import annotations

import functools
import importlib
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from img2dataset.downloader import Downloader

from pipeline.core.errors import KopeError
from pipeline.data.fetch_limits import FetchLimits, limited_opener

IMG2DATASET_MAIN = importlib.import_module("img2dataset.main")  # the module: the package's ``main`` is a function


class LimitedDownloader(Downloader):
    """img2dataset's downloader, with ``fetch_limits`` on every request of the shards it downloads."""

    def __init__(self, *args: Any, fetch_limits: FetchLimits, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fetch_limits = fetch_limits

    def __call__(self, row: Any) -> Any:
        urllib.request.install_opener(limited_opener(self.fetch_limits))  # this worker process only downloads
        return super().__call__(row)


@contextmanager
def limits_applied(limits: FetchLimits) -> Iterator[None]:
    """While the block runs, ``img2dataset.download`` downloads with ``limits``."""
    if getattr(IMG2DATASET_MAIN, "Downloader", None) is not Downloader:
        raise KopeError("img2dataset no longer builds img2dataset.downloader.Downloader in img2dataset.main: "
                        "the download limits cannot be applied with this img2dataset version")
    IMG2DATASET_MAIN.Downloader = functools.partial(LimitedDownloader, fetch_limits=limits)
    try:
        yield
    finally:
        IMG2DATASET_MAIN.Downloader = Downloader
