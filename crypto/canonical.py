"""Canonical msgpack: one byte string per value, so signatures over re-encoded values are reproducible.

Maps are encoded with their keys sorted (keys must be ``str``), tuples as arrays, floats as float64. Anything else
(sets, objects, non-string keys) is refused: a signed value must not depend on Python's iteration order or ``repr``.
"""

from __future__ import annotations

from typing import Any

import msgpack

__all__ = ["canonical_packb", "strict_unpackb", "CanonicalError"]


class CanonicalError(ValueError):
    """A value that has no canonical encoding, or bytes that are not strict msgpack."""


def _canon(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, (list, tuple)):
        return [_canon(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise CanonicalError("map keys must be strings")
        return {k: _canon(value[k]) for k in sorted(value)}
    raise CanonicalError(f"type {type(value).__name__} has no canonical encoding")


def canonical_packb(value: Any) -> bytes:
    return msgpack.packb(_canon(value), use_bin_type=True, use_single_float=False)


def strict_unpackb(data: bytes, *, max_len: int) -> Any:
    """Decode msgpack from an untrusted source.

    Raises:
        CanonicalError: the bytes are not a single well-formed msgpack value within ``max_len``.
    """
    if len(data) > max_len:
        raise CanonicalError("value too large")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=max_len,
            max_str_len=max_len,
            max_array_len=1 << 20,
            max_map_len=1 << 16,
            max_ext_len=0,
        )
    except (ValueError, TypeError) as exc:  # ExtraData, FormatError, StackError, OutOfData, unhashable keys
        raise CanonicalError("malformed msgpack") from exc
