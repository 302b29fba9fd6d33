"""The gossip index's state: the newest valid advert per (node, dataset), bounded, searchable, comparable by digest.

Theory of operation
-------------------
Nodes sign a dataset *advert* (a ``crypto.record`` under the ``"advert"`` domain) and spread it by gossip and by
anti-entropy (``gossip.py``). Any peer may keep an :class:`AdvertIndex`; it is pure (no I/O, no trio) so every rule
below is tested without sockets, and the shell around it only moves bytes.

An advert is filed under its *key*, ``sha256(signer peer id, NUL, dataset name)[:16]``: only the node that holds a
dataset can advertise it or take it back. For one key the index keeps one record, the newest: the higher
``(issued_at, sha256(raw)[:8])`` wins, so every peer that has seen the same records keeps the same one whatever the
order they arrived in. ``issued_at`` here is the record's ``iat`` in microseconds: the signed seconds plus an optional
``us`` field (0..999999), so a dataset removed in the second it was advertised is still removed. An older record for
a key is *replayed* and dropped. A *tombstone* (an advert with
``"tombstone": True`` and no dataset fields) is an advert like any other: it replaces the advert and hides the dataset
from searches, and it is kept until its own expiry so that anti-entropy cannot bring the dataset back from a peer that
missed the removal.

What a hostile peer can do is bounded: a record over ``MAX_ADVERT_BYTES`` is refused before its signature is checked;
each signer has at most ``max_per_signer`` keys and a token bucket for what arrives by gossip; the whole index has at
most ``max_total`` records; expired records are swept. Every refusal is counted by reason in :attr:`counters`.

Anti-entropy compares *summaries*: per record 32 bytes (key 16, issued_at in microseconds 8, digest 8), sorted by
key. Given a peer's
summary, :meth:`AdvertIndex.diff` says which of our records it lacks and which of its keys we want. Two indexes that
hold the same records have the same :meth:`AdvertIndex.digest`.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from hivecell.crypto.record import InvalidRecord, open_record

__all__ = [
    "ADVERT_DOMAIN", "Advert", "AdvertIndex", "InvalidAdvert", "MAX_ADVERT_BYTES", "MAX_SUMMARY_ENTRIES", "Verdict",
    "advert_key", "parse_advert", "parse_summary",
]

ADVERT_DOMAIN = "advert"
MAX_ADVERT_BYTES = 32 << 10  # a dataset's description, schema, tags, addresses and a small mock preview
MAX_SUMMARY_ENTRIES = 1 << 16
_ENTRY = struct.Struct(">16sQ8s")  # key, issued_at, digest
KEY_BYTES = 16
MAX_TAGS = 32
MAX_ADDRS = 8
MAX_NAME = 64
MAX_DESCRIPTION = 2000
MAX_SEARCH_RESULTS = 500


class Verdict(str, Enum):
    """What :meth:`AdvertIndex.offer` did with a record."""

    NEW = "new"  # stored: a key not held, or newer than the record held
    KNOWN = "known"  # the very record held already
    REPLAYED = "replayed"  # valid, but older than the record held for its key
    FORGED = "forged"  # bad signature, or not an advert record
    EXPIRED = "expired"  # expired or issued in the future
    OVERSIZED = "oversized"
    MALFORMED = "malformed"  # validly signed, but not a well-formed advert
    FULL = "full"  # over the signer's or the index's cap
    THROTTLED = "throttled"  # the signer sent more by gossip than its rate allows

    @property
    def accepted(self) -> bool:
        return self in (Verdict.NEW, Verdict.KNOWN)


class InvalidAdvert(Exception):
    """A record that is not a usable advert; ``verdict`` says which kind of bad (for counters and logs)."""

    def __init__(self, verdict: Verdict, reason: str) -> None:
        super().__init__(reason)
        self.verdict, self.reason = verdict, reason


@dataclass(frozen=True)
class Advert:
    """A verified advert (or tombstone) as the index files it."""

    key: bytes
    signer: str  # peer id of the node that holds the dataset
    name: str
    issued_at: int  # microseconds: the record's iat (seconds) and its optional "us" field
    expires_at: int
    tombstone: bool
    tags: tuple[str, ...]
    addrs: tuple[str, ...]
    text: str  # lower-case name, description and tags, for word search
    fields: frozenset[str]  # schema keys and feature names, for field search
    digest: bytes  # sha256(raw)[:8]
    raw: bytes

    @property
    def rank(self) -> tuple[int, bytes]:
        return (self.issued_at, self.digest)

    def entry(self) -> bytes:
        return _ENTRY.pack(self.key, self.issued_at, self.digest)


def advert_key(signer: str, name: str) -> bytes:
    return hashlib.sha256(signer.encode() + b"\x00" + name.encode()).digest()[:KEY_BYTES]


def _str_list(value: Any, *, most: int, longest: int) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > most:
        raise ValueError
    if not all(isinstance(v, str) and 0 < len(v) <= longest for v in value):
        raise ValueError
    return tuple(value)


def parse_advert(unverified: bytes, *, now: float | None = None) -> Advert:
    """Verify a signed advert or tombstone and file it.

    Raises:
        InvalidAdvert: with the verdict (oversized, forged, expired, malformed) and a reason for local logs.
    """
    if not isinstance(unverified, (bytes, bytearray)):
        raise InvalidAdvert(Verdict.MALFORMED, "not bytes")
    if len(unverified) > MAX_ADVERT_BYTES:
        raise InvalidAdvert(Verdict.OVERSIZED, f"{len(unverified)} bytes, the cap is {MAX_ADVERT_BYTES}")
    raw = bytes(unverified)
    try:
        record = open_record(raw, domain=ADVERT_DOMAIN, now=now, max_bytes=MAX_ADVERT_BYTES)
    except InvalidRecord as exc:
        verdict = Verdict.EXPIRED if exc.reason in ("expired", "issued in the future") else Verdict.FORGED
        raise InvalidAdvert(verdict, exc.reason) from None
    f = record.fields()
    try:
        us = f.get("us", 0)
        if not (isinstance(us, int) and not isinstance(us, bool) and 0 <= us < 1_000_000):
            raise ValueError
        name = f["name"]
        if not (isinstance(name, str) and 0 < len(name) <= MAX_NAME):
            raise ValueError
        tombstone = f.get("tombstone", False) is True
        if tombstone:
            tags: tuple[str, ...] = ()
            addrs: tuple[str, ...] = ()
            text, fields = "", frozenset()
        else:
            tags = _str_list(f["tags"], most=MAX_TAGS, longest=32)
            addrs = _str_list(f.get("addrs", []), most=MAX_ADDRS, longest=256)
            description, schema = f["description"], f["schema"]
            if not (isinstance(description, str) and len(description) <= MAX_DESCRIPTION and isinstance(schema, dict)):
                raise ValueError
            names = schema.get("feature_names", [])
            fields = frozenset([str(k) for k in schema] + ([str(n) for n in names] if isinstance(names, list) else []))
            text = "\n".join([name, description, *tags]).lower()
    except (KeyError, TypeError, ValueError):
        raise InvalidAdvert(Verdict.MALFORMED, "not a well-formed advert") from None
    return Advert(key=advert_key(record.signer, name), signer=record.signer, name=name,
                  issued_at=record.issued_at * 1_000_000 + us,
                  expires_at=record.expires_at, tombstone=tombstone, tags=tags, addrs=addrs, text=text,
                  fields=fields, digest=hashlib.sha256(raw).digest()[:8], raw=raw)


def parse_summary(data: bytes) -> dict[bytes, tuple[int, bytes]]:
    """A peer's summary as ``key -> (issued_at, digest)``.

    Raises:
        ValueError: not a whole number of entries, or more than ``MAX_SUMMARY_ENTRIES``.
    """
    if len(data) % _ENTRY.size or len(data) // _ENTRY.size > MAX_SUMMARY_ENTRIES:
        raise ValueError(f"a summary is up to {MAX_SUMMARY_ENTRIES} entries of {_ENTRY.size} bytes")
    return {key: (iat, digest) for key, iat, digest in _ENTRY.iter_unpack(data)}


class _Buckets:
    """Token buckets per signer, at most ``size`` of them (the least recently used is forgotten)."""

    def __init__(self, rate: float, burst: float, size: int = 4096) -> None:
        self.rate, self.burst, self.size = rate, burst, size
        self._state: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, signer: str, now: float) -> bool:
        tokens, last = self._state.pop(signer, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        ok = tokens >= 1.0
        self._state[signer] = (tokens - 1.0 if ok else tokens, now)
        if len(self._state) > self.size:
            self._state.popitem(last=False)
        return ok


class AdvertIndex:
    """The newest valid advert per key, bounded; see the module docstring.

    Args:
        max_per_signer: keys one node may hold in the index (its datasets and tombstones).
        max_total: records in the index.
        rate, burst: the token bucket per signer for records offered with ``throttle=True`` (gossip).
        on_change: called with ``(key, raw)`` when a record is stored and ``(key, None)`` when one is dropped, so a
            shell can persist the index.
        clock: the time source, injectable for tests.
    """

    def __init__(self, *, max_per_signer: int = 64, max_total: int = 20_000, rate: float = 2.0, burst: float = 32.0,
                 on_change: Callable[[bytes, bytes | None], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.max_per_signer, self.max_total = max_per_signer, max_total
        self._buckets = _Buckets(rate, burst)
        self.on_change = on_change
        self._clock = clock
        self._by_key: dict[bytes, Advert] = {}
        self._per_signer: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: bytes) -> Advert | None:
        return self._by_key.get(key)

    def adverts(self) -> list[Advert]:
        return list(self._by_key.values())

    def offer(self, raw: bytes, *, throttle: bool = False, now: float | None = None) -> Verdict:
        """Verify ``raw`` and keep it if it is the newest record for its key. Never raises for any input."""
        now = self._clock() if now is None else now
        try:
            advert = parse_advert(raw, now=now)
        except InvalidAdvert as exc:
            self.counters[exc.verdict.value] += 1
            return exc.verdict
        verdict = self._file(advert, throttle=throttle, now=now)
        self.counters[verdict.value] += 1
        return verdict

    def _file(self, advert: Advert, *, throttle: bool, now: float) -> Verdict:
        held = self._by_key.get(advert.key)
        if held is not None:
            if advert.rank == held.rank:
                return Verdict.KNOWN
            if advert.rank < held.rank:
                return Verdict.REPLAYED
        if throttle and not self._buckets.take(advert.signer, now):
            return Verdict.THROTTLED
        if held is None:
            if self._per_signer[advert.signer] >= self.max_per_signer:
                return Verdict.FULL
            if len(self._by_key) >= self.max_total:
                self.sweep(now=now)
                if len(self._by_key) >= self.max_total:
                    return Verdict.FULL
            self._per_signer[advert.signer] += 1
        self._by_key[advert.key] = advert
        if self.on_change is not None:
            self.on_change(advert.key, advert.raw)
        return Verdict.NEW

    def sweep(self, *, now: float | None = None) -> list[bytes]:
        """Drop every expired record; returns their keys."""
        now = self._clock() if now is None else now
        gone = [k for k, a in self._by_key.items() if a.expires_at < now]
        for key in gone:
            self._drop(key)
        if gone:
            self.counters["swept"] += len(gone)
        return gone

    def _drop(self, key: bytes) -> None:
        advert = self._by_key.pop(key)
        self._per_signer[advert.signer] -= 1
        if not self._per_signer[advert.signer]:
            del self._per_signer[advert.signer]
        if self.on_change is not None:
            self.on_change(key, None)

    # -- search ----------------------------------------------------------------------------------------------------
    def search(self, words: Iterable[str] = (), *, tags: Iterable[str] = (), fields: Iterable[str] = (),
               limit: int = 100, now: float | None = None) -> list[Advert]:
        """Live adverts (not tombstones, not expired) that contain every word (in the name, description or tags),
        carry every tag and have every schema field; sorted by name, then node."""
        now = self._clock() if now is None else now
        words = [w.lower() for w in words if w]
        tags, fields = set(tags), set(fields)
        hits = [a for a in self._by_key.values()
                if not a.tombstone and a.expires_at >= now and tags.issubset(a.tags) and fields <= a.fields
                and all(w in a.text for w in words)]
        hits.sort(key=lambda a: (a.name, a.signer))
        return hits[:max(0, min(limit, MAX_SEARCH_RESULTS))]

    # -- anti-entropy ----------------------------------------------------------------------------------------------
    def summary(self) -> bytes:
        return b"".join(a.entry() for a in sorted(self._by_key.values(), key=lambda a: a.key))

    def digest(self) -> str:
        """sha256 of the summary: equal for two indexes that hold the same records."""
        return hashlib.sha256(self.summary()).hexdigest()

    def diff(self, remote: dict[bytes, tuple[int, bytes]]) -> tuple[list[Advert], list[bytes]]:
        """Given a peer's parsed summary: (our records it lacks or holds older, its keys we lack or hold older)."""
        theirs_newer = [key for key, rank in remote.items()
                        if key not in self._by_key or self._by_key[key].rank < rank]
        ours_newer = [a for key, a in self._by_key.items() if key not in remote or remote[key] < a.rank]
        return ours_newer, theirs_newer
