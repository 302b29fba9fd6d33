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


MAX_CONTAINERS = 100_000


def strict_unpackb(data: bytes, *, max_len: int, max_containers: int = MAX_CONTAINERS) -> Any:
    """Decode msgpack from an untrusted source.

    Besides the byte cap, the number of arrays and maps is capped: an empty array is one byte on the wire but a
    ~60-byte Python list, so without a count a 15 MB frame of nested empty arrays costs over 1 GB of memory.

    Raises:
        CanonicalError: the bytes are not a single well-formed msgpack value within the caps.
    """
    if len(data) > max_len:
        raise CanonicalError("value too large")
    budget = [max_containers]

    def count(value: Any) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise CanonicalError(f"more than {max_containers} arrays and maps")
        return value

    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            list_hook=count,
            object_hook=count,
            max_bin_len=max_len,
            max_str_len=max_len,
            max_array_len=min(max_len, 1 << 20),
            max_map_len=min(max_len, 1 << 16),
            max_ext_len=0,
        )
    except CanonicalError:
        raise
    except (ValueError, TypeError) as exc:  # ExtraData, FormatError, StackError, OutOfData, unhashable keys
        raise CanonicalError("malformed msgpack") from exc
