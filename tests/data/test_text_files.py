"""Text inputs as other tools save them: any byte order mark, and an error naming the line of bad bytes."""

from __future__ import annotations

import pytest

from pipeline.data.text_files import TextFileError, read_text

TEXT = "ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 1 2 3 4\n"


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_text_with_or_without_a_byte_order_mark_reads_the_same(tmp_path, encoding):
    path = tmp_path / "labels.csv"
    data = TEXT.encode(encoding)
    if encoding in ("utf-16-le", "utf-16-be"):  # these codecs write no mark: add the one editors write
        data = ("\ufeff" + TEXT).encode(encoding)
    path.write_bytes(data)
    assert read_text(path) == TEXT


def test_bytes_that_are_not_text_name_the_file_and_line(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_bytes(b"a n1\nb n2\ncaf\xe9 n3\n")
    with pytest.raises(TextFileError, match=r"labels\.txt: line 3: not UTF-8 text .*; save it as UTF-8$"):
        read_text(path)
    with pytest.raises(TextFileError, match=r"missing\.txt: cannot read: No such file"):
        read_text(tmp_path / "missing.txt")
