"""``results.jsonl``: one line per finished evaluation, appended, never rewritten.

A record is identified by what determines its numbers: the evaluated weights (sha256 of the weights file),
the protocol, its settings (with the model's preprocessing, which the export's config decides) and the data
(the manifests' shard hashes). An evaluation whose identity is already recorded is skipped, so an interrupted
or repeated evaluate stage resumes instead of recomputing.
Appends hold an exclusive lock, so evaluations running at the same time never interleave their lines.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.core.errors import KopeError
from pipeline.core.fsutil import canonical_json, sha256_text


def evaluation_id(checkpoint_sha256: str, protocol: str, settings: dict[str, Any], data: dict[str, Any]) -> str:
    """A stable identity of one evaluation: same weights, protocol, settings and data give the same id."""
    return sha256_text(canonical_json({"checkpoint": checkpoint_sha256, "protocol": protocol,
                                       "settings": settings, "data": data}))[:32]


class ResultsLog:
    """Reads and appends ``results.jsonl``; a torn last line (a killed writer) is ignored, and cut by the next
    append."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):
                    raise KopeError(f"{self.path}: line {number} is not JSON; fix or remove it") from None
        return records

    def find(self, eval_id: str) -> dict[str, Any] | None:
        """The latest record with this evaluation id, or None."""
        found = [record for record in self.records() if record.get("id") == eval_id]
        return found[-1] if found else None

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append ``record`` (with a ``time`` stamp) as one line and return it."""
        record = {**record, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked() as handle:
            self._drop_torn_tail(handle)
            handle.write(line.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        return record

    @contextmanager
    def _locked(self) -> Iterator[Any]:
        with open(self.path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield handle
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    @staticmethod
    def _drop_torn_tail(handle: Any) -> None:
        """Cut an unfinished last line (a writer killed mid-append): it never was a record."""
        handle.seek(0)
        data = handle.read()
        if data and not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)
