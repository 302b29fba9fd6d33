"""Daemons on loopback advertise their datasets into the gossip index: search, removal, restart, peers, bootstrap.

mDNS is off here (the LAN test in tests/test_lan.py runs it inside network namespaces); peers find each other by
``--bootstrap`` addresses.
"""

from __future__ import annotations

import json
import time

import pytest
import trio

from conftest import add_dataset, hc
from hivecell.node.client import Client
from hivecell.node.home import Home
from hivecell.node.localnet import start_daemon
from hivecell.node.store import Store


async def names(bootstrap: list[str], *, expect: int | None = None, timeout: float = 20.0, **query) -> list[str]:
    async with Client.join(bootstrap=bootstrap, mdns=False) as client:
        found = await client.search(timeout=timeout, expect=expect, **query)
    return sorted(f"{i.name}@{i.node[-4:]}" for i in found)


def until(predicate, what: str, timeout: float = 30.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


@pytest.fixture
def two_daemons(tmp_path, digits):
    x, y = digits
    a_home, b_home = Home(tmp_path / "a"), Home(tmp_path / "b")
    add_dataset(a_home, "digits-a", x[:100], y[:100], tags=("digits", "north"))
    add_dataset(b_home, "digits-b", x[100:200], y[100:200], tags=("digits", "south"))
    add_dataset(b_home, "heart", x[:50], y[:50], tags=("tabular",))
    a = start_daemon(a_home.path, "--warm-workers", "0")
    b = start_daemon(b_home.path, "--warm-workers", "0", "--bootstrap", a.address)
    try:
        yield a, b
    finally:
        b.stop()
        a.stop()


async def test_search_finds_every_node_through_one_index_peer(two_daemons):
    a, b = two_daemons
    tag = f"@{b.peer_id[-4:]}"
    # Asking A only: B's adverts reached A's index by anti-entropy when B dialled A, and by gossip.
    found = await names([a.address], tags=["digits"], expect=2)
    assert found == sorted([f"digits-a@{a.peer_id[-4:]}", f"digits-b{tag}"])
    assert await names([a.address], words=["heart"], expect=1) == [f"heart{tag}"]
    assert await names([a.address], tags=["south", "digits"]) == [f"digits-b{tag}"]
    assert await names([a.address], words=["no-such-thing"], timeout=3) == []
    # The advert carries where B listens, so a scientist who found it through A can reach B.
    async with Client.join(bootstrap=[a.address], mdns=False) as client:
        (info,) = await client.search(words=["heart"], expect=1, timeout=20)
        assert info.addrs == b.addrs and info.address == b.address
        listed = await client.to(info).datasets()
        assert {d.name for d in listed} == {"digits-b", "heart"}


async def test_a_removed_dataset_leaves_the_index_through_its_tombstone(two_daemons):
    a, b = two_daemons
    assert len(await names([a.address], tags=["digits"], expect=2)) == 2
    hc(b.home, "dataset", "remove", "digits-b")
    started = time.monotonic()
    with trio.fail_after(30):
        while len(await names([a.address], tags=["digits"], timeout=2)) != 1:
            await trio.sleep(0.2)
    took = time.monotonic() - started
    print(f"tombstone reached A's index {took:.1f} s after the removal")

    def persisted() -> bool:  # the tombstone replaced the advert in A's persisted index (written once a second)
        with Store.open(a.home / "store") as store:
            raws = [raw for _, raw in store.index_records()]
        return any(b"tombstone" in raw and b"digits-b" in raw for raw in raws)

    until(persisted, "the tombstone is in A's store", timeout=10)


def test_the_index_survives_a_restart_and_peers_are_listed(two_daemons, tmp_path):
    a, b = two_daemons
    def adverts(home) -> int:
        return json.loads((home / "peers.json").read_text())["index"]["adverts"] if (home / "peers.json").exists() \
            else 0

    until(lambda: adverts(a.home) == 3 and adverts(b.home) == 3, "both indexes hold the 3 adverts")
    info = json.loads(hc(a.home, "peers", "--json").stdout)
    assert info["daemon"] is True and info["index"]["role"] is True
    (row,) = [r for r in info["peers"] if r["peer_id"] == b.peer_id]
    assert row["connected"] and "inbound" in row["found_by"]
    info_b = json.loads(hc(b.home, "peers", "--json").stdout)
    (row_b,) = [r for r in info_b["peers"] if r["peer_id"] == a.peer_id]
    assert row_b["found_by"] == ["bootstrap"] and row_b["addrs"] == [a.address]
    human = hc(b.home, "peers").stdout
    assert a.peer_id in human and "bootstrap" in human and "3 adverts" in human

    # Each daemon reads the other's clock (/hivecell/time/1.0.0) and doctor reports it from peers.json.
    def clock_row(home, peer):
        rows = json.loads((home / "peers.json").read_text())["peers"]
        return next((r for r in rows if r["peer_id"] == peer and "clock_offset_s" in r), None)

    until(lambda: clock_row(a.home, b.peer_id) and clock_row(b.home, a.peer_id), "both daemons read a peer clock")
    row = clock_row(a.home, b.peer_id)
    assert abs(row["clock_offset_s"]) < 1.0 and 0 < row["clock_rtt_s"] < 5.0  # one box, one clock
    checks = json.loads(hc(a.home, "doctor", "--json", check=False).stdout)
    (peer_clocks,) = [c for c in checks if c["name"] == "peer-clocks"]
    assert peer_clocks["status"] == "ok" and "1 peer(s) read" in peer_clocks["detail"], peer_clocks
    assert "clock" in hc(a.home, "peers").stdout

    # A restarts alone (B stopped): its index comes back from its store, and answers at once.
    b.stop()
    a.stop()
    a2 = start_daemon(a.home, "--warm-workers", "0")
    try:
        found = trio.run(lambda: names([a2.address], tags=["digits"], timeout=5))
        assert found == sorted([f"digits-a@{a.peer_id[-4:]}", f"digits-b@{b.peer_id[-4:]}"])
    finally:
        a2.stop()


def test_search_cli_without_peers_and_with_bad_input(tmp_path, two_daemons):
    a, _ = two_daemons
    home = tmp_path / "scientist"
    lonely = hc(home, "search", "--no-mdns", "--timeout", "1", check=False)
    assert lonely.returncode == 3 and "no dataset found" in lonely.stderr
    out = hc(home, "search", "--no-mdns", "--bootstrap", a.address, "--tag", "digits", "--expect", "2", "--json",
             "--timeout", "20")
    rows = json.loads(out.stdout)
    assert sorted(r["name"] for r in rows) == ["digits-a", "digits-b"]
    assert all(r["schema"]["num_samples"] == 100 and r["addrs"] for r in rows)
    bad = hc(home, "search", "--bootstrap", "/ip4/127.0.0.1/tcp/1", check=False)
    assert bad.returncode == 2 and "names no peer" in bad.stderr
    bad = hc(home, "search", "--mdns", "--mdns-interface", "no-such-if0", "--timeout", "1", check=False)
    assert bad.returncode == 6 and "no interface named 'no-such-if0'" in bad.stderr
    human = hc(home, "search", "--no-mdns", "--bootstrap", a.address, "digits-a", "--timeout", "20").stdout
    assert "digits-a" in human and "100 samples" in human and "digits-b" not in human


def test_federate_finds_its_nodes_by_tag(tmp_path, two_daemons):
    a, b = two_daemons
    home = tmp_path / "modeller"
    out = hc(home, "federate", "--tag", "digits", "--rounds", "1", "--min-nodes", "2", "--json", "--no-mdns",
             "--bootstrap", a.address, "--timeout", "10", "--deadline", "120")
    result = json.loads(out.stdout)
    assert result["rounds"] == 1 and sorted(result["history"][0]["participants"]) == sorted([a.peer_id, b.peer_id])
    too_few = hc(home, "federate", "--tag", "south", "--rounds", "1", "--min-nodes", "2", "--no-mdns",
                 "--bootstrap", a.address, "--timeout", "3", check=False)
    assert too_few.returncode == 3 and "found 1 node(s) advertising tag 'south'" in too_few.stderr


async def test_the_dht_finds_a_dataset_that_no_index_peer_reaches(tmp_path, digits):
    x, y = digits
    a_home, c_home = Home(tmp_path / "a"), Home(tmp_path / "c")
    add_dataset(a_home, "near", x[:50], y[:50], tags=("digits",))
    add_dataset(c_home, "far", x[50:100], y[50:100], tags=("digits", "far-away"))
    # No index anywhere: A and C only hold their own adverts; C knows A, the scientist knows only A.
    a = start_daemon(a_home.path, "--warm-workers", "0", "--no-index")
    c = start_daemon(c_home.path, "--warm-workers", "0", "--no-index", "--bootstrap", a.address)
    try:
        # C puts its advert in the DHT a few seconds after it starts (DHT_FIRST_S); the scientist comes after that.
        until(lambda: "DHT: 1 of 1 adverts put" in c.log_path.read_text(errors="replace"), "C's advert in the DHT")
        async with Client.join(bootstrap=[a.address], mdns=False, dht=False) as client:
            without = await client.search(tags=["far-away"], timeout=4)
        assert without == []  # A is no index peer, and it holds no such dataset itself
        async with Client.join(bootstrap=[a.address], mdns=False) as client:
            found = await client.search(tags=["far-away"], expect=1, timeout=30)
            assert [(i.name, i.node) for i in found] == [("far", c.peer_id)]
            row = next(r for r in client.peers() if r["peer_id"] == c.peer_id)
            assert "dht" in row["found_by"]
    finally:
        c.stop()
        a.stop()


async def test_a_client_can_keep_an_index_in_process(two_daemons):
    a, b = two_daemons
    async with Client.join(bootstrap=[a.address], mdns=False, index=True) as client:
        with trio.fail_after(20):  # anti-entropy on connect fills the client's own index
            while len(client.gossip.index) < 3:
                await trio.sleep(0.1)
        assert {x.name for x in client.gossip.index.search()} == {"digits-a", "digits-b", "heart"}
        found = await client.search(tags=["south"], expect=1, timeout=10)
        assert [(i.name, i.node) for i in found] == [("digits-b", b.peer_id)]


async def test_a_peer_that_comes_back_with_the_same_identity_is_reached_at_once():
    """A host that closes takes its connections down with it (py-libp2p 0.8.1 left the sockets open), so a node does
    not keep a dead connection to that peer id: when a scientist joins again with the same identity in the same
    process, the node reaches the new host at once (before the fix: a 10 s wait, then an error) and reads its
    clock over the time protocol."""
    from hivecell.crypto.identity import Identity
    from hivecell.mesh.discovery import TIME_PROTOCOL, Discovery, TimeQuery, TimeReply
    from hivecell.mesh.host import open_host

    scientist = Identity.generate()
    async with open_host(Identity.generate()) as node:
        for _ in range(3):
            async with open_host(scientist) as host:
                host.serve(TIME_PROTOCOL, Discovery._answer_time)
                await host.connect(node.addrs()[0])
                with trio.fail_after(5):
                    reply = await node.request(host.peer_id, TIME_PROTOCOL, TimeQuery(), expect=TimeReply,
                                               timeout=5)
                assert abs(reply.wall - time.time()) < 5
            with trio.fail_after(5):
                while host.peer_id in node.connected_peers():  # the node sees the connection close
                    await trio.sleep(0.05)
