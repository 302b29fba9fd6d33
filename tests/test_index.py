"""The gossip index's pure core (mesh/index.py): verification, newest-wins, tombstones, bounds, search, anti-entropy."""

from __future__ import annotations

import os
import random

import pytest

from hivecell.crypto.identity import Identity
from hivecell.crypto.record import seal
from hivecell.mesh.index import (
    MAX_ADVERT_BYTES, AdvertIndex, Verdict, advert_key, parse_advert, parse_summary,
)

NOW = 1_800_000_000.0


def advert(identity: Identity, name: str, *, tags=("digits",), description: str = "", now: float = NOW,
           ttl: float = 3600, schema: dict | None = None, **extra) -> bytes:
    fields = {"name": name, "description": description or f"dataset {name}", "tags": list(tags),
              "schema": schema or {"num_samples": 100, "feature_names": ["pixel0", "pixel1"]}, **extra}
    return seal(identity, "advert", fields, ttl=ttl, now=now)


def tombstone(identity: Identity, name: str, *, now: float, ttl: float = 3600) -> bytes:
    return seal(identity, "advert", {"name": name, "tombstone": True}, ttl=ttl, now=now)


@pytest.fixture
def alice() -> Identity:
    return Identity.generate()


def test_a_valid_advert_is_filed_once(alice):
    index = AdvertIndex()
    raw = advert(alice, "mnist")
    assert index.offer(raw, now=NOW) is Verdict.NEW
    assert index.offer(raw, now=NOW) is Verdict.KNOWN
    held = index.get(advert_key(alice.peer_id, "mnist"))
    assert held is not None and held.raw == raw and held.signer == alice.peer_id and held.tags == ("digits",)
    assert index.counters == {"new": 1, "known": 1}


def test_bad_adverts_are_dropped_and_counted(alice):
    index = AdvertIndex()
    good = advert(alice, "mnist")
    forged = bytearray(good)
    forged[-5] ^= 1  # inside the signature
    other_domain = seal(alice, "job", {"name": "mnist", "description": "", "tags": [], "schema": {}}, now=NOW)
    expired = advert(alice, "old", now=NOW - 7200, ttl=60)
    future = advert(alice, "soon", now=NOW + 3600)
    oversized = advert(alice, "big", description="x" * 1000, schema={"junk": "y" * MAX_ADVERT_BYTES})
    malformed = seal(alice, "advert", {"name": "m", "description": "", "tags": "digits", "schema": {}}, now=NOW)
    nameless = seal(alice, "advert", {"description": "", "tags": [], "schema": {}}, now=NOW)
    cases = [(bytes(forged), Verdict.FORGED), (other_domain, Verdict.FORGED), (expired, Verdict.EXPIRED),
             (future, Verdict.EXPIRED), (oversized, Verdict.OVERSIZED), (malformed, Verdict.MALFORMED),
             (nameless, Verdict.MALFORMED), (b"", Verdict.FORGED), ("text", Verdict.MALFORMED)]
    for raw, verdict in cases:
        assert index.offer(raw, now=NOW) is verdict, verdict  # type: ignore[arg-type]
    assert len(index) == 0
    assert index.counters == {"forged": 3, "expired": 2, "oversized": 1, "malformed": 3}


def test_any_bytes_are_a_verdict_never_an_exception(alice):
    index = AdvertIndex()
    good = advert(alice, "mnist")
    rng = random.Random(7)
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        assert isinstance(index.offer(bytes(data[:rng.randint(0, len(data))]), now=NOW), Verdict)
        assert isinstance(index.offer(os.urandom(rng.randint(0, 300)), now=NOW), Verdict)


def test_newest_wins_and_an_older_one_is_a_replay(alice):
    index = AdvertIndex()
    v1, v2 = advert(alice, "mnist", description="first", now=NOW), advert(alice, "mnist", description="second",
                                                                         now=NOW + 10)
    assert index.offer(v1, now=NOW + 10) is Verdict.NEW
    assert index.offer(v2, now=NOW + 10) is Verdict.NEW
    assert index.offer(v1, now=NOW + 10) is Verdict.REPLAYED
    assert len(index) == 1 and index.search(["second"], now=NOW + 10)[0].raw == v2


def test_the_same_records_in_any_order_give_the_same_index(alice):
    bob = Identity.generate()
    # Two adverts of one key issued in the same second: the digest breaks the tie, the same way everywhere.
    records = [advert(alice, "mnist", description="a"), advert(alice, "mnist", description="b"),
               advert(bob, "mnist"), advert(bob, "cifar", now=NOW - 5), advert(bob, "cifar", now=NOW)]
    digests = set()
    for seed in range(6):
        shuffled = records[:]
        random.Random(seed).shuffle(shuffled)
        index = AdvertIndex()
        for raw in shuffled:
            index.offer(raw, now=NOW)
        assert len(index) == 3
        digests.add(index.digest())
    assert len(digests) == 1


def test_a_tombstone_hides_the_dataset_and_blocks_older_adverts(alice):
    index = AdvertIndex()
    live = advert(alice, "mnist", now=NOW)
    index.offer(live, now=NOW)
    assert [a.name for a in index.search(now=NOW)] == ["mnist"]
    assert index.offer(tombstone(alice, "mnist", now=NOW + 5), now=NOW + 5) is Verdict.NEW
    assert index.search(now=NOW + 5) == []
    assert index.offer(live, now=NOW + 5) is Verdict.REPLAYED  # a peer that missed the removal cannot revive it
    # Only the node itself can take its dataset back: another key's tombstone is another key.
    mallory = Identity.generate()
    index.offer(advert(alice, "cifar", now=NOW + 5), now=NOW + 5)
    index.offer(tombstone(mallory, "cifar", now=NOW + 6), now=NOW + 6)
    assert [a.name for a in index.search(now=NOW + 6)] == ["cifar"]
    # The owner adds it again later: a newer advert replaces the tombstone.
    assert index.offer(advert(alice, "mnist", now=NOW + 20), now=NOW + 20) is Verdict.NEW
    assert {a.name for a in index.search(now=NOW + 20)} == {"mnist", "cifar"}


def test_expired_adverts_leave_searches_and_are_swept(alice):
    changes = []
    index = AdvertIndex(on_change=lambda key, raw: changes.append((key, raw is None)))
    index.offer(advert(alice, "short", ttl=60, now=NOW), now=NOW)
    index.offer(advert(alice, "long", ttl=3600, now=NOW), now=NOW)
    assert {a.name for a in index.search(now=NOW + 61)} == {"long"}  # gone from searches at its expiry
    assert index.sweep(now=NOW + 61) == [advert_key(alice.peer_id, "short")]
    assert len(index) == 1 and index.counters["swept"] == 1
    assert changes[-1] == (advert_key(alice.peer_id, "short"), True)


def test_bounds_per_signer_and_overall(alice):
    index = AdvertIndex(max_per_signer=3, max_total=5)
    verdicts = [index.offer(advert(alice, f"d{i}"), now=NOW) for i in range(5)]
    assert verdicts == [Verdict.NEW] * 3 + [Verdict.FULL] * 2
    assert index.offer(advert(alice, "d0", now=NOW + 1), now=NOW + 1) is Verdict.NEW  # an update is no new key
    bob, carol = Identity.generate(), Identity.generate()
    assert [index.offer(advert(bob, f"b{i}"), now=NOW) for i in range(3)] == [Verdict.NEW, Verdict.NEW, Verdict.FULL]
    assert index.offer(advert(carol, "c"), now=NOW) is Verdict.FULL
    assert len(index) == 5
    # Room comes back when records expire.
    index.offer(advert(carol, "c2", ttl=10_000, now=NOW + 4000), now=NOW + 4000)
    assert index.get(advert_key(carol.peer_id, "c2")) is not None and len(index) == 1


def test_a_flooding_signer_is_throttled_without_starving_others(alice):
    index = AdvertIndex(max_per_signer=1000, rate=2.0, burst=10)
    flood = [index.offer(advert(alice, f"spam{i}"), throttle=True, now=NOW) for i in range(100)]
    assert flood.count(Verdict.NEW) == 10 and flood.count(Verdict.THROTTLED) == 90
    bob = Identity.generate()
    assert index.offer(advert(bob, "honest"), throttle=True, now=NOW) is Verdict.NEW
    # The bucket refills with time; anti-entropy (throttle=False) is bounded by the caps instead.
    assert index.offer(advert(alice, "later"), throttle=True, now=NOW + 1) is Verdict.NEW
    assert index.offer(advert(alice, "synced"), now=NOW + 1) is Verdict.NEW


def test_search_by_words_tags_and_fields(alice):
    index = AdvertIndex()
    index.offer(advert(alice, "digits-a", tags=("digits", "images"), description="Handwritten digits, 8x8"), now=NOW)
    index.offer(advert(alice, "heart", tags=("tabular", "medical"), description="Heart disease study",
                       schema={"num_samples": 300, "feature_names": ["age", "chol"]}), now=NOW)
    index.offer(tombstone(alice, "gone", now=NOW), now=NOW)

    def names(*words, **kw):
        return [a.name for a in index.search(words, now=NOW, **kw)]

    assert names() == ["digits-a", "heart"]
    assert names("HANDWRITTEN") == ["digits-a"]
    assert names("heart", "study") == ["heart"] and names("heart", "digits") == []
    assert names(tags=["digits"]) == ["digits-a"] and names(tags=["digits", "medical"]) == []
    assert names(fields=["chol"]) == ["heart"] and names(fields=["num_samples"]) == ["digits-a", "heart"]
    assert names("medical") == ["heart"]  # tags are words too
    assert names(limit=1) == ["digits-a"]


def test_anti_entropy_diff_converges_two_indexes(alice):
    bob = Identity.generate()
    a, b = AdvertIndex(), AdvertIndex()
    a.offer(advert(alice, "only-a"), now=NOW)
    b.offer(advert(bob, "only-b"), now=NOW)
    a.offer(advert(alice, "both", description="old", now=NOW - 10), now=NOW)
    b.offer(advert(alice, "both", description="new", now=NOW), now=NOW)
    a_sends, a_wants = a.diff(parse_summary(b.summary()))
    assert [x.name for x in a_sends] == ["only-a"]
    assert len(a_wants) == 2  # only-b, and the newer "both"
    for key in a_wants:
        a.offer(b.get(key).raw, now=NOW)
    for x in a_sends:
        b.offer(x.raw, now=NOW)
    assert a.digest() == b.digest() and len(a) == 3
    assert a.diff(parse_summary(b.summary())) == ([], [])


@pytest.mark.parametrize("data", [b"x", b"\0" * 33, b"\0" * (32 * (1 << 16) + 32)])
def test_a_bad_summary_is_refused(data):
    with pytest.raises(ValueError):
        parse_summary(data)


def test_parse_advert_reads_addresses_and_schema_fields(alice):
    raw = advert(alice, "mnist", addrs=[f"/ip4/10.0.0.1/tcp/4001/p2p/{alice.peer_id}"])
    parsed = parse_advert(raw, now=NOW)
    assert parsed.addrs == (f"/ip4/10.0.0.1/tcp/4001/p2p/{alice.peer_id}",)
    assert {"num_samples", "pixel0", "pixel1"} <= parsed.fields and not parsed.tombstone
    too_many = advert(alice, "mnist", addrs=[f"/ip4/10.0.0.{i}/tcp/1" for i in range(9)])
    assert AdvertIndex().offer(too_many, now=NOW) is Verdict.MALFORMED


def test_microseconds_order_records_of_the_same_second(alice):
    index = AdvertIndex()
    assert index.offer(advert(alice, "mnist", us=900_000), now=NOW) is Verdict.NEW
    later = seal(alice, "advert", {"name": "mnist", "tombstone": True, "us": 900_001}, now=NOW)
    assert index.offer(later, now=NOW) is Verdict.NEW and index.search(now=NOW) == []
    assert index.offer(advert(alice, "mnist", us=5), now=NOW) is Verdict.REPLAYED
    for bad in (-1, 1_000_000, "5", True):
        assert index.offer(advert(alice, "x", us=bad), now=NOW) is Verdict.MALFORMED
