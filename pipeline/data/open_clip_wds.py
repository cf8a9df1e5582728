"""open_clip's own trainer (``open_clip_train``) on our CLIP shards, with webdataset's end-of-shard record.

Since 0.2.96, webdataset's ``tar_file_expander`` yields an empty record ``{}`` after each shard, so that
samples of two shards are never merged. open_clip's training pipeline groups tar members with its own
``group_by_keys_nothrow``, which expects every record to have ``fname`` and ``data`` and fails on that one
with ``KeyError: 'fname'`` at the end of the first shard (open_clip issue #935, webdataset issue #384). The
cause is open_clip's copy of the grouping, not the shards: any webdataset tar fails the same way.

:func:`read_end_of_shard_records` swaps open_clip's ``tarfile_to_samples_nothrow`` for the same three steps
with the end-of-shard record left out (``eof_value=None``). Our sample keys start with the shard index, so
samples of consecutive shards never share a key and cannot be merged. Run open_clip's trainer through this
module, with its usual arguments::

    python -m pipeline.data.open_clip_wds --dataset-type webdataset --train-data 'DIR/{000000..000009}.tar' ...
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable, Iterator
from typing import Any


def read_end_of_shard_records() -> None:
    """Make ``open_clip_train.data.get_wds_dataset`` read shards from webdataset >= 0.2.96 (idempotent)."""
    from open_clip_train import data
    from webdataset.tariterators import tar_file_expander

    if "eof_value" in inspect.signature(tar_file_expander).parameters:
        data.tarfile_to_samples_nothrow = _tarfile_to_samples_without_end_records


def _tarfile_to_samples_without_end_records(src: Iterable[dict], handler: Any = None) -> Iterator[dict]:
    from open_clip_train.data import group_by_keys_nothrow, log_and_continue
    from webdataset.tariterators import tar_file_expander, url_opener

    handler = handler or log_and_continue
    files = tar_file_expander(url_opener(src, handler=handler), handler=handler, eof_value=None)
    return group_by_keys_nothrow(files, handler=handler)


def main(argv: list[str] | None = None) -> None:
    """``open_clip_train.main.main`` with :func:`read_end_of_shard_records` applied first."""
    read_end_of_shard_records()
    from open_clip_train.main import main as open_clip_main

    open_clip_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
