"""Sample uids as text, whatever type an input stores them in, and DataComp's uid subset file.

A uid column may hold integers (LAION's ``SAMPLE_ID``, any int64 key), strings (DataComp's 32 hex digits) or
bytes; every uid is stored as a string in the sample's json: integers in decimal, bytes in lowercase hex (a
16-byte binary uid becomes DataComp's 32-hex-digit form), strings as they are. A column of any other type
(floats, lists, ...) is a mistake in the input or in ``uid_col``, and is one error naming the file and column.

The uid subset file is DataComp's: a sorted numpy array of dtype ``u8,u8`` (the 128-bit hex uid's high and
low halves), as ``.npy`` or raw memory-mapped; an ``(n, 2)`` uint64 array works too.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.core.errors import KopeError

UID_HEX = re.compile(r"^[0-9a-fA-F]{32}$")
UID_DTYPE = np.dtype("u8,u8")


class UidColumnError(KopeError):
    """A uid column whose type cannot hold identifiers."""


def uid_text(value: Any) -> str | None:
    """One uid as stored: ``None`` when missing or empty; raises TypeError for a value of another kind."""
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex() or None
    raise TypeError(f"a uid must be an integer, a string or bytes, got {type(value).__name__} {value!r}")


def uid_column(column: pa.ChunkedArray | pa.Array, file: Path | str, name: str) -> list[str | None]:
    """The uids of ``column`` (``name`` in ``file``) as text, ``None`` where missing."""
    kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    if not (pa.types.is_null(kind) or pa.types.is_integer(kind) or pa.types.is_string(kind)
            or pa.types.is_large_string(kind) or pa.types.is_string_view(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)
            or pa.types.is_fixed_size_binary(kind)):
        raise UidColumnError(f"{file}: column {name!r}: uids must be integers, strings or bytes, got {column.type}")
    return [uid_text(value) for value in column.to_pylist()]


def uid_pair(uid: str) -> tuple[int, int]:
    """A uid as DataComp's (high, low) uint64 pair; a uid that is not 32 hex digits is hashed to one."""
    value = int(uid, 16) if UID_HEX.match(uid) else int.from_bytes(
        hashlib.blake2b(uid.encode("utf-8"), digest_size=16).digest(), "big")
    return value >> 64, value & 0xFFFF_FFFF_FFFF_FFFF


def uid_pairs(uids: list[str]) -> np.ndarray:
    """Many uids as DataComp's ``u8,u8`` pairs: 32-hex-digit uids converted in one vectorised pass, any
    others hashed (128 bits, see :func:`uid_pair`)."""
    pairs = np.zeros(len(uids), UID_DTYPE)
    if not uids:
        return pairs
    text = np.array(uids, dtype=object)
    hexadecimal = np.fromiter((len(uid) == 32 and UID_HEX.match(uid) is not None for uid in uids), bool, len(uids))
    if hexadecimal.any():
        digits = np.frombuffer("".join(text[hexadecimal]).encode("ascii"), np.uint8).reshape(-1, 32)
        nibbles = _HEX_VALUES[digits].astype(np.uint64)
        shifts = np.arange(60, -4, -4, dtype=np.uint64)
        pairs["f0"][hexadecimal] = (nibbles[:, :16] << shifts).sum(axis=1, dtype=np.uint64)
        pairs["f1"][hexadecimal] = (nibbles[:, 16:] << shifts).sum(axis=1, dtype=np.uint64)
    for i in np.flatnonzero(~hexadecimal):
        pairs[i] = uid_pair(uids[i])
    return pairs


_HEX_VALUES = np.zeros(256, np.uint8)
for _value, _digit in enumerate("0123456789abcdef"):
    _HEX_VALUES[ord(_digit)] = _HEX_VALUES[ord(_digit.upper())] = _value


def load_uid_subset(path: Path, check_sorted: bool = True) -> np.ndarray:
    """DataComp's sorted ``u8,u8`` uid array from ``.npy`` or a raw memory-mapped file (``check_sorted``:
    refuse an unsorted one, which reads the whole file once)."""
    path = Path(path)
    try:
        array = np.load(path, mmap_mode="r") if path.suffix == ".npy" else np.memmap(path, UID_DTYPE, mode="r")
    except (OSError, ValueError) as exc:
        raise KopeError(f"{path}: unreadable uid subset: {exc}") from None
    if array.dtype != UID_DTYPE:
        if array.ndim != 2 or array.shape[1] != 2 or array.dtype != np.uint64:
            raise KopeError(f"{path}: expected a u8,u8 structured array or (n, 2) uint64, got {array.dtype} "
                            f"{array.shape}")
        array = np.ascontiguousarray(array).view(UID_DTYPE).reshape(-1)
    high, low = (array[name] for name in UID_DTYPE.names)
    if check_sorted and not np.all((high[1:] > high[:-1]) | ((high[1:] == high[:-1]) & (low[1:] >= low[:-1]))):
        raise KopeError(f"{path}: uid subset is not sorted (sort it as DataComp's resharder requires)")
    return array


def in_subset(uids: list[str], subset: np.ndarray) -> np.ndarray:
    """Boolean mask: which ``uids`` are in the sorted ``subset``."""
    if not uids or not len(subset):
        return np.zeros(len(uids), bool)
    pairs = uid_pairs(uids)
    where = np.minimum(np.searchsorted(subset, pairs), len(subset) - 1)
    return subset[where] == pairs
