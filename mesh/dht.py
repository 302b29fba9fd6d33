"""The Kademlia DHT (py-libp2p's kad_dht) for a mesh bigger than one LAN: signed adverts as values, tags as providers.

A node puts each of its adverts under ``/hivecell/<advert key, hex>`` and announces itself as a provider of each of
its datasets' tags (the provider key is ``sha256("hivecell-tag:" + tag)``). A scientist whose index peers do not reach
a dataset asks the DHT who provides a tag, dials those nodes and asks them for their adverts (which it verifies, as
always). Our DHT speaks ``/hivecell/kad/1.0.0``, apart from the public IPFS DHT.

Validation is strict (shared/notes/py-libp2p-0.8.1.md, pitfall 4a): the ``hivecell`` namespace accepts only a
verified advert whose key is its own key, and when two values meet the newer wins (the index's order); any other
namespace but ``pk`` is refused, so nobody can use our nodes as free storage.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

import trio

from .host import MeshHost, short
from .index import InvalidAdvert, parse_advert

__all__ = ["AdvertValidator", "MeshDht", "tag_key", "value_key"]

logger = logging.getLogger(__name__)

NAMESPACE = "hivecell"
PROTOCOL_PREFIX = "/hivecell"


def tag_key(tag: str) -> str:
    """The provider key of a dataset tag (hex of a sha256, which kad_dht stores as those 32 bytes)."""
    return hashlib.sha256(f"hivecell-tag:{tag}".encode()).hexdigest()


def value_key(advert_key: bytes) -> str:
    return f"/{NAMESPACE}/{advert_key.hex()}"


def _validator_base():
    from libp2p.records.validator import Validator

    return Validator


class AdvertValidator(_validator_base()):  # type: ignore[misc]
    """kad_dht validator of ``/hivecell/<key>``: a verified advert filed under its own key; the newest wins."""

    def validate(self, key: str, value: bytes) -> None:
        try:
            advert = parse_advert(value)
        except InvalidAdvert as exc:
            raise ValueError(f"not a valid advert: {exc.reason}") from None
        if key != value_key(advert.key):
            raise ValueError("the advert is not the one for this key")

    def select(self, key: str, values: list[bytes]) -> int:
        best, best_rank = 0, None
        for i, value in enumerate(values):
            try:
                rank = parse_advert(value).rank
            except InvalidAdvert:
                continue
            if best_rank is None or rank > best_rank:
                best, best_rank = i, rank
        return best


class MeshDht:
    """The DHT of one host. Run :meth:`serve` in a nursery; then :meth:`put_adverts`, :meth:`providers`."""

    def __init__(self, host: MeshHost, *, server: bool = True) -> None:
        self.host, self.server = host, server
        self._dht = None
        self._ready = trio.Event()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
        from libp2p.records.pubkey import PublicKeyValidator
        from libp2p.records.validator import NamespacedValidator
        from libp2p.tools.anyio_service import background_trio_service

        for name in ("libp2p.kad_dht", "libp2p.kad_dht.kad_dht", "libp2p.kad_dht.value_store"):
            logging.getLogger(name).setLevel(logging.ERROR)  # pitfall 4c: a line per normal stream close
        validator = NamespacedValidator({NAMESPACE: AdvertValidator(), "pk": PublicKeyValidator()},
                                        strict_validation=True)
        dht = KadDHT(self.host.libp2p, DHTMode.SERVER if self.server else DHTMode.CLIENT, validator=validator,
                     validator_changed=True, protocol_prefix=PROTOCOL_PREFIX, strict_validation=True)
        async with background_trio_service(dht):
            self._dht = dht
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._fill_routing_table)
                    task_status.started()
            finally:
                self._dht = None

    async def _fill_routing_table(self) -> None:
        """kad_dht does not add connected peers by itself (pitfall 4d): add each new one."""
        added: set[str] = set()
        while True:
            for peer in self.host.connected_peers():
                if peer not in added:
                    added.add(peer)
                    try:
                        from libp2p.peer.id import ID

                        await self._dht.add_peer(ID.from_base58(peer))  # type: ignore[union-attr]
                        self._ready.set()
                    except Exception as exc:  # a peer without the DHT protocol (a scientist's client)
                        logger.debug("DHT: cannot add %s: %r", short(peer), exc)
            await trio.sleep(1.0)

    def has_peers(self) -> bool:
        return self._dht is not None and self._dht.get_routing_table_size() > 0

    async def put_adverts(self, raws: Iterable[bytes]) -> int:
        """Put each advert (ours) in the DHT and provide its tags; returns how many went out. Never raises."""
        if self._dht is None:
            return 0
        done = 0
        for raw in raws:
            try:
                advert = parse_advert(raw)
                await self._dht.put_value(value_key(advert.key), raw)
                for tag in advert.tags:
                    await self._dht.provide(tag_key(tag))
                done += 1
            except Exception as exc:  # no peers yet, or a peer gone mid-put: the next republish tries again
                logger.debug("DHT: cannot publish an advert: %r", exc)
        return done

    async def providers(self, tag: str, *, count: int = 20) -> list[tuple[str, list[str]]]:
        """Nodes that provide ``tag``: ``(peer id, addresses)``, without duplicates (pitfall 4b)."""
        if self._dht is None:
            return []
        try:
            found = await self._dht.find_providers(tag_key(tag), count)
        except Exception as exc:
            logger.debug("DHT: find_providers(%s) failed: %r", tag, exc)
            return []
        out: dict[str, list[str]] = {}
        for info in found:
            peer = info.peer_id.to_base58()
            addrs = [f"{a}/p2p/{peer}" if "/p2p/" not in str(a) else str(a) for a in info.addrs]
            out.setdefault(peer, [])
            out[peer] += [a for a in addrs if a not in out[peer]]
        return list(out.items())
