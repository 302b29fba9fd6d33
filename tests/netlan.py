"""A throw-away LAN made of Linux network namespaces, for tests of discovery (mDNS) between real processes.

Theory of operation: one *bridge namespace* holds a bridge ``br0``; each of the n *member namespaces* holds ``lo`` and
one veth end named ``eth0``, whose peer ``p<k>`` sits in the bridge namespace, enslaved to ``br0``. Every link is
created directly inside a namespace of ours (``ip -n NS link add ... peer name ... netns BR``), so nothing ever exists
in the root namespace, and nothing started inside a member can reach or announce on this machine's real interfaces:
a member has no route anywhere but its own /24 and multicast (``224.0.0.0/4 dev eth0``). IPv6 is off in all of them,
so there is no DAD, router solicitation or MLD noise.

Teardown kills every process we started inside a member (by its process group), then any process still inside one of
our namespaces (``ip netns pids``), then deletes the namespaces, which deletes their links. It is idempotent and runs
when the ``with namespace_lan(...)`` block is left, also on failure.

Usage::

    skip_unless_netns()                       # loud skip where namespaces cannot be made (not root, no ip, no veth)
    with namespace_lan(3) as lan:
        lan.ip(1)                             # '10.77.X.2'; member k has 10.77.X.(k+1)
        proc = lan.popen(1, [sys.executable, "-c", "..."], stdout=subprocess.PIPE)
        out = lan.run(2, ["ip", "-br", "addr"]).stdout
"""

from __future__ import annotations

import atexit
import functools
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Lan", "LanError", "namespace_lan", "netns_available", "skip_unless_netns"]

_IP_TIMEOUT = 10.0  # one `ip` command; they take milliseconds


def log_tail(path: Path, n: int = 3000) -> str:
    """The last ``n`` characters of a member's log, for failure messages."""
    try:
        return path.read_text(errors="replace")[-n:]
    except FileNotFoundError:
        return "(no log)"


class LanError(RuntimeError):
    """Building or tearing down the namespace LAN failed; the message names the command and its stderr."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT,
                          stdin=subprocess.DEVNULL, check=False)
    if check and proc.returncode != 0:
        raise LanError(f"`ip {' '.join(args)}` exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _root_links() -> set[str]:
    return {link["ifname"] for link in json.loads(_ip("-j", "link", "show").stdout or "[]")}


def _disable_ipv6(ns: str) -> None:
    # Inside the namespace only: /proc/sys/net is per network namespace. `default` makes links created later inherit it.
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1"], check=False, capture_output=True, timeout=_IP_TIMEOUT)


@functools.lru_cache(maxsize=1)
def netns_available() -> str | None:
    """None if this process can build a namespace LAN, else why not (one line, for a skip message).

    Tries for real: creates a throw-away namespace with a veth pair and a bridge inside it, runs a command in it with
    ``ip netns exec``, and deletes it.
    """
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return f"network namespaces need root (euid is {os.geteuid()})"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"hcl{os.getpid()}probe"
    try:
        _ip("netns", "add", probe)
    except (LanError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _ip("-n", probe, "link", "add", "vp0", "type", "veth", "peer", "name", "vp1")
        _ip("-n", probe, "link", "add", "brp", "type", "bridge")
        _ip("-n", probe, "link", "set", "vp1", "master", "brp")
        done = subprocess.run(["ip", "netns", "exec", probe, "true"], capture_output=True, text=True,
                              timeout=_IP_TIMEOUT, check=False)
        if done.returncode != 0:
            return f"`ip netns exec` does not work here: {done.stderr.strip()}"
    except (LanError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot create a veth pair or bridge inside a namespace (no veth/bridge module?): {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def skip_unless_netns() -> None:
    """``pytest.skip`` loudly (a warning too, so it shows in the summary) where no namespace LAN can be built."""
    reason = netns_available()
    if reason is not None:
        import pytest

        message = f"LAN TEST SKIPPED: {reason}"
        warnings.warn(message, stacklevel=2)
        print(f"\n*** {message} ***", file=sys.stderr)
        pytest.skip(message)


@dataclass
class Lan:
    """n member namespaces on one bridge. Members are numbered from 1; member k has address ``.(k+1)`` on ``eth0``."""

    prefix: str
    network: ipaddress.IPv4Network
    n: int
    bridge_ns: str
    names: list[str] = field(default_factory=list)  # member namespaces created so far, member k at [k - 1]
    _created: list[str] = field(default_factory=list)  # every namespace created, in order
    _procs: list[subprocess.Popen] = field(default_factory=list)
    _down: bool = False

    @property
    def ips(self) -> list[str]:
        return [self.ip(k) for k in range(1, self.n + 1)]

    def name(self, k: int) -> str:
        """The namespace of member k (1..n)."""
        self._check(k)
        return self.names[k - 1]

    def ip(self, k: int) -> str:
        """Member k's IPv4 address on its ``eth0``."""
        self._check(k)
        return str(self.network.network_address + k + 1)

    def argv(self, k: int, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside member k. ``ip netns exec`` execs it: the pid stays the same."""
        return ["ip", "netns", "exec", self.name(k), *map(str, argv)]

    def popen(self, k: int, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start ``argv`` inside member k in a new session (its process group is killed by :meth:`down`).

        Keyword arguments go to :class:`subprocess.Popen`; the environment is inherited unless ``env`` is given.
        """
        if self._down:
            raise LanError("this LAN is down")
        kw.setdefault("start_new_session", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.argv(k, argv), **kw)
        self._procs.append(proc)
        return proc

    def run(self, k: int, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        """Run ``argv`` inside member k to its end: output captured as text unless told otherwise, ``timeout`` 60 s."""
        if self._down:
            raise LanError("this LAN is down")
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60.0)
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("check", False)
        return subprocess.run(self.argv(k, argv), **kw)

    def stop(self, proc: subprocess.Popen, grace: float = 10.0) -> int:
        """SIGTERM ``proc``'s process group, SIGKILL after ``grace`` seconds; returns its exit status."""
        return _stop_all([proc], grace)[0]

    def down(self, grace: float = 10.0) -> None:
        """Stop what we started, kill anything left inside our namespaces, delete them. Safe to call again.

        Raises:
            LanError: a namespace could not be deleted (everything else was still tried).
        """
        if self._down:
            return
        self._down = True
        _LIVE.discard(self)
        _stop_all([p for p in self._procs if p.poll() is None], grace)
        errors = []
        for ns in reversed(self._created):
            # Anything still in there got there through us (workers forked by a daemon, say): it is ours to end.
            for _ in range(50):
                pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.02)
            done = _ip("netns", "del", ns, check=False)
            if done.returncode != 0 and ns in _ip("netns", "list").stdout.split():
                errors.append(f"{ns}: {done.stderr.strip()}")
        if errors:
            raise LanError("could not delete namespaces: " + "; ".join(errors))

    def _check(self, k: int) -> None:
        if not 1 <= k <= len(self.names):
            raise IndexError(f"member {k} of a LAN of {len(self.names)} (members count from 1)")

    def __hash__(self) -> int:
        return id(self)


def _stop_all(procs: list[subprocess.Popen], grace: float) -> list[int]:
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        _signal_group(proc, signal.SIGKILL)  # also the children left in its group
    return [proc.wait() for proc in procs]


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        if os.getpgid(proc.pid) == proc.pid:  # a session of its own (start_new_session): the whole group
            os.killpg(proc.pid, sig)
        elif proc.poll() is None:
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


_LIVE: set[Lan] = set()


@atexit.register
def _down_leftovers() -> None:  # a LAN whose `with` block was never left (a generator never closed, say)
    for lan in list(_LIVE):
        try:
            lan.down(grace=2.0)
        except LanError as exc:
            print(f"netlan: {exc}", file=sys.stderr)


def _wait_ready(lan: Lan, timeout: float) -> None:
    """Until every member's eth0 is up with carrier and every bridge port forwards."""
    deadline = time.monotonic() + timeout
    while True:
        ports = json.loads(_ip("-n", lan.bridge_ns, "-j", "link", "show", "master", "br0").stdout or "[]")
        members = [json.loads(_ip("-n", ns, "-j", "link", "show", "eth0").stdout)[0] for ns in lan.names]
        bridge = json.loads(subprocess.run(["bridge", "-n", lan.bridge_ns, "-j", "link", "show"], capture_output=True,
                                           text=True, timeout=_IP_TIMEOUT, check=False).stdout or "[]")
        ready = (len(ports) == lan.n and all(m.get("operstate") == "UP" for m in members)
                 and all("LOWER_UP" in p.get("flags", []) for p in ports)
                 and sum(1 for b in bridge if b.get("state") == "forwarding") == lan.n)
        if ready:
            return
        if time.monotonic() > deadline:
            raise LanError(f"LAN not up after {timeout} s: members {members}, bridge ports {bridge}")
        time.sleep(0.02)


@contextmanager
def namespace_lan(n: int, *, subnet: str | None = None, ready_timeout: float = 10.0) -> Iterator[Lan]:
    """A LAN of ``n`` member namespaces (1..n) on one bridge, torn down when the block is left, also on failure.

    Args:
        n: members, 1 to 250.
        subnet: an IPv4 /24 (or larger) for the members; default ``10.77.X.0/24`` with X taken from the pid.
        ready_timeout: seconds to wait for links and bridge ports to come up.

    Raises:
        LanError: a command failed, the links did not come up, or a link appeared in the root namespace (then the LAN
            is torn down at once).
    """
    network = ipaddress.IPv4Network(subnet or f"10.77.{os.getpid() % 250 + 1}.0/24")
    if not 1 <= n <= min(250, network.num_addresses - 3):
        raise ValueError(f"n must be 1..{min(250, network.num_addresses - 3)}, not {n}")
    prefix = f"hcl{os.getpid()}x{next(_SEQ)}"  # unique per LAN of this process, and whose it is at a glance
    lan = Lan(prefix=prefix, network=network, n=n, bridge_ns=f"{prefix}b")
    _LIVE.add(lan)
    root_before = _root_links()
    try:
        _ip("netns", "add", lan.bridge_ns)
        lan._created.append(lan.bridge_ns)
        _disable_ipv6(lan.bridge_ns)
        # mcast_snooping 0: the bridge floods all multicast to every port whatever IGMP it has (not) seen.
        _ip("-n", lan.bridge_ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", lan.bridge_ns, "link", "set", "br0", "up")
        for k in range(1, n + 1):
            ns = f"{prefix}n{k}"
            _ip("netns", "add", ns)
            lan._created.append(ns)
            lan.names.append(ns)
            _disable_ipv6(ns)
            port = f"p{k}"
            # Both ends are born in namespaces of ours: `-n ns` makes eth0 there, `netns BR` puts the peer in BR.
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", lan.bridge_ns)
            _ip("-n", lan.bridge_ns, "link", "set", port, "master", "br0")
            _ip("-n", lan.bridge_ns, "link", "set", port, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{lan.ip(k)}/{network.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "multicast", "on", "up")
            # Multicast sent on the default route (no IP_MULTICAST_IF) needs a route; zeroconf sets the interface
            # itself, other code may not.
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        leaked = (_root_links() - root_before) & {"br0", *(f"p{k}" for k in range(1, n + 1))}
        if leaked:
            raise LanError(f"links appeared in the root namespace while building the LAN: {sorted(leaked)}")
        _wait_ready(lan, ready_timeout)
        yield lan
    finally:
        lan.down()


def _counter() -> Iterator[int]:
    i = 0
    while True:
        i += 1
        yield i


_SEQ = _counter()
