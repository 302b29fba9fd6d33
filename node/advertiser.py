"""The daemon's side of the gossip index: advertise this node's datasets, take removed ones back, persist the index.

Every ``CHECK_S`` seconds (the CLI adds and removes datasets in another process, so the daemon looks) the advertiser
builds what each dataset's advert would say now (description, tags, schema, owner, addresses, budget summary). A
dataset whose advert would say something new, or whose last advert is a third of its lifetime old, is published
again; a dataset that was advertised and is gone gets a signed tombstone. The names advertised are kept in the store,
so a dataset removed while the daemon was down still gets its tombstone at the next start.

The node's :class:`~hivecell.mesh.index.AdvertIndex` is persisted in the store's ``index`` table: changes are
collected by the index's ``on_change`` hook and written in one transaction per second, and the table is loaded (and
every record verified again) at start, so a restarted index peer answers searches at once.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import trio

from hivecell.crypto.canonical import canonical_packb
from hivecell.crypto.identity import Identity
from hivecell.mesh.dht import MeshDht
from hivecell.mesh.gossip import GossipIndex
from hivecell.mesh.index import AdvertIndex

from .dataset import ADVERT_TTL_S, make_advert, make_tombstone
from .owner import load_owner
from .store import Store

__all__ = ["Advertiser", "load_index", "budget_summary"]

logger = logging.getLogger(__name__)

CHECK_S = 1.0
FLUSH_S = 1.0
DHT_FIRST_S = 5.0  # the first DHT puts wait this long after start: the LAN's connection burst goes first


def budget_summary(budget: Any) -> dict[str, Any]:
    """What a scientist may know of a dataset's privacy budget before asking: totals and limits, no per-scientist use."""
    out = {"total": budget.total, "left": None if budget.left is None else round(budget.left, 3),
           "per_job": budget.per_job, "allow_non_dp": budget.allow_non_dp}
    return {k: v for k, v in out.items() if v is not None}


def load_index(store: Store, index: AdvertIndex) -> int:
    """Fill ``index`` from the store (records verified again; expired ones are dropped from the store too) and hook
    the index's changes to a pending batch for :meth:`Advertiser.flush`. Returns how many records were loaded."""
    rows = store.index_records()
    for _, raw in rows:
        index.offer(raw)
    stale = {key: None for key, _ in rows if index.get(key) is None}
    if stale:
        store.index_apply(stale)  # type: ignore[arg-type]
    return len(index)


class Advertiser:
    def __init__(self, *, identity: Identity, store: Store, gossip: GossipIndex, addrs: list[str],
                 ttl: float = ADVERT_TTL_S, dht: MeshDht | None = None) -> None:
        self.identity, self.store, self.gossip, self.addrs, self.ttl = identity, store, gossip, addrs, ttl
        self.dht = dht
        self._published: dict[str, tuple[str, float]] = {}  # name -> (content digest, when)
        self._to_dht: dict[str, bytes] = {}  # adverts (and tombstones) not yet put in the DHT
        self._pending: dict[bytes, bytes | None] = {}
        self._poke = trio.Event()
        gossip.index.on_change = self._changed

    def _changed(self, key: bytes, raw: bytes | None) -> None:
        self._pending[key] = raw

    def poke(self) -> None:
        """Look at the datasets now instead of at the next tick."""
        self._poke.set()

    def _current(self) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """(name -> what its advert says now), names advertised before -- read in a thread."""
        owner = load_owner(self.store, self.identity)
        ledger = self.store.ledger_state()
        out = {}
        for record in self.store.list_datasets():
            out[record["name"]] = {"record": record, "owner": owner.owner, "delegation": owner.delegation,
                                   "budget": budget_summary(ledger.budget(record["name"]))}
        return out, self.store.get_advertised()

    async def tick(self, *, now: float | None = None) -> int:
        """Publish what changed or ages; tombstone what went. Returns how many records were published."""
        now = time.time() if now is None else now
        current, advertised = await trio.to_thread.run_sync(self._current)
        published = 0
        for name, what in current.items():
            content = {k: v for k, v in what["record"].items() if k != "created"}
            digest = hashlib.sha256(canonical_packb([content, what["owner"], what["delegation"], what["budget"],
                                                     self.addrs])).hexdigest()
            last = self._published.get(name)
            if last is not None and last[0] == digest and now - last[1] < self.ttl / 3:
                continue
            raw = make_advert(self.identity, what["record"], owner=what["owner"], delegation=what["delegation"],
                              addrs=self.addrs, budget=what["budget"], ttl=self.ttl, now=now)
            await self.gossip.publish(raw)
            self._to_dht[name] = raw
            self._published[name] = (digest, now)
            published += 1
            logger.info("advertised dataset %s%s", name, "" if last is None else " again")
        for name in sorted(set(advertised) - set(current)):
            tomb = make_tombstone(self.identity, name, ttl=self.ttl, now=now)
            await self.gossip.publish(tomb)
            self._to_dht[name] = tomb
            self._published.pop(name, None)
            published += 1
            logger.info("dataset %s removed: tombstone published", name)
        if set(advertised) != set(current):
            await trio.to_thread.run_sync(self.store.set_advertised, sorted(current))
        return published

    async def _put_in_dht(self) -> None:
        """Put what changed in the DHT once it has peers (a node that starts alone puts its adverts when it meets
        its first peer). A task of its own: a slow DHT must not hold up the index or its persistence.

        The first puts wait ``DHT_FIRST_S``: a node that starts on a LAN is connected to every daemon there within a
        second, and each put is a lookup plus a request to each of them, all while those connections are being set
        up and the node should be answering its first searches (bench/discovery.py's LAN section). The gossip
        index carries the adverts on the LAN; the DHT is for peers beyond it, to whom a few seconds do not matter."""
        await trio.sleep(DHT_FIRST_S)
        while True:
            await trio.sleep(1.0)
            if self.dht is None or not self._to_dht or not self.dht.has_peers():
                continue
            pending, self._to_dht = self._to_dht, {}
            started = trio.current_time()
            with trio.move_on_after(60):
                done = await self.dht.put_adverts(pending.values())
                logger.info("DHT: %d of %d adverts put in %.1f s", done, len(pending), trio.current_time() - started)
                continue
            logger.info("DHT: putting adverts took over 60 s; retried at the next change or republish")

    async def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, {}
            await trio.to_thread.run_sync(self.store.index_apply, pending)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self.tick()
        async with trio.open_nursery() as nursery:
            if self.dht is not None:
                nursery.start_soon(self._put_in_dht)
            task_status.started()
            await self._publish_and_persist()

    async def _publish_and_persist(self) -> None:
        next_check = trio.current_time() + CHECK_S
        try:
            while True:
                with trio.move_on_at(min(next_check, trio.current_time() + FLUSH_S)):
                    await self._poke.wait()
                try:
                    if self._poke.is_set() or trio.current_time() >= next_check:
                        self._poke = trio.Event()
                        next_check = trio.current_time() + CHECK_S
                        await self.tick()
                    await self.flush()
                except Exception:  # a full disk or a corrupt record: keep serving jobs, retry at the next tick
                    logger.exception("advertiser: cannot publish or persist adverts")
                    await trio.sleep(CHECK_S)
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self.flush()
                except Exception:
                    logger.exception("advertiser: cannot persist the index at stop")
