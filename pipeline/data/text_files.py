"""Small text inputs (label lists, class names, CSVs) read as other tools save them: a UTF-8, UTF-16 or UTF-32
byte order mark is honoured and dropped (Excel and Windows editors write one), and bytes that are not text
are one error naming the file and the line."""

from __future__ import annotations

import codecs
from pathlib import Path

from pipeline.core.errors import KopeError

# UTF-32's little-endian mark starts with UTF-16's, so it is tried first
BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
                    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


class TextFileError(KopeError):
    """A text input that cannot be read or decoded."""


def read_text(path: Path) -> str:
    """The text of ``path``: UTF-8 unless a byte order mark says otherwise, the mark itself removed."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TextFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    encoding = next((name for mark, name in BYTE_ORDER_MARKS if data.startswith(mark)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[:exc.start].decode(encoding, "replace").count("\n") + 1
        raise TextFileError(f"{path}: line {line}: not {encoding.removesuffix('-sig').upper()} text "
                            f"({exc.reason} at byte {exc.start}); save it as UTF-8") from None
