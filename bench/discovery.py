"""Discovery and the gossip index: time to searchable on a LAN, convergence of N index peers, search latency, and the
idle daemon with discovery on; prints one JSON object.

Goals (the discovery issue): a new node is searchable from anywhere on the LAN within 2 s of starting; 100 index
peers converge within 10 s with no advert lost; an idle daemon uses at most 150 MB RSS and under 1% of one core.

Sections, run one after the other (never two at once: the dev box has 2 shared cores):

  lan_searchable_s   Real daemons (``hivecell run --mdns --mdns-interface IP --warm-workers 0``, one dataset each) in
                     network namespaces of a throw-away LAN (tests/netlan.py; multicast never leaves them). A client
                     (this file with ``--lan-client``, ``Client.join`` browsing mDNS on its member's address, started
                     first) watches. Base daemons start one at a time in members 1..B and settle; then each trial
                     starts a fresh daemon in the next member and times, from its Popen: ``daemon.json`` written
                     (``daemon_start_s``: the baseline, the daemon's own start), the client finding it by mDNS and
                     connected to it, its dataset answered by an ``IndexSearch`` from any peer (``searchable``: what a
                     client that asks around gets), and its dataset held by the index of every daemon that was up before
                     it (``in_every_index``: gossip reached the others). Values from the start of the process and from
                     the daemon being ready are reported per trial, with medians. The client polls every 0.1 s only
                     the peers that do not yet have the awaited dataset. At the end a cold ``hivecell search --expect
                     ALL`` runs in the client's member (``cold_cli_search``; baseline: ``import`` of the client
                     module in a fresh python). hivecell's bytecode is written first (``bytecode_compiled_first``),
                     as an install leaves it: this sandbox never writes it on import. Where namespaces cannot be made
                     the section is ``{"skipped": reason}`` and the rest goes on.
  convergence        For each N in --peers, N index peers (``open_gossip``, ``GossipConfig(index=True,
                     sync_interval=10)``, as the daemon) on 127.0.0.1, at most --per-process per worker process (this
                     file with ``--worker``) and at least one process per core. Peer i dials 1..3 random earlier
                     peers (2-3 from peer 3 on, fixed by --seed); once every peer's gossipsub mesh has formed, every
                     peer publishes one advert at the same instant. Measured: the time until every index holds all N
                     adverts (per peer; the max is the convergence time), adverts lost (missing from any index after
                     --converge-timeout; ``held_rising_at_timeout`` says whether they were still arriving), digests
                     equal, the share of all N*N (index, advert) pairs held each second, how adverts were filed (by
                     the gossipsub validator or by anti-entropy), anti-entropy's outcomes (syncs that failed and why,
                     peers it marked as not running the index), ``GossipIndex.messages`` and gossipsub RPCs sent
                     (``Pubsub.write_msg`` is wrapped in the workers) until each process's peers were complete, CPU
                     per filed advert, and per process CPU seconds and RSS. On a box with fewer cores than peers the
                     run is CPU-bound: all N peers share its cores, where real nodes would each have their own.
  search_latency_ms  One index peer (``--index-server``, with a DHT server beside it as a daemon has) holding
                     --adverts adverts from --adverts/10 signers, on loopback: ``IndexSearch`` request/response times
                     from another process (median, p90, and the server's CPU per request), and ``Client.search(...,
                     expect=k)`` end to end (every hit verified, as the client does), with the default client (which
                     also asks the DHT on a tag search) and with ``dht=False``. Baseline: the same queries on an
                     identical in-process ``AdvertIndex.search``.
  idle_daemon        ``hivecell run --no-mdns --warm-workers 0`` on loopback with one dataset (discovery, the index and
                     anti-entropy run, as they always do): RSS and CPU over --idle-sample seconds after --idle-settle
                     (8 s: a daemon's one-off start-up work, its first DHT puts at 5 s and first clock reads 3 s after
                     a peer connects, is over by then), alone and (not with --quick) while connected to a second
                     daemon. Baselines: the RSS of a
                     python that only imports libp2p, dp_accounting, or the daemon's module. Reuses
                     bench/idle_daemon.py's helpers.

Usage: ``python bench/discovery.py [--peers 20,50,100] [--skip-lan] [--quick]``; ``--sections`` picks sections.
Progress goes to stderr, the JSON to stdout. Every process started is stopped, every namespace deleted, every
temporary home removed on exit (Ctrl-C and SIGTERM included). Linux only (/proc, namespaces need root).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import queue
import random
import re
import resource
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve()
sys.path.insert(0, str(ROOT / "tests"))  # netlan
sys.path.insert(0, str(ROOT / "bench"))  # idle_daemon's helpers

# Nothing this benchmark starts outside a namespace may announce on the machine's interfaces: daemons there get
# --no-mdns too, and namespace daemons turn mDNS on with an explicit flag and interface.
os.environ["HIVECELL_MDNS"] = "0"

GOALS = {"lan_searchable_s_max": 2.0, "convergence_peers": 100, "convergence_s_max": 10.0, "adverts_lost": 0,
         "idle_rss_mb_max": 150, "idle_cpu_percent_max": 1.0}
CLI = [sys.executable, "-m", "hivecell.node.cli"]
MB = 1024 * 1024
_T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[discovery +{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def _r(value: float | None, nd: int = 3) -> float | None:
    return None if value is None else round(value, nd)


def _pct(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation; None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return round(int(fields["VmRSS"].split()[0]) / 1024, 1)


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return round(int(fields["VmHWM"].split()[0]) / 1024, 1)


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _quiet_logging() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # py-libp2p's root logger does not propagate, and importing libp2p clears its handlers (libp2p.utils.logging):
    # import it first, then give it the same handler.
    import libp2p  # noqa: F401

    for handler in logging.getLogger().handlers:
        logging.getLogger("libp2p").addHandler(handler)


def _base_record(rows: int = 20, seed: int = 0) -> dict[str, Any]:
    """A small dataset record (digits-shaped, random values): its advert is the size a real one is."""
    import numpy as np
    from hivecell.node.dataset import make_record

    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(rows, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=rows).astype(np.int64)
    return make_record(name="bench-base", features=x, labels=y, feature_names=[], description="bench",
                       tags=["bench"], owner="", seed=seed)


# =====================================================================================================================
# Child processes: a convergence worker, an index server, a LAN client. Each speaks JSON lines on stdin/stdout.
# =====================================================================================================================

_RPC: dict[str, int] = {}
_FILED = {"gossip": 0, "anti_entropy": 0}
_SYNCS: dict[str, Any] = {}


def _patch_counters() -> None:
    """Count gossipsub RPCs written and how each advert was filed, in this (worker) process only."""
    from hivecell.mesh.gossip import GossipIndex
    from hivecell.mesh.index import Verdict
    from libp2p.pubsub.pubsub import Pubsub

    for key in ("rpcs", "bytes", "publish_msgs", "ihave", "iwant", "graft", "prune", "idontwant", "subscriptions"):
        _RPC[key] = 0
    write_msg = Pubsub.write_msg

    async def counted_write_msg(self, stream, rpc_msg):
        _RPC["rpcs"] += 1
        _RPC["bytes"] += rpc_msg.ByteSize()
        _RPC["publish_msgs"] += len(rpc_msg.publish)
        _RPC["subscriptions"] += len(rpc_msg.subscriptions)
        if rpc_msg.HasField("control"):
            c = rpc_msg.control
            _RPC["ihave"] += len(c.ihave)
            _RPC["iwant"] += len(c.iwant)
            _RPC["graft"] += len(c.graft)
            _RPC["prune"] += len(c.prune)
            _RPC["idontwant"] += len(getattr(c, "idontwant", ()))
        return await write_msg(self, stream, rpc_msg)

    Pubsub.write_msg = counted_write_msg

    validate = GossipIndex._validate

    def counted_validate(self, forwarder, msg):
        before = self.index.counters[Verdict.NEW.value]
        ok = validate(self, forwarder, msg)
        if self.index.counters[Verdict.NEW.value] > before:
            _FILED["gossip"] += 1
        return ok

    GossipIndex._validate = counted_validate
    offer_all = GossipIndex._offer_all

    def counted_offer_all(self, adverts):
        new = offer_all(self, adverts)
        _FILED["anti_entropy"] += new
        return new

    GossipIndex._offer_all = counted_offer_all
    sync = GossipIndex.sync

    async def counted_sync(self, peer):
        t = time.monotonic()
        try:
            filed = await sync(self, peer)
        except Exception as exc:
            code = getattr(exc, "code", "")
            # The message without peer ids and numbers: "no reply from <peer> within N s", "cannot open ...", ...
            what = _PEER_ID.sub("<peer>", str(exc).splitlines()[0] if str(exc) else "")
            what = re.sub(r"\d+", "N", re.sub(r"\b(from|to) [1-9A-HJ-NP-Za-km-z]{8}\b", r"\1 <peer>", what))[:90]
            key = f"{type(exc).__name__}{':' + code if code else ''}: {what}"
            _SYNCS[key] = _SYNCS.get(key, 0) + 1
            raise
        _SYNCS["ok"] = _SYNCS.get("ok", 0) + 1
        _SYNCS["ok_s_max"] = max(_SYNCS.get("ok_s_max", 0), round(time.monotonic() - t, 2))
        return filed

    GossipIndex.sync = counted_sync


async def _read_line() -> str:
    import trio

    return await trio.to_thread.run_sync(sys.stdin.readline)


class _SimPeer:
    def __init__(self, number: int) -> None:
        from hivecell.crypto.identity import Identity
        from hivecell.mesh.index import AdvertIndex

        self.number = number
        self.identity = Identity.generate()
        self.index = AdvertIndex()
        self.host = None
        self.gossip = None
        self.raw = b""
        self.done_at: float | None = None
        self.error = ""


async def _run_sim_peer(peer: _SimPeer, sync_interval: float, *, task_status) -> None:
    import trio
    from hivecell.mesh.gossip import GossipConfig, open_gossip
    from hivecell.mesh.host import open_host

    try:
        async with open_host(peer.identity, ["/ip4/127.0.0.1/tcp/0"]) as host, trio.open_nursery() as nursery:
            peer.host = host
            peer.gossip = await open_gossip(host, peer.index, GossipConfig(index=True, sync_interval=sync_interval),
                                            nursery)
            task_status.started()
            await trio.sleep_forever()
    except Exception as exc:  # noqa: BLE001 - one peer's crash is a result to report; its process's other peers go on
        peer.error = repr(exc)[:300]
        print(f"peer {peer.number} crashed: {exc!r}", file=sys.stderr, flush=True)


async def _dial(peer: _SimPeer, addr: str, limiter, failed: list[str]) -> None:
    import trio

    async with limiter:
        try:
            with trio.fail_after(30):
                await peer.host.connect(addr)
        except (Exception, trio.TooSlowError) as exc:  # noqa: BLE001 - every failed dial is reported
            failed.append(f"{peer.number}->{addr[-8:]}: {exc!r}"[:200])


async def _worker_main() -> None:
    import trio
    from hivecell.mesh.gossip import TOPIC
    from hivecell.mesh.index import advert_key
    from hivecell.node.dataset import make_advert

    _patch_counters()
    peers: list[_SimPeer] = []
    _emit({"ready": True, "pid": os.getpid()})
    async with trio.open_nursery() as nursery:
        while True:
            line = await _read_line()
            if not line:
                os._exit(0)
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "start":
                t = time.monotonic()
                for number in cmd["numbers"]:
                    peer = _SimPeer(number)
                    await nursery.start(_run_sim_peer, peer, float(cmd["sync_interval"]))
                    peers.append(peer)
                _emit({"addrs": [p.host.addrs()[0] for p in peers], "peer_ids": [p.host.peer_id for p in peers],
                       "s": time.monotonic() - t})
            elif op == "connect":
                t = time.monotonic()
                limiter = trio.CapacityLimiter(8)
                failed: list[str] = []

                async with trio.open_nursery() as dials:
                    for local, addr in cmd["dials"]:
                        dials.start_soon(_dial, peers[local], addr, limiter, failed)
                _emit({"failed": failed, "s": time.monotonic() - t})
            elif op == "status":
                out = []
                for p in peers:
                    router = p.gossip._pubsub.router if p.gossip is not None and p.gossip._pubsub else None
                    mesh = len(router.mesh.get(TOPIC, ())) if router is not None else 0
                    out.append({"connected": len(p.host.connected_peers()) if p.host else 0, "mesh": mesh,
                                "degree_low": getattr(router, "degree_low", 1), "error": p.error})
                _emit({"peers": out, "cpu_s": _cpu_s(), "rss_mb": _rss_mb()})
            elif op == "prepare":
                record = _base_record(seed=1)
                now = time.time()
                for p in peers:
                    rec = dict(record, name=f"conv-{p.number}", description=f"convergence advert of peer {p.number}",
                               owner=p.identity.peer_id)
                    p.raw = make_advert(p.identity, rec, addrs=p.host.addrs()[:1], now=now)
                _emit({"keys": [advert_key(p.identity.peer_id, f"conv-{p.number}").hex() for p in peers],
                       "bytes": [len(p.raw) for p in peers]})
            elif op == "publish":
                expect, deadline = int(cmd["expect"]), float(cmd["at"]) + float(cmd["timeout"])
                cpu0, msgs0, rpc0 = _cpu_s(), _sum_messages(peers), dict(_RPC)
                await trio.sleep(max(0.0, float(cmd["at"]) - time.monotonic()))
                t_pub = time.monotonic()
                async with trio.open_nursery() as pubs:
                    for p in peers:
                        pubs.start_soon(p.gossip.publish, p.raw)
                published_s = time.monotonic() - t_pub
                timeline: list[int] = []  # adverts held over all our peers, each second after "at"
                while True:
                    now = time.monotonic()
                    for p in peers:
                        if p.done_at is None and len(p.index) >= expect:
                            p.done_at = now
                    while now - float(cmd["at"]) >= len(timeline):
                        timeline.append(sum(len(p.index) for p in peers))
                    if all(p.done_at is not None for p in peers) or now > deadline:
                        break
                    await trio.sleep(0.02)
                msgs = _sum_messages(peers)
                _emit({"done_at": [p.done_at for p in peers], "published_at": t_pub, "publish_s": published_s,
                       "timeline": timeline,
                       "cpu_s": _cpu_s() - cpu0,
                       "messages": {k: msgs[k] - msgs0.get(k, 0) for k in msgs},
                       "rpc": {k: _RPC[k] - rpc0.get(k, 0) for k in _RPC}})
            elif op == "final":
                ru = resource.getrusage(resource.RUSAGE_SELF)
                _emit({"digests": [p.index.digest() for p in peers],
                       "keys": [[a.key.hex() for a in p.index.adverts()] for p in peers],
                       "messages": _sum_messages(peers), "rpc": dict(_RPC), "filed": dict(_FILED),
                       "syncs": dict(_SYNCS),
                       # anti-entropy's view: peers it marked as not running the index, and peers left with no
                       # connected peer it would still pick for a periodic sync
                       "not_index_marks": sum(len(p.gossip._not_index) for p in peers if p.gossip),
                       "no_sync_candidates": sum(
                           1 for p in peers if p.gossip and p.host.connected_peers()
                           and all(c in p.gossip._not_index for c in p.host.connected_peers())),
                       "index_counters": _sum_counters(peers),
                       "errors": [p.error for p in peers if p.error],
                       "cpu_s": ru.ru_utime + ru.ru_stime, "rss_mb": _rss_mb(), "peak_rss_mb": _hwm_mb()})
            elif op == "quit":
                os._exit(0)


def _sum_messages(peers: list[_SimPeer]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in peers:
        for k, v in (p.gossip.messages if p.gossip is not None else {}).items():
            out[k] = out.get(k, 0) + v
    return out


def _sum_counters(peers: list[_SimPeer]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in peers:
        for k, v in p.index.counters.items():
            out[k] = out.get(k, 0) + v
    return out


async def _index_server_main(path: str) -> None:
    import trio
    from hivecell.crypto.identity import Identity
    from hivecell.mesh.gossip import GossipConfig, open_gossip
    from hivecell.mesh.host import open_host
    from hivecell.mesh.index import AdvertIndex

    index = AdvertIndex()
    for raw in _read_adverts(Path(path)):
        index.offer(raw)
    try:
        from hivecell.mesh.dht import MeshDht
    except ImportError:  # a tree without the DHT
        MeshDht = None
    async with open_host(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as host, trio.open_nursery() as nursery:
        await open_gossip(host, index, GossipConfig(index=True), nursery)
        if MeshDht is not None:  # as a daemon does: a DHT server next to the index
            await nursery.start(MeshDht(host, server=True).serve)
        _emit({"addr": host.addrs()[0], "count": len(index), "pid": os.getpid(), "dht": MeshDht is not None})
        await _read_line()  # until the parent closes stdin
        os._exit(0)


async def _lan_client_main(ip: str, tag: str) -> None:
    """Browse mDNS on ``ip``; report peers found and connected; on a ``wait`` command, poll peers with
    ``IndexSearch(tags=[tag])`` until the awaited dataset was answered by some peer and by every ``old`` peer."""
    import inspect

    import trio
    from hivecell.mesh.gossip import INDEX_PROTOCOL, IndexHits, IndexSearch
    from hivecell.mesh.index import InvalidAdvert, parse_advert
    from hivecell.node.client import Client

    kw = {"dht": False} if "dht" in inspect.signature(Client.join).parameters else {}  # an observer: no DHT traffic
    async with Client.join(mdns_interfaces=[ip], **kw) as client:
        _emit({"ready": True, "t": time.monotonic(), "peer_id": client.peer_id})
        found: set[str] = set()
        connected: set[str] = set()
        wait: dict[str, Any] | None = None
        commands: trio.MemorySendChannel
        commands, incoming = trio.open_memory_channel(16)

        async def read_commands() -> None:
            while True:
                line = await _read_line()
                if not line:
                    os._exit(0)
                await commands.send(json.loads(line))

        in_flight: set[str] = set()

        async def ask(peer: str, w: dict[str, Any]) -> None:
            try:
                hits = await client.host.request(peer, INDEX_PROTOCOL, IndexSearch(tags=[tag], limit=500),
                                                 expect=IndexHits, timeout=2.0)
                t = time.monotonic()
                names = set()
                for raw in hits.adverts:
                    try:
                        names.add(parse_advert(raw).name)
                    except InvalidAdvert:  # not counted as the awaited dataset
                        continue
                if w["name"] in names and peer not in w["got"]:
                    w["got"][peer] = t
            except Exception as exc:  # noqa: BLE001 - a poll that failed for any reason is counted and retried
                w["errors"] = w.get("errors", 0) + 1
                w["last_error"] = repr(exc)[:200]
            finally:
                in_flight.discard(peer)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_commands)
            next_poll = 0.0
            while True:
                now = time.monotonic()
                for peer in set(client.discovery.peers) - found if client.discovery else ():
                    found.add(peer)
                    _emit({"event": "found", "peer": peer, "t": now})
                live = set(client.host.connected_peers())
                for peer in live - connected:
                    _emit({"event": "connected", "peer": peer, "t": now})
                connected |= live
                try:
                    cmd = incoming.receive_nowait()
                except trio.WouldBlock:
                    cmd = None
                if cmd is not None:
                    wait = {"name": cmd["wait"], "old": set(cmd["old"]), "got": {},
                            "deadline": now + float(cmd["timeout"])}
                if wait is not None:
                    if wait["got"] and wait["old"] <= set(wait["got"]):
                        _emit({"done": wait["name"], "got": wait["got"], "timed_out": False,
                               "errors": wait.get("errors", 0)})
                        wait = None
                    elif now > wait["deadline"]:
                        _emit({"done": wait["name"], "got": wait["got"], "timed_out": True,
                               "errors": wait.get("errors", 0), "last_error": wait.get("last_error", "")})
                        wait = None
                    elif now >= next_poll:
                        next_poll = now + 0.1
                        for peer in live - set(wait["got"]) - in_flight:
                            in_flight.add(peer)
                            nursery.start_soon(ask, peer, wait)
                await trio.sleep(0.02)


def _child_main(args: argparse.Namespace) -> None:
    import trio

    _quiet_logging()
    if args.worker:
        trio.run(_worker_main)
    elif args.index_server:
        trio.run(_index_server_main, args.index_server)
    elif args.lan_client:
        trio.run(_lan_client_main, args.lan_client, args.tag)


# =====================================================================================================================
# The parent's side of a child process
# =====================================================================================================================

class Child:
    """A child speaking JSON lines: ``send``, ``recv(timeout)``; stderr goes to a log file."""

    def __init__(self, argv: list[str], log_path: Path, *, popen=subprocess.Popen, **kw: Any) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed by close()
        self.proc = popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                          bufsize=1, **kw)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self._lines.put(line)
        self._lines.put(None)

    def send(self, obj: dict[str, Any]) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def recv(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no answer from {self.proc.args[-2:]} in {timeout:.0f} s; "
                                   f"log tail:\n{self.tail()}") from None
            if line is None:
                raise RuntimeError(f"child exited ({self.proc.poll()}); log tail:\n{self.tail()}")
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _child_argv(*args: str) -> list[str]:
    return [sys.executable, str(BENCH), *args]


# =====================================================================================================================
# Section 2: convergence of N index peers
# =====================================================================================================================

def _topology(n: int, rng: random.Random) -> list[tuple[int, int]]:
    """(dialler, dialled): peer i dials min(i, 2..3) random earlier peers."""
    edges = []
    for i in range(1, n):
        k = min(i, rng.randint(2, 3))
        edges.extend((i, j) for j in rng.sample(range(i), k))
    return edges


def convergence_run(n: int, *, per_process: int, seed: int, timeout: float, sync_interval: float,
                    idle_window: float, workdir: Path) -> dict[str, Any]:
    import psutil

    n_proc = max(math.ceil(n / per_process), min(os.cpu_count() or 1, n))  # at least one process per core
    where = [(i % n_proc, i // n_proc) for i in range(n)]  # peer -> (process, local index)
    log(f"convergence N={n}: {n_proc} processes, spawning")
    t = time.monotonic()
    workers = [Child(_child_argv("--worker"), workdir / f"worker-{n}-{w}.log") for w in range(n_proc)]
    out: dict[str, Any] = {"peers": n, "processes": n_proc}
    try:
        for w in workers:
            w.recv(120)
        setup = {"spawn_s": time.monotonic() - t}
        t = time.monotonic()
        for w_i, w in enumerate(workers):
            w.send({"op": "start", "numbers": [i for i in range(n) if where[i][0] == w_i],
                    "sync_interval": sync_interval})
        started = [w.recv(120) for w in workers]
        setup["start_s"] = time.monotonic() - t
        addrs = [started[where[i][0]]["addrs"][where[i][1]] for i in range(n)]
        edges = _topology(n, random.Random(seed * 1000 + n))
        t = time.monotonic()
        for w_i, w in enumerate(workers):
            w.send({"op": "connect", "dials": [[where[a][1], addrs[b]] for a, b in edges if where[a][0] == w_i]})
        dialled = [w.recv(300) for w in workers]
        setup["connect_s"] = time.monotonic() - t
        failed = [f for d in dialled for f in d["failed"]]
        log(f"convergence N={n}: {len(edges)} dials in {setup['connect_s']:.1f} s ({len(failed)} failed); "
            f"waiting for the gossipsub mesh")

        # Until every peer's gossipsub mesh holds min(its connections, the router's degree_low) peers, two polls in
        # a row; after 5 s, until every peer has one mesh peer at least (some stay below degree_low); at most 30 s.
        t = time.monotonic()
        ok_twice, status = 0, []
        while time.monotonic() - t < 30:
            for w in workers:
                w.send({"op": "status"})
            status = [p for w in workers for p in w.recv(60)["peers"]]
            full = all(p["mesh"] >= min(p["connected"], p["degree_low"]) and p["connected"] > 0 for p in status)
            ready = full or (time.monotonic() - t > 5 and all(p["mesh"] >= 1 for p in status))
            ok_twice = ok_twice + 1 if ready else 0
            if ok_twice >= 2:
                break
            time.sleep(0.5)
        setup["mesh_s"] = time.monotonic() - t
        out["mesh_formed"] = ok_twice >= 2
        out["edges"] = len(edges)
        out["dial_failures"] = failed[:5] + ([f"... {len(failed) - 5} more"] if len(failed) > 5 else [])
        out["connections_per_peer"] = {"min": min(p["connected"] for p in status),
                                       "median": _median([p["connected"] for p in status]),
                                       "max": max(p["connected"] for p in status)}
        out["mesh_degree"] = {"min": min(p["mesh"] for p in status), "median": _median([p["mesh"] for p in status]),
                              "max": max(p["mesh"] for p in status), "degree_low": status[0]["degree_low"],
                              "peers_below_degree_low": sum(1 for p in status
                                                            if p["mesh"] < min(p["connected"], p["degree_low"]))}

        # The mesh idles a moment: what N peers cost with nothing to do (heartbeats, anti-entropy ticks).
        procs = [psutil.Process(w.proc.pid) for w in workers]
        cpu0 = sum(sum(p.cpu_times()[:2]) for p in procs)
        time.sleep(idle_window)
        idle_pct = 100 * (sum(sum(p.cpu_times()[:2]) for p in procs) - cpu0) / idle_window

        for w in workers:
            w.send({"op": "prepare"})
        prepared = [w.recv(120) for w in workers]
        keys = {k for p in prepared for k in p["keys"]}
        advert_bytes = [b for p in prepared for b in p["bytes"]]
        at = time.monotonic() + 0.5
        log(f"convergence N={n}: mesh ready after {setup['mesh_s']:.1f} s; all {n} peers publish now")
        for w in workers:
            w.send({"op": "publish", "at": at, "expect": n, "timeout": timeout})
        published = [w.recv(timeout + 120) for w in workers]
        done = [d for p in published for d in p["done_at"]]
        per_peer = [d - at for d in done if d is not None]
        for w in workers:
            w.send({"op": "final"})
        final = [w.recv(120) for w in workers]

        digests = [d for f in final for d in f["digests"]]
        held = [set(k) for f in final for k in f["keys"]]
        missing = {k: sum(1 for h in held if k not in h) for k in keys}
        lost = sum(1 for v in missing.values() if v)
        converged = len(per_peer) == n
        msgs: dict[str, int] = {}
        rpc: dict[str, int] = {}
        for p in published:
            for k, v in p["messages"].items():
                msgs[k] = msgs.get(k, 0) + v
            for k, v in p["rpc"].items():
                rpc[k] = rpc.get(k, 0) + v
        filed = {k: sum(f["filed"][k] for f in final) for k in ("gossip", "anti_entropy")}
        syncs: dict[str, Any] = {}
        for f in final:
            for k, v in f["syncs"].items():
                syncs[k] = max(syncs.get(k, 0), v) if k.endswith("_max") else syncs.get(k, 0) + v
        timeline = []
        for sec in range(max(len(p["timeline"]) for p in published)):
            held_now = sum(p["timeline"][min(sec, len(p["timeline"]) - 1)] for p in published if p["timeline"])
            timeline.append(round(held_now / (n * n), 3))
        counters: dict[str, int] = {}
        for f in final:
            for k, v in f["index_counters"].items():
                counters[k] = counters.get(k, 0) + v
        out.update({
            "converged": converged,
            "convergence_s": _r(max(per_peer)) if converged else None,
            "per_peer_s": {"median": _r(_median(per_peer)), "p90": _r(_pct(per_peer, 0.9)),
                           "max": _r(max(per_peer) if per_peer else None),
                           "within_1s": sum(1 for v in per_peer if v <= 1.0),
                           "within_10s": sum(1 for v in per_peer if v <= 10.0)},
            "peers_complete": len(per_peer),
            "timeout_s": timeout,
            "adverts_lost": lost,
            "missing_pairs": sum(missing.values()),
            "digests_equal": len(set(digests)) == 1,
            "advert_bytes_median": _median(advert_bytes),
            "filed_by": {**filed, "expected_deliveries": n * (n - 1)},
            "messages_until_converged": msgs,
            "gossipsub_rpcs_until_converged": rpc,
            "index_counters": counters,
            "held_fraction_each_second": timeline,
            # Missing at the timeout but still arriving (the held count grew over its last 5 s): late, not lost.
            "held_rising_at_timeout": (not converged and len(timeline) > 5 and timeline[-1] > timeline[-6]),
            "filed_per_s_over_window": _r((filed["gossip"] + filed["anti_entropy"])
                                          / max(1e-9, (max(per_peer) if converged else timeout)), 1),
            "cpu_ms_per_filed_advert": _r(1e3 * sum(p["cpu_s"] for p in published)
                                          / max(1, filed["gossip"] + filed["anti_entropy"]), 2),
            "anti_entropy": {"syncs": syncs, "peers_marked_not_index": sum(f["not_index_marks"] for f in final),
                             "peers_with_no_sync_candidate": sum(f["no_sync_candidates"] for f in final)},
            "mesh_idle_cpu_percent_all_processes": _r(idle_pct, 1),
            "per_process": [{"peers": sum(1 for i in range(n) if where[i][0] == w_i),
                             "cpu_s_total": _r(f["cpu_s"], 2), "cpu_s_convergence": _r(p["cpu_s"], 2),
                             "rss_mb": f["rss_mb"], "peak_rss_mb": f["peak_rss_mb"]}
                            for w_i, (f, p) in enumerate(zip(final, published))],
            "peer_errors": [e for f in final for e in f["errors"]][:5],
            "setup_s": {k: _r(v, 2) for k, v in setup.items()},
        })
        out["cpu_s_convergence_all_processes"] = _r(sum(p["cpu_s"] for p in published), 2)
        out["within_goal"] = converged and lost == 0 and max(per_peer) <= GOALS["convergence_s_max"]
        log(f"convergence N={n}: " + (f"converged in {max(per_peer):.2f} s" if converged
                                       else f"NOT converged: {len(per_peer)}/{n} peers complete after {timeout} s")
            + f", {lost} adverts lost, filed by gossip {filed['gossip']} / anti-entropy {filed['anti_entropy']}")
        return out
    except (TimeoutError, RuntimeError) as exc:
        out["error"] = str(exc)[-2000:]
        log(f"convergence N={n} failed: {str(exc)[:300]}")
        return out
    finally:
        for w in workers:
            try:
                w.send({"op": "quit"})
            except (OSError, ValueError):
                pass
        logs: dict[str, int] = {}
        for w in workers:
            w.close()
            for k, v in _log_summary(w.tail(10**8), top=50).items():
                logs[k] = logs.get(k, 0) + v
        out["worker_log_warnings"] = dict(sorted(logs.items(), key=lambda kv: -kv[1])[:8])


# =====================================================================================================================
# Section 3: search latency against one index peer
# =====================================================================================================================

def _write_adverts(path: Path, adverts: list[bytes]) -> None:
    with open(path, "wb") as f:
        f.writelines(struct.pack(">I", len(raw)) + raw for raw in adverts)


def _read_adverts(path: Path) -> list[bytes]:
    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (size,) = struct.unpack_from(">I", data, i)
        out.append(data[i + 4:i + 4 + size])
        i += 4 + size
    return out


def _make_search_adverts(count: int) -> list[bytes]:
    from hivecell.crypto.identity import Identity
    from hivecell.node.dataset import make_advert

    record = _base_record(seed=2)
    signers = [Identity.generate() for _ in range(max(1, count // 10))]
    now = time.time()
    out = []
    for i in range(count):
        who = signers[i % len(signers)]
        rec = dict(record, name=f"set-{i}", description=f"search bench dataset {i} about zq{i % 100:03d}x",
                   tags=["bench", f"grp{i % 10}"], owner=who.peer_id)
        out.append(make_advert(who, rec, addrs=[f"/ip4/127.0.0.1/tcp/4001/p2p/{who.peer_id}"], now=now))
    return out


def search_latency(*, count: int, requests: int, e2e_requests: int, workdir: Path) -> dict[str, Any]:
    import psutil
    import trio
    from hivecell.crypto.identity import Identity
    from hivecell.mesh.gossip import INDEX_PROTOCOL, IndexHits, IndexSearch
    from hivecell.mesh.host import open_host
    from hivecell.mesh.index import AdvertIndex
    from hivecell.node.client import Client

    log(f"search: signing {count} adverts")
    adverts = _make_search_adverts(count)
    path = workdir / "adverts.bin"
    _write_adverts(path, adverts)
    local = AdvertIndex()
    for raw in adverts:
        local.offer(raw)
    n_grp = sum(1 for i in range(count) if i % 10 == 3)
    n_word = sum(1 for i in range(count) if i % 100 == 7)
    queries = {  # name -> (words, tags, limit, expected hits)
        "word": (["zq007x"], [], 100, min(100, n_word)),
        "tag": ([], ["grp3"], 100, min(100, n_grp)),
        "miss": (["nothing-matches-this"], [], 100, 0),
        "all_limit100": ([], ["bench"], 100, min(100, count)),
    }
    baseline: dict[str, Any] = {}
    for name, (words, tags, limit, expected) in queries.items():
        got = len(local.search(words, tags=tags, limit=limit))
        assert got == expected, (name, got, expected)
        times = []
        for _ in range(max(20, requests // 2)):
            t = time.perf_counter()
            local.search(words, tags=tags, limit=limit)
            times.append((time.perf_counter() - t) * 1e3)
        baseline[name] = {"median": _r(_median(times)), "p90": _r(_pct(times, 0.9))}

    server = Child(_child_argv("--index-server", str(path)), workdir / "index-server.log")
    out: dict[str, Any] = {"adverts": count, "advert_bytes_median": _median([len(a) for a in adverts]),
                           "queries": {name: {"words": q[0], "tags": q[1], "limit": q[2], "hits": q[3]}
                                       for name, q in queries.items()}}
    try:
        info = server.recv(120)
        assert info["count"] == count, info
        sproc = psutil.Process(info["pid"])
        log(f"search: index peer holds {info['count']} adverts; {requests} requests per query")

        async def measure() -> None:
            protocol: dict[str, Any] = {}
            async with open_host(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as host:
                peer = await host.connect(info["addr"])
                for name, (words, tags, limit, expected) in queries.items():
                    query = IndexSearch(words=words, tags=tags, limit=limit)
                    for _ in range(3):  # warm-up
                        await host.request(peer, INDEX_PROTOCOL, query, expect=IndexHits)
                    times = []
                    cpu0 = sum(sproc.cpu_times()[:2])
                    size = 0
                    for _ in range(requests):
                        t = time.perf_counter()
                        hits = await host.request(peer, INDEX_PROTOCOL, query, expect=IndexHits)
                        times.append((time.perf_counter() - t) * 1e3)
                        assert len(hits.adverts) == expected, (name, len(hits.adverts), expected)
                        size = sum(len(a) for a in hits.adverts)
                    server_ms = (sum(sproc.cpu_times()[:2]) - cpu0) * 1e3 / requests
                    protocol[name] = {"median": _r(_median(times)), "p90": _r(_pct(times, 0.9)),
                                      "max": _r(max(times)), "reply_bytes": size,
                                      "server_cpu_ms_per_request": _r(server_ms, 2)}
            out["index_search_request"] = protocol

            import inspect

            variants = [("client_search_e2e", {})]
            if "dht" in inspect.signature(Client.join).parameters:  # the default client asks the DHT on tag searches
                variants.append(("client_search_e2e_no_dht", {"dht": False}))
            for key, kw in variants:
                e2e: dict[str, Any] = {}
                async with Client.join(bootstrap=[info["addr"]], mdns=False, **kw) as client:
                    for name, (words, tags, limit, expected) in queries.items():
                        if not expected:
                            continue  # with nothing to expect, search waits for quiet: a timeout, not a latency
                        await client.search(words, tags=tags, limit=limit, expect=expected, timeout=30)  # warm-up
                        times = []
                        for _ in range(e2e_requests):
                            t = time.perf_counter()
                            found = await client.search(words, tags=tags, limit=limit, expect=expected, timeout=30)
                            times.append((time.perf_counter() - t) * 1e3)
                            assert len(found) == expected, (name, len(found), expected)
                        e2e[name] = {"median": _r(_median(times)), "p90": _r(_pct(times, 0.9)),
                                     "max": _r(max(times))}
                out[key] = e2e

        trio.run(measure)
        out["baseline_in_process_search"] = baseline
        out["ratio_request_to_in_process_median"] = {
            name: _r(out["index_search_request"][name]["median"] / max(baseline[name]["median"], 1e-6), 1)
            for name in queries}
        out["requests_per_query"] = requests
        out["e2e_requests_per_query"] = e2e_requests
        log("search: " + ", ".join(f"{k} {v['median']} ms" for k, v in out["index_search_request"].items()))
        return out
    finally:
        server.close()


# =====================================================================================================================
# Section 4: the idle daemon
# =====================================================================================================================

def _prepare_home(path: Path, name: str, tags: list[str], seed: int) -> str:
    """A home with a node key and one small dataset; returns the node's peer id."""
    import numpy as np
    from hivecell.node.dataset import encode_tensors, make_record
    from hivecell.node.home import Home
    from hivecell.node.store import Store

    home = Home(path)
    identity, _ = home.init()
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(100, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=100).astype(np.int64)
    record = make_record(name=name, features=x, labels=y, feature_names=[], tags=tags, signoff="auto",
                         owner=identity.peer_id, description=f"discovery bench dataset {name}")
    with Store.open(home.store_path) as store:
        store.add_dataset(record, encode_tensors(x, y))
    return identity.peer_id


def idle_daemon(*, settle: float, sample: float, with_peer: bool, workdir: Path) -> dict[str, Any]:
    import psutil
    from hivecell.node.localnet import start_daemon
    from idle_daemon import (  # bench/idle_daemon.py
        baseline,
        cpu_percent,
        sample_rss,
        torch_mapped,
    )

    def one(label: str, extra: list[str]) -> dict[str, Any]:
        home = workdir / f"idle-{label}"
        _prepare_home(home, f"idle-{label}", ["bench"], seed=7)
        log(f"idle daemon ({label}): starting")
        t = time.monotonic()
        d = start_daemon(home, "--no-mdns", "--warm-workers", "0", "--listen", "/ip4/127.0.0.1/tcp/0", *extra)
        return {"daemon": d, "start_s": time.monotonic() - t, "home": home}

    def measure(label: str, main: dict[str, Any], others: list[dict[str, Any]]) -> None:
        proc = psutil.Process(main["daemon"].process.pid)
        procs = [proc, *(psutil.Process(o["daemon"].process.pid) for o in others)]
        time.sleep(settle)
        if len(procs) > 1:  # every daemon over the same window
            before = [sum(p.cpu_times()[:2]) for p in procs]
            t = time.monotonic()
            time.sleep(sample)
            after = [sum(p.cpu_times()[:2]) for p in procs]
            pct = [round(100.0 * (b - a) / (time.monotonic() - t), 3) for a, b in zip(before, after)]
        else:
            pct = [cpu_percent([proc], sample)]
        rss = sample_rss([proc], 1.0)
        peers_file = main["home"] / "peers.json"
        peers_info = json.loads(peers_file.read_text()) if peers_file.exists() else {}
        row = {"rss_mb": round(rss / MB, 1), "uss_mb": round(proc.memory_full_info().uss / MB, 1),
               "cpu_percent": pct[0], "threads": proc.num_threads(), "children": len(proc.children(True)),
               "torch_loaded": torch_mapped(proc.pid), "daemon_start_s": _r(main["start_s"], 2),
               "connected_peers": sum(1 for p in peers_info.get("peers", []) if p.get("connected")),
               "index": {k: peers_info.get("index", {}).get(k) for k in ("adverts", "messages", "counters")}}
        if others:
            row["peer_daemon_start_s"] = _r(others[0]["start_s"], 2)
            row["peer_cpu_percent"] = pct[1]
        row["within_goal"] = row["rss_mb"] <= GOALS["idle_rss_mb_max"] and pct[0] < GOALS["idle_cpu_percent_max"]
        result[label] = row
        log(f"idle daemon ({label}): {row['rss_mb']} MB RSS, {pct[0]}% of a core")

    result: dict[str, Any] = {}
    started = []
    try:
        a = one("a", [])
        started.append(a["daemon"])
        measure("alone", a, [])
        if with_peer:
            b = one("b", ["--bootstrap", a["daemon"].address])
            started.append(b["daemon"])
            measure("with_one_peer", a, [b])
    finally:
        for d in started:
            d.stop()
    if with_peer:  # not in a quick run. What the daemon's imports alone cost (the daemon never loads torch):
        result["baseline_rss_mb"] = {
            "python_import_libp2p": baseline("import libp2p", min(settle, 3.0) + 1.0),
            "python_import_dp_accounting": baseline("import dp_accounting.rdp", min(settle, 3.0) + 1.0),
            "python_import_daemon_module": baseline("import hivecell.node.daemon", min(settle, 3.0) + 1.5),
        }
    result["sample_s"], result["settle_s"] = sample, settle
    result["cpu_percent_resolution"] = round(100.0 / os.sysconf("SC_CLK_TCK") / sample, 3)
    return result


# =====================================================================================================================
# Section 1: searchable on a namespace LAN
# =====================================================================================================================

def _wait_daemon_json(home: Path, proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon in {home} exited with {proc.returncode}: "
                               f"{(home / 'daemon.log').read_text(errors='replace')[-2000:]}")
        try:
            info = json.loads((home / "daemon.json").read_text())
            if info.get("pid") == proc.pid:
                info["ready_t"] = time.monotonic()
                return info
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.01)
    raise TimeoutError(f"daemon in {home} not ready after {timeout:.0f} s")


def _compile_sources() -> bool:
    """Write the bytecode of hivecell's own modules, as ``pip install`` (or a first start on a normal machine) leaves
    it. This sandbox sets PYTHONDONTWRITEBYTECODE and the package is installed editable, so otherwise every daemon
    started here would compile them again (about 0.2 s of its start)."""
    import compileall

    import hivecell.crypto
    import hivecell.mesh
    import hivecell.node

    dirs = {str(Path(p)) for pkg in (hivecell.crypto, hivecell.mesh, hivecell.node) for p in pkg.__path__}
    return all(compileall.compile_dir(d, quiet=1, maxlevels=0) for d in sorted(dirs))


def lan_searchable(*, base: int, trials: int, settle: float, cold_search: bool, workdir: Path) -> dict[str, Any]:
    from netlan import namespace_lan, netns_available

    reason = netns_available()
    if reason is not None:
        log(f"LAN skipped: {reason}")
        return {"skipped": reason}
    n_daemons = base + trials
    members = n_daemons + 1
    client_k = members
    tag = "benchlan"
    homes = {k: workdir / f"lan-{k}" for k in range(1, n_daemons + 1)}
    for k, home in homes.items():
        _prepare_home(home, f"lan-{k}", [tag, "digits"], seed=k)
    out: dict[str, Any] = {"members": members, "base_daemons": base, "trials": trials,
                           "bytecode_compiled_first": _compile_sources()}
    log(f"LAN: {members} namespaces ({base} base daemons, {trials} trials, client in member {client_k})")
    t = time.monotonic()
    with namespace_lan(members) as lan:
        out["lan_up_s"] = _r(time.monotonic() - t, 2)
        client = Child(_child_argv("--lan-client", lan.ip(client_k), "--tag", tag), workdir / "lan-client.log",
                       popen=lambda argv, **kw: lan.popen(client_k, argv, **kw))
        events: dict[str, dict[str, float]] = {"found": {}, "connected": {}}
        daemons: dict[int, subprocess.Popen] = {}
        rows = []

        def recv_until_done(timeout: float) -> dict[str, Any]:
            deadline = time.monotonic() + timeout
            while True:
                msg = client.recv(max(0.1, deadline - time.monotonic()))
                if "event" in msg:
                    events[msg["event"]].setdefault(msg["peer"], msg["t"])
                elif "done" in msg:
                    return msg

        try:
            client.recv(120)  # {"ready": ...}
            if cold_search:  # not in a quick run
                # Baseline: what python takes to import the daemon's modules (most of a daemon's start).
                t = time.monotonic()
                imp = lan.run(client_k, [sys.executable, "-c", "import hivecell.node.cli, hivecell.node.daemon"],
                              timeout=120)
                out["baseline_python_import_daemon_s"] = _r(time.monotonic() - t, 2) if imp.returncode == 0 else None
            log(f"LAN: client ready in member {client_k} ({lan.ip(client_k)})")
            old: list[str] = []
            for k in range(1, n_daemons + 1):
                home = homes[k]
                (home / "daemon.json").unlink(missing_ok=True)
                client.send({"wait": f"lan-{k}", "old": old, "timeout": 30})
                with open(home / "daemon.log", "ab") as dlog:
                    t0 = time.monotonic()
                    daemons[k] = lan.popen(k, [*CLI, "--home", str(home), "run", "--listen",
                                               f"/ip4/{lan.ip(k)}/tcp/4001", "--mdns", "--mdns-interface", lan.ip(k),
                                               "--warm-workers", "0"], stdout=dlog, stderr=subprocess.STDOUT)
                info = _wait_daemon_json(home, daemons[k], 60)
                done = recv_until_done(40)
                pid = info["peer_id"]
                got = done["got"]
                first = min(got.values()) if got else None
                every = max(got[p] for p in old) if old and all(p in got for p in old) else None
                row = {
                    "member": k, "kind": "base" if k <= base else "trial", "timed_out": done["timed_out"],
                    "daemon_start_s": _r(info["ready_t"] - t0),
                    "searchable_from_start_s": _r(first - t0 if first else None),
                    "searchable_from_ready_s": _r(first - info["ready_t"] if first else None),
                    "in_every_index_from_start_s": _r(every - t0 if every else None),
                    "in_every_index_from_ready_s": _r(every - info["ready_t"] if every else None),
                    "mdns_found_from_ready_s": _r(events["found"][pid] - info["ready_t"]
                                                  if pid in events["found"] else None),
                    "connected_from_ready_s": _r(events["connected"][pid] - info["ready_t"]
                                                 if pid in events["connected"] else None),
                    "answered_first_by": ("itself" if got and min(got, key=got.get) == pid else "another daemon")
                    if got else None,
                    "old_daemons": len(old),
                }
                if done.get("last_error"):
                    row["last_poll_error"] = done["last_error"]
                rows.append(row)
                log(f"LAN: member {k} ({row['kind']}): ready {row['daemon_start_s']} s, searchable "
                    f"{row['searchable_from_start_s']} s from start, in every index "
                    f"{row['in_every_index_from_start_s']} s" + (" TIMED OUT" if done["timed_out"] else ""))
                old.append(pid)
                time.sleep(settle)
            if cold_search:
                cli_home = workdir / "lan-cli"
                t = time.monotonic()
                imp = lan.run(client_k, [sys.executable, "-c", "import hivecell.node.client"], timeout=120)
                import_s = time.monotonic() - t
                t = time.monotonic()
                searched = lan.run(client_k, [*CLI, "--home", str(cli_home), "search", "--tag", tag, "--json",
                                              "--timeout", "20", "--expect", str(n_daemons), "--mdns",
                                              "--mdns-interface", lan.ip(client_k)], timeout=120)
                took = time.monotonic() - t
                try:
                    names = sorted(r["name"] for r in json.loads(searched.stdout))
                except ValueError:
                    names = []
                out["cold_cli_search"] = {"s": _r(took, 2), "found": len(names), "expected": n_daemons,
                                          "exit": searched.returncode,
                                          **({"stderr_tail": searched.stderr[-1500:]} if len(names) < n_daemons
                                             else {}),
                                          "baseline_python_import_client_s": _r(import_s, 2) if imp.returncode == 0
                                          else None}
                log(f"LAN: cold `hivecell search --expect {n_daemons}` found {len(names)} in {took:.2f} s")
            peers_json = homes[1] / "peers.json"
            if peers_json.exists():
                index = json.loads(peers_json.read_text()).get("index", {})
                out["member1_index"] = {k: index.get(k) for k in ("adverts", "counters", "messages")}
        finally:
            client.close()
            for proc in daemons.values():
                lan.stop(proc)
    texts = {k: (home / "daemon.log").read_text(errors="replace") for k, home in homes.items()}
    out["daemon_logs_with_traceback"] = [k for k, text in texts.items() if "Traceback" in text]
    out["daemon_log_warnings"] = _log_summary("\n".join(texts.values()))
    out["client_log_warnings"] = _log_summary(client.tail(10**8))
    trial_rows = [r for r in rows if r["kind"] == "trial"]

    def col(key: str) -> list[float]:
        return [r[key] for r in trial_rows if r[key] is not None]

    out.update({
        "from_start": col("searchable_from_start_s"), "median_from_start": _r(_median(col("searchable_from_start_s"))),
        "from_ready": col("searchable_from_ready_s"), "median_from_ready": _r(_median(col("searchable_from_ready_s"))),
        "in_every_index_from_start": col("in_every_index_from_start_s"),
        "median_in_every_index_from_start": _r(_median(col("in_every_index_from_start_s"))),
        "baseline_daemon_start_s": col("daemon_start_s"),
        "median_baseline_daemon_start_s": _r(_median(col("daemon_start_s"))),
        "rows": rows,
    })
    med = out["median_from_start"]
    out["within_goal"] = med is not None and len(col("searchable_from_start_s")) == trials \
        and max(col("searchable_from_start_s")) <= GOALS["lan_searchable_s_max"]
    return out


# =====================================================================================================================

_LOADS: dict[str, dict[str, float]] = {}


def _own_cpu_s() -> float:
    """CPU seconds of this process and of its children that have ended (workers, daemons, clients)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _section(name: str, run) -> dict[str, Any]:
    """Run one section; an exception becomes ``{"error": ...}`` in the report and the other sections still run.

    Records how busy the box was meanwhile: all its cores (``/proc/stat``) against this benchmark's own processes,
    so other load on a shared machine shows (``box`` minus ``bench`` is everyone else), in percent of one core.
    """
    import psutil

    box0, own0, t0 = psutil.cpu_times(), _own_cpu_s(), time.monotonic()
    try:
        return run()
    except Exception as exc:  # noqa: BLE001 - one section: report what broke and go on with the others
        log(f"{name} section failed: {exc!r}")
        return {"error": repr(exc)[-2000:]}
    finally:
        box1, wall = psutil.cpu_times(), max(1e-9, time.monotonic() - t0)
        idle = (box1.idle - box0.idle) + (getattr(box1, "iowait", 0) - getattr(box0, "iowait", 0))
        busy = sum(box1) - sum(box0) - idle
        bench = _own_cpu_s() - own0
        _LOADS[name] = {"wall_s": round(wall, 1), "box_cpu_percent": round(100 * busy / wall, 1),
                        "bench_cpu_percent": round(100 * bench / wall, 1),
                        "others_cpu_percent": round(100 * max(0.0, busy - bench) / wall, 1),
                        "loadavg_1min_at_end": round(os.getloadavg()[0], 2)}


def _log_summary(text: str, top: int = 8) -> dict[str, int]:
    """WARNING/ERROR/CRITICAL lines of a log (``asctime LEVEL name: message``), counted by level, logger and message
    with peer ids and numbers blanked; the ``top`` most frequent. Multi-line records count once (their first line)."""
    seen: dict[str, int] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) (\S+): (.*)$", line)
        if m is not None:
            head, what = f"{m.group(1)} {m.group(2)}", m.group(3)
        elif line.startswith("Failed to open stream"):  # py-libp2p's, printed bare where its logger has no handler
            head, what = "ERROR libp2p (no handler)", line
        else:
            continue
        if what.startswith("Failed to open stream") and i + 1 < len(lines) and "Error:" in lines[i + 1]:
            what += " " + lines[i + 1].strip()  # the multi-line record says why on its second line
        what = _PEER_ID.sub("<peer>", what)
        what = re.sub(r"\d+", "N", re.sub(r"\b(from|to|peer) [1-9A-HJ-NP-Za-km-z]{8}\b", r"\1 <peer>", what))
        key = f"{head}: {what[:160]}"
        seen[key] = seen.get(key, 0) + 1
    return dict(sorted(seen.items(), key=lambda kv: -kv[1])[:top])


_PEER_ID = re.compile(r"(12D3Koo|Qm)[1-9A-HJ-NP-Za-km-z]{20,}")


class _LogCounter(logging.Handler):
    """Counts log records by logger, level and the first line of the message (cut at 100 characters)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            first = record.getMessage().splitlines()[0][:100] if record.getMessage() else ""
        except Exception:  # noqa: BLE001 - a record whose arguments do not format
            first = str(record.msg)[:100]
        key = f"{record.name} {record.levelname}: {_PEER_ID.sub('<peer>', first)}"
        self.seen[key] = self.seen.get(key, 0) + 1


def main() -> None:
    head, _, rest = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=head.replace("\n", " "), epilog=rest,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default="20,50,100", help="comma-separated N for the convergence runs")
    parser.add_argument("--per-process", type=int, default=25, help="most index peers per worker process")
    parser.add_argument("--converge-timeout", type=float, default=30.0,
                        help="seconds after publishing before missing adverts count as lost")
    parser.add_argument("--sync-interval", type=float, default=10.0, help="anti-entropy interval of the peers")
    parser.add_argument("--skip-lan", action="store_true", help="skip the namespace LAN section")
    parser.add_argument("--lan-trials", type=int, default=3, help="fresh daemons timed on the LAN")
    parser.add_argument("--lan-base", type=int, default=3, help="daemons already up before the trials")
    parser.add_argument("--adverts", type=int, default=1000, help="adverts in the index peer of the search section")
    parser.add_argument("--requests", type=int, default=100, help="IndexSearch requests per query")
    parser.add_argument("--e2e-requests", type=int, default=20, help="Client.search calls per query")
    parser.add_argument("--idle-settle", type=float, default=8.0)
    parser.add_argument("--idle-sample", type=float, default=10.0)
    parser.add_argument("--sections", default="lan,convergence,search,idle",
                        help="comma-separated: lan, convergence, search, idle")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 6 peers in 2 processes, a LAN of 1 base daemon and 1 trial, 100 adverts, "
                             "short idle sampling")
    # The benchmark's own child processes:
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index-server", metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument("--lan-client", metavar="IP", help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="benchlan", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker or args.index_server or args.lan_client:
        _child_main(args)
        return
    if not Path("/proc/self/status").exists():
        sys.exit("this benchmark reads /proc: Linux only")
    if args.quick:
        args.peers = "6" if args.peers == parser.get_default("peers") else args.peers
        args.per_process = 3
        args.converge_timeout = min(args.converge_timeout, 20.0)
        args.lan_trials, args.lan_base = 1, 1
        args.adverts, args.requests, args.e2e_requests = 100, 10, 3
        args.idle_settle, args.idle_sample = 1.0, 2.0
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if args.skip_lan:
        sections.discard("lan")
    peers = [int(p) for p in args.peers.split(",") if p.strip()]

    def on_term(signum, frame):  # run the finally blocks (stop daemons, delete namespaces) on SIGTERM too
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # Warnings and errors logged in this process (py-libp2p's among them) are counted for the report, not printed.
    log_counter = _LogCounter()
    logging.getLogger().addHandler(log_counter)
    logging.getLogger().setLevel(logging.WARNING)
    import libp2p  # noqa: F401 - importing it clears the handlers of its logger, which does not propagate

    logging.getLogger("libp2p").addHandler(log_counter)
    started = time.monotonic()
    load_before = os.getloadavg()
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hivecell-discovery-") as tmp:
        workdir = Path(tmp)
        if "lan" in sections:
            result["lan_searchable_s"] = _section("LAN", lambda: lan_searchable(
                base=args.lan_base, trials=args.lan_trials, settle=0.5 if args.quick else 2.0,
                cold_search=not args.quick, workdir=workdir))
        else:
            result["lan_searchable_s"] = {"skipped": "--skip-lan" if args.skip_lan else "not in --sections"}
        if "convergence" in sections:
            runs = [_section(f"convergence N={n}", lambda n=n: {"peers": n, **convergence_run(
                n, per_process=args.per_process, seed=args.seed, timeout=args.converge_timeout,
                sync_interval=args.sync_interval, idle_window=1.0 if args.quick else 2.0, workdir=workdir)})
                for n in peers]
            result["convergence"] = {"runs": runs, "sync_interval_s": args.sync_interval,
                                     "per_process_max": args.per_process}
            goal_run = next((r for r in runs if r.get("peers") == GOALS["convergence_peers"]), None)
            result["convergence"]["within_goal"] = goal_run.get("within_goal") if goal_run else None
        if "search" in sections:
            result["search_latency_ms"] = _section("search", lambda: search_latency(
                count=args.adverts, requests=args.requests, e2e_requests=args.e2e_requests, workdir=workdir))
        if "idle" in sections:
            result["idle_daemon"] = _section("idle daemon", lambda: idle_daemon(
                settle=args.idle_settle, sample=args.idle_sample, with_peer=not args.quick, workdir=workdir))
        # Load on the box besides this benchmark shows in every number above.
        result["box_load_per_section"] = _LOADS
    result["goals"] = GOALS
    result["settings"] = {"quick": args.quick, "sections": sorted(sections), "peers": peers,
                          "per_process": args.per_process, "converge_timeout_s": args.converge_timeout,
                          "seed": args.seed, "python": sys.version.split()[0], "cpus": os.cpu_count(),
                          "loadavg_before": [round(v, 2) for v in load_before],
                          "loadavg_after": [round(v, 2) for v in os.getloadavg()]}
    result["parent_log_records"] = dict(log_counter.seen)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(result, indent=2))
    broken = [k for k, v in result.items() if isinstance(v, dict) and "error" in v]
    broken += [f"convergence N={r.get('peers')}" for r in result.get("convergence", {}).get("runs", []) if "error" in r]
    if broken:  # the numbers are printed anyway; the exit status says the benchmark itself broke
        log(f"sections that broke: {', '.join(broken)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
