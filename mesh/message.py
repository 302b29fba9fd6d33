"""Typed wire messages: frozen dataclasses, a stable short tag each, strict decoding.

Theory of operation
-------------------
Each versioned protocol id has one *union* of message types (:class:`Protocol`). A message travels as the canonical
msgpack map ``{"t": TAG, **fields}``. :meth:`Protocol.decode` turns any bytes into one of the union's messages or raises
:class:`RemoteProtocolError`; nothing else escapes for any input (``tests/test_message.py`` fuzzes this). Field types are
checked against the dataclass annotations, so handlers never see a ``str`` where they expect ``bytes``.

Tags are part of the wire format and never derived from class names, so renaming a class cannot break a peer.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, TypeVar, Union

from hivecell.crypto.canonical import CanonicalError, canonical_packb, strict_unpackb

__all__ = ["Message", "Protocol", "RemoteProtocolError", "ErrorReply", "ErrorCode"]

M = TypeVar("M", bound="Message")


class RemoteProtocolError(Exception):
    """The peer sent bytes that are not a valid message of the protocol."""


class ErrorCode:
    """Error codes a node answers with. Peers receive these, never Python exception text."""

    BAD_FRAME = "bad_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    BAD_MESSAGE = "bad_message"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    REPLAY = "replay"
    WRONG_NODE = "wrong_node"
    FORBIDDEN = "forbidden"
    UNKNOWN_DATASET = "unknown_dataset"
    UNKNOWN_JOB = "unknown_job"
    BAD_RECIPE = "bad_recipe"
    BAD_PLAN = "bad_plan"
    NOT_READY = "not_ready"
    WITHHELD = "withheld"
    JOB_FAILED = "job_failed"
    BUSY = "busy"
    BUDGET_EXCEEDED = "budget_exceeded"
    TOO_LARGE = "too_large"  # a blob referred to is larger than the node takes
    UNAVAILABLE = "unavailable"  # something the request refers to could not be fetched from its sender
    INTERNAL = "internal"


class Message:
    """Base of all wire messages. Subclasses are frozen keyword-only dataclasses with a ``TAG``."""

    TAG: ClassVar[str]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ErrorReply(Message):
    TAG: ClassVar[str] = "err"
    code: str
    message: str = ""


def _check(value: Any, hint: Any, path: str) -> None:
    origin = typing.get_origin(hint)
    if hint is Any:
        return
    if origin in (Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                _check(value, option, path)
                return
            except RemoteProtocolError:
                continue
        raise RemoteProtocolError(f"{path}: unexpected type {type(value).__name__}")
    if hint is type(None):
        if value is not None:
            raise RemoteProtocolError(f"{path}: expected nil")
        return
    if origin is list:
        if not isinstance(value, list):
            raise RemoteProtocolError(f"{path}: expected a list")
        (item,) = typing.get_args(hint)
        for i, v in enumerate(value):
            _check(v, item, f"{path}[{i}]")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise RemoteProtocolError(f"{path}: expected a map")
        key_t, val_t = typing.get_args(hint)
        for k, v in value.items():
            _check(k, key_t, f"{path} key")
            _check(v, val_t, f"{path}.{k}")
        return
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RemoteProtocolError(f"{path}: expected a number")
        return
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RemoteProtocolError(f"{path}: expected an integer")
        return
    if hint in (str, bytes, bool):
        if not isinstance(value, hint):
            raise RemoteProtocolError(f"{path}: expected {hint.__name__}")
        return
    raise TypeError(f"unsupported annotation {hint!r} in a wire message")  # our bug, found by the round-trip tests


def _is_default(f: dataclasses.Field, value: object) -> bool:
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return False
    return type(value) is type(default) and value == default


class Protocol:
    """One versioned protocol id and the union of messages it carries."""

    def __init__(self, protocol_id: str, *messages: type[Message], max_frame: int) -> None:
        self.id = protocol_id
        self.max_frame = max_frame
        self._by_tag: dict[str, type[Message]] = {}
        self._hints: dict[type[Message], dict[str, Any]] = {}
        for cls in (ErrorReply, *messages):
            if cls.TAG in self._by_tag:
                raise ValueError(f"duplicate tag {cls.TAG!r} in {protocol_id}")
            self._by_tag[cls.TAG] = cls
            self._hints[cls] = typing.get_type_hints(cls)

    def encode(self, message: Message) -> bytes:
        cls = type(message)
        if self._by_tag.get(cls.TAG) is not cls:
            raise TypeError(f"{cls.__name__} is not a message of {self.id}")
        # A field left at its default is not sent: a field added later (with a default, last) then reaches a peer
        # that predates it only when it is used, and such a peer keeps answering the requests it understands.
        fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)  # type: ignore[arg-type]
                  if not _is_default(f, getattr(message, f.name))}
        data = canonical_packb({"t": cls.TAG, **fields})
        if len(data) > self.max_frame:
            raise ValueError(f"{cls.__name__} of {len(data)} bytes exceeds the {self.max_frame}-byte cap of {self.id}")
        return data

    def decode(self, data: bytes) -> Message:
        """Decode one message.

        Raises:
            RemoteProtocolError: for any bytes that are not a valid message of this protocol.
        """
        try:
            obj = strict_unpackb(data, max_len=self.max_frame)
        except CanonicalError as exc:
            raise RemoteProtocolError("not msgpack") from exc
        if not isinstance(obj, dict):
            raise RemoteProtocolError("message is not a map")
        tag = obj.pop("t", None)
        cls = self._by_tag.get(tag) if isinstance(tag, str) else None
        if cls is None:
            raise RemoteProtocolError("unknown message tag")
        hints = self._hints[cls]
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = [k for k in obj if k not in names]
        if unknown:  # keys may be bytes or huge: report a count and a short, safe sample only
            raise RemoteProtocolError(f"{len(unknown)} unknown field(s), e.g. {repr(unknown[0])[:32]}")
        for name, value in obj.items():
            _check(value, hints[name], name)  # name is one of ours here: safe to show
        try:
            return cls(**obj)
        except TypeError as exc:  # a required field is missing
            raise RemoteProtocolError("missing fields") from exc
        except ValueError as exc:  # __post_init__ validation
            raise RemoteProtocolError(str(exc)) from exc
