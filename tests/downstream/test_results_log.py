"""``results.jsonl``: identities, appends, a torn last line, and a damaged line in the middle."""

from __future__ import annotations

import json

import pytest

from pipeline.core.errors import KopeError
from pipeline.core.results import ResultsLog, evaluation_id


def test_identity_changes_with_weights_protocol_settings_and_data():
    base = ("a" * 64, "knn", {"ks": [10, 20]}, {"val": {"shards_sha256": "x"}})
    same = evaluation_id(*base)
    assert evaluation_id(*base) == same
    variants = [("b" * 64, *base[1:]), (base[0], "linear", *base[2:]), (*base[:2], {"ks": [10]}, base[3]),
                (*base[:3], {"val": {"shards_sha256": "y"}})]
    assert all(evaluation_id(*variant) != same for variant in variants)
    assert evaluation_id(base[0], base[1], {"ks": [10, 20], "t": 1}, base[3]) == evaluation_id(
        base[0], base[1], {"t": 1, "ks": [10, 20]}, base[3])  # key order does not matter


def test_append_find_and_torn_last_line(tmp_path):
    log = ResultsLog(tmp_path / "results.jsonl")
    assert log.records() == [] and log.find("x") is None
    log.append({"id": "one", "metrics": {"top1": 0.5}})
    with open(log.path, "a", encoding="utf-8") as handle:
        handle.write('{"id": "two", "metr')  # a writer killed mid-line
    assert [record["id"] for record in log.records()] == ["one"]
    log.append({"id": "two", "metrics": {"top1": 0.25}})
    lines = log.path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["one", "two"]  # the torn tail was cut, not kept
    assert log.find("two")["metrics"] == {"top1": 0.25}
    assert "time" in log.find("one")


def test_a_damaged_line_in_the_middle_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n', encoding="utf-8")
    with pytest.raises(KopeError, match=r"results.jsonl: line 2 is not JSON"):
        ResultsLog(path).records()
