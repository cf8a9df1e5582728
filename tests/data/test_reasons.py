"""README's table of reasons is the list the stages count under (pipeline/data/reasons.py), no more, no less."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.data.reasons import RENAMED, SKIPPED, is_documented

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `([a-zA-Z0-9_]+)` \| (skipped|renamed) \| (.+) \|$")


def test_readme_documents_every_reason_and_only_those():
    rows = [ROW.match(line) for line in README.read_text(encoding="utf-8").splitlines()]
    documented = {match.group(1): match.group(2) for match in rows if match}
    assert documented == {**{reason: "skipped" for reason in SKIPPED}, **{reason: "renamed" for reason in RENAMED}}


def test_http_statuses_are_documented_by_their_pattern():
    assert is_documented("http_404") and is_documented("download_deadline")
    assert not is_documented("http_4040") and not is_documented("made_up")
