"""LAN discovery with python-zeroconf: announce ``_hivecell._tcp.local.`` and browse for it, on chosen interfaces only.

py-libp2p's own mDNS binds every interface and cannot be told otherwise (shared/notes/py-libp2p-0.8.1.md, section 5),
so we run zeroconf ourselves with an explicit list of interface addresses: a node announces where the operator said,
and tests keep multicast inside network namespaces they made.

A service instance is named by the node's peer id; its TXT record carries ``id`` (the peer id) and ``a0``..``a7``
(multiaddrs ending in ``/p2p/<id>``). Nothing in mDNS is authenticated: a found address is only a hint to dial, and
the Noise handshake of the dial proves the peer id (an impostor's connection fails). Zeroconf runs its own thread;
its callbacks are handed to trio through a bounded channel, and every blocking call (registration, lookups, close)
goes through ``trio.to_thread``.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable, Sequence

import trio

from .errors import MdnsError
from .host import short

__all__ = ["SERVICE", "MdnsError", "announce_addrs", "resolve_interfaces", "serve_mdns"]

logger = logging.getLogger(__name__)

SERVICE = "_hivecell._tcp.local."
MAX_TXT_ADDRS = 8


def _ipv4(value: str) -> bool:
    try:
        socket.inet_aton(value)
    except OSError:
        return False
    return value.count(".") == 3


def resolve_interfaces(interfaces: Sequence[str] | None) -> list[str]:
    """IPv4 addresses to run mDNS on.

    Args:
        interfaces: interface names (``eth0``) or IPv4 addresses; ``None`` means every interface that has an IPv4
            address, except loopback.

    Raises:
        MdnsError: a name that is no interface here, or an interface without an IPv4 address.
    """
    import ifaddr  # a dependency of zeroconf

    adapters = {a.nice_name: [ip.ip for ip in a.ips if isinstance(ip.ip, str)] for a in ifaddr.get_adapters()}
    if interfaces is None:
        return sorted({ip for ips in adapters.values() for ip in ips if not ip.startswith("127.")})
    out: list[str] = []
    for item in interfaces:
        if _ipv4(item):
            out.append(item)
        elif item in adapters:
            if not adapters[item]:
                raise MdnsError(f"interface {item} has no IPv4 address")
            out.extend(adapters[item])
        else:
            raise MdnsError(f"no interface named {item!r} (known: {', '.join(sorted(adapters))})")
    return sorted(set(out))


def announce_addrs(listen: Sequence[str], ips: Sequence[str]) -> list[str]:
    """What to put in the TXT record: listen addresses reachable on the mDNS interfaces.

    An address on ``0.0.0.0`` becomes one per interface address; a loopback address is announced only when mDNS
    itself runs on loopback (a LAN peer cannot dial our 127.0.0.1).
    """
    loopback_only = all(ip.startswith("127.") for ip in ips)
    out: list[str] = []
    for addr in listen:
        parts = addr.split("/")
        if len(parts) < 3 or parts[1] != "ip4":
            continue
        if parts[2] == "0.0.0.0":
            out.extend("/".join(parts[:2] + [ip] + parts[3:]) for ip in ips)
        elif parts[2].startswith("127.") and not loopback_only:
            continue
        else:
            out.append(addr)
    return list(dict.fromkeys(out))[:MAX_TXT_ADDRS]


def _valid_found(peer_id: str, addrs: list[str]) -> list[str]:
    from hivecell.crypto.identity import public_key_from_peer_id

    try:
        public_key_from_peer_id(peer_id)
    except Exception:
        return []
    return [a for a in addrs if a.startswith("/ip4/") and a.endswith("/p2p/" + peer_id) and len(a) <= 256]


async def _register(zc, info) -> None:
    try:
        await trio.to_thread.run_sync(lambda: zc.register_service(info, cooperating_responders=True))
    except Exception as exc:  # noqa: BLE001 - zeroconf's errors vary by version; the node works on without it
        logger.warning("mDNS: cannot announce this node (%s: %s); it still finds the others", type(exc).__name__, exc)


async def serve_mdns(
    *,
    peer_id: str,
    ips: Sequence[str],
    announce: Sequence[str] = (),
    on_found: Callable[[str, list[str]], Awaitable[None]],
    on_lost: Callable[[str], Awaitable[None]] | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Announce ``announce`` (if any) and report peers found on ``ips`` until cancelled.

    ``on_found(peer_id, addrs)`` runs for each peer seen or updated (never ourselves); ``on_lost(peer_id)`` when a peer
    says goodbye or its record expires.
    """
    from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

    if not ips:
        raise MdnsError("no interface to run mDNS on")
    zc = await trio.to_thread.run_sync(lambda: Zeroconf(interfaces=list(ips), ip_version=IPVersion.V4Only))
    send, receive = trio.open_memory_channel[tuple[str, object]](256)
    token = trio.lowlevel.current_trio_token()

    def on_change(zeroconf, service_type: str, name: str, state_change) -> None:  # in zeroconf's thread
        try:
            trio.from_thread.run_sync(send.send_nowait, (name, state_change), trio_token=token)
        except Exception:  # full (a flood of records), or trio has stopped: drop it; the next announce repeats it
            pass

    info = None
    browser = None
    try:
        if announce:
            port = next((int(a.split("/")[4]) for a in announce if a.split("/")[3:4] == ["tcp"]), 0)
            props = {"id": peer_id, **{f"a{i}": a for i, a in enumerate(announce[:MAX_TXT_ADDRS])}}
            info = ServiceInfo(SERVICE, f"{peer_id}.{SERVICE}", addresses=[socket.inet_aton(ip) for ip in ips],
                               port=port, properties=props, server=f"hc-{peer_id[-12:].lower()}.local.")
        async with trio.open_nursery() as nursery:
            if info is not None:
                # Instance names are peer ids, unique by construction: skip the ~1.7 s conflict probing. The first
                # announcement goes out at once; the call returns after two repeats (0.45 s), which the node need
                # not wait for before it is ready.
                nursery.start_soon(_register, zc, info)
            browser = await trio.to_thread.run_sync(lambda: ServiceBrowser(zc, SERVICE, handlers=[on_change]))
            logger.info("mDNS on %s%s", ", ".join(ips), " (announcing)" if announce else " (browsing only)")
            task_status.started()
            async for name, state in receive:
                found = name[: -len(SERVICE) - 1] if name.endswith("." + SERVICE) else ""
                if not found or found == peer_id:
                    continue
                if state is ServiceStateChange.Removed:
                    if on_lost is not None:
                        await on_lost(found)
                    continue
                got = await trio.to_thread.run_sync(lambda: zc.get_service_info(SERVICE, name, 2000))
                if got is None:
                    continue
                props = {(k or b"").decode(errors="replace"): (v or b"").decode(errors="replace")
                         for k, v in (got.properties or {}).items()}
                if props.get("id") != found:
                    logger.debug("mDNS: %s announces another id; ignored", name[:80])
                    continue
                addrs = _valid_found(found, [props[f"a{i}"] for i in range(MAX_TXT_ADDRS) if f"a{i}" in props])
                if addrs:
                    logger.debug("mDNS: found %s at %s", short(found), addrs)
                    await on_found(found, addrs)
    finally:
        with trio.CancelScope(shield=True):
            def close() -> None:
                if browser is not None:
                    browser.cancel()
                if info is not None:
                    try:
                        zc.unregister_service(info)  # a goodbye packet: peers forget us at once
                    except Exception:
                        pass
                zc.close()

            with trio.move_on_after(5):
                await trio.to_thread.run_sync(close)
