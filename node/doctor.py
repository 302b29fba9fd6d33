"""``hivecell doctor``: check a box before it joins the mesh, and say what to fix.

Theory of operation: ``gather_facts`` reads the machine (versions, disk, sockets, interfaces, clocks, the node home)
into a ``Facts`` value; ``evaluate`` turns facts into ``Check`` rows with pure functions, one per concern, so each
rule is unit-tested with faked facts (a GPU, a full disk, a port in use) that cannot exist on a CI box.

Two promises, because doctor runs on production boxes:

- It never imports torch into this process (the daemon never does; only the Worker does). torch is probed in a
  fresh interpreter, as the Worker is started.
- It sends no network traffic. Ports are checked by binding a socket and closing it, and multicast is reported from
  the interface flags only: nothing is sent, not even to a multicast group. Peers' clocks are the running daemon's
  own readings (``/hivecell/time/1.0.0``, kept in ``peers.json``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from hivecell.crypto.record import CLOCK_SKEW_S

from .home import Home

__all__ = [
    "Check", "ClockSample", "Facts", "Interface", "ListenFact", "PeerClock", "Status", "TorchProbe", "check_clock",
    "check_config", "check_peer_clocks", "peer_clocks_of",
    "check_daemon", "check_disk", "check_home_mode", "check_interfaces", "check_key_mode", "check_listen",
    "check_packages", "check_python", "check_torch", "evaluate", "exit_status", "gather_facts", "parse_flags",
    "parse_listen", "print_table", "probe_torch", "satisfies",
]

MIN_PYTHON = (3, 10)
DISK_WARN_BYTES = 5 << 30
DISK_FAIL_BYTES = 1 << 30
# No signed record can be valid before this software existed: a box whose clock is earlier (a Jetson without an RTC
# battery boots in 1970 or at its image's build date) would refuse every peer's records and have its own refused.
CLOCK_FLOOR = 1735689600.0  # 2025-01-01T00:00:00Z
TORCH_PROBE_TIMEOUT_S = 180.0  # the first `import torch` on a Jetson's SD card can take a minute
# Linux <net/if.h>
IFF_UP, IFF_LOOPBACK, IFF_MULTICAST = 0x1, 0x8, 0x1000
_LISTEN_FIX = "choose another address (--listen, HIVECELL_LISTEN or `listen` in config.toml)"


class Status(str, Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    """One row of the report: what was checked, how it went, what was found and how to fix it."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status.value, "detail": self.detail, "fix": self.fix}


# -- facts --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TorchProbe:
    """What a fresh interpreter found: torch's version and the CUDA devices it sees, or why it could not say."""

    version: str | None = None
    cuda: bool = False
    cuda_version: str | None = None
    devices: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class ListenFact:
    """A listen address and the outcome of binding it: ``bind_errno`` is ``None`` when it bound (or was not tried)."""

    addr: str
    bind_errno: int | None = None
    bind_error: str = ""


@dataclass(frozen=True)
class Interface:
    name: str
    ipv4: tuple[str, ...]
    up: bool
    loopback: bool
    multicast: bool | None  # None: the flags could not be read


@dataclass(frozen=True)
class ClockSample:
    """Two readings of the wall clock and the monotonic clock, taken a short while apart."""

    wall0: float
    mono0: float
    wall1: float
    mono1: float


@dataclass(frozen=True)
class PeerClock:
    """A peer's clock as the running daemon last read it: its time minus ours, good to half the round trip."""

    peer_id: str
    offset_s: float
    rtt_s: float = 0.0


@dataclass(frozen=True)
class Facts:
    """Everything the checks look at, as read by ``gather_facts`` or made up by a test."""

    python: tuple[int, ...]
    requirements: list[str] | None  # hivecell's requirement strings; None if hivecell's metadata is missing
    installed: Mapping[str, str | None]  # distribution name -> version, None if not installed
    torch: TorchProbe
    home_path: str
    key_path: str
    store_path: str
    free_bytes: int | None
    listen: list[ListenFact]
    daemon_running: bool
    daemon_info: Mapping[str, Any] | None
    key_mode: int | None  # None: no key
    home_mode: int | None  # None: no home
    interfaces: list[Interface]
    clock: ClockSample
    config_path: str
    config_exists: bool
    config_error: str | None = None
    config_keys: tuple[str, ...] = ()
    gpu: str = "auto"  # the effective `gpu` setting: where the Worker will train
    use_packaging: bool = True
    # the running daemon's readings of its peers' clocks (peers.json); None: no daemon runs, so none were taken
    peer_clocks: tuple[PeerClock, ...] | None = None


# -- version comparison -------------------------------------------------------------------------------------------
_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?:\(([^)]*)\)|([^;]*))\s*(?:;(.*))?$")
_CLAUSE = re.compile(r"^\s*(===|==|!=|~=|>=|<=|>|<)\s*([^\s,]+)\s*$")


def parse_requirement(req: str, *, use_packaging: bool = True) -> tuple[str, str, bool] | None:
    """``(name, specifier, needed)`` of a requirement string; ``needed`` is false for an extra's requirement.

    Returns ``None`` for a string that does not parse.
    """
    if use_packaging:
        try:
            from packaging.requirements import InvalidRequirement, Requirement
        except ImportError:
            use_packaging = False
        else:
            try:
                r = Requirement(req)
            except InvalidRequirement:
                return None
            needed = r.marker is None or r.marker.evaluate({"extra": ""})
            return r.name, str(r.specifier), needed
    m = _REQ.match(req)
    if not m:
        return None
    return m.group(1), (m.group(2) or m.group(3) or "").strip(), _simple_marker(m.group(4) or "")


_PY_MARKER = re.compile(r"""^\s*python_(?:full_)?version\s*(==|!=|>=|<=|>|<)\s*["']([0-9.]+)["']\s*$""")


def _simple_marker(marker: str) -> bool:
    """Whether a requirement with this marker is needed here, without ``packaging``: an extra's requirement is not;
    a single ``python_version`` comparison is evaluated; anything else is assumed needed."""
    if not marker.strip():
        return True
    if "extra" in marker:
        return False
    m = _PY_MARKER.match(marker)
    if not m:
        return True
    here = ".".join(str(v) for v in sys.version_info[:3])
    return satisfies(here, m.group(1) + m.group(2), use_packaging=False)


def _release(version: str) -> tuple[tuple[int, ...], bool]:
    """The numeric release of a version and whether it is a pre-release (the simple comparison's view of it)."""
    public = version.split("+", 1)[0]
    m = re.match(r"^v?(\d+(?:\.\d+)*)(.*)$", public.strip())
    if not m:
        return (), False
    rest = m.group(2).lower()
    return tuple(int(p) for p in m.group(1).split(".")), bool(re.match(r"^[-_.]?(a|b|c|rc|alpha|beta|pre|dev)", rest))


def _cmp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = max(len(a), len(b))
    a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
    return (a > b) - (a < b)


def satisfies(version: str, specifier: str, *, use_packaging: bool = True) -> bool:
    """Whether ``version`` meets ``specifier`` (e.g. ``">=1.4,<2"``); pre-releases count (Jetson torch is one).

    With ``packaging`` this is PEP 440; without it, a simple comparison of the numeric release that ignores
    pre-release and local labels, except that ``2.5.0a0`` is below ``2.5``.
    """
    if not specifier.strip():
        return True
    if use_packaging:
        try:
            from packaging.specifiers import InvalidSpecifier, SpecifierSet
            from packaging.version import InvalidVersion, Version
        except ImportError:
            pass
        else:
            try:
                return SpecifierSet(specifier).contains(Version(version), prereleases=True)
            except (InvalidSpecifier, InvalidVersion):
                pass  # fall through to the simple comparison
    have, have_pre = _release(version)
    for clause in specifier.split(","):
        m = _CLAUSE.match(clause)
        if not m or not have:
            return False
        op, want_text = m.groups()
        if want_text.endswith(".*") and op in ("==", "!="):
            want = _release(want_text[:-2])[0]
            match = have[:len(want)] == want
            if match != (op == "=="):
                return False
            continue
        want, want_pre = _release(want_text)
        c = _cmp(have, want)
        if c == 0 and have_pre != want_pre:
            c = -1 if have_pre else 1
        ok = {
            "==": c == 0, "===": version == want_text, "!=": c != 0, ">=": c >= 0, "<=": c <= 0, ">": c > 0,
            "<": c < 0, "~=": c >= 0 and have[:max(1, len(want) - 1)] == want[:max(1, len(want) - 1)],
        }[op]
        if not ok:
            return False
    return True


# -- checks (pure) ------------------------------------------------------------------------------------------------
def check_python(version: tuple[int, ...]) -> Check:
    shown = ".".join(str(v) for v in version[:3])
    if tuple(version[:2]) >= MIN_PYTHON:
        return Check("python", Status.OK, f"Python {shown}")
    need = ".".join(map(str, MIN_PYTHON))
    return Check("python", Status.FAIL, f"Python {shown}; Hivecell needs {need} or newer",
                 f"install Python {need}+ (JetPack 6 / Ubuntu 22.04 ship 3.10)")


def check_packages(requirements: list[str] | None, installed: Mapping[str, str | None], *,
                   use_packaging: bool = True, skip: Iterable[str] = ("torch",)) -> list[Check]:
    """One check per runtime requirement of hivecell (torch has its own check, in a subprocess)."""
    if requirements is None:
        return [Check("packages", Status.WARN, "hivecell's package metadata is missing: requirements not checked",
                      "install the package: pip install -e . (or pip install hivecell)")]
    skipped = {_norm(s) for s in skip}
    checks = []
    for req in requirements:
        parsed = parse_requirement(req, use_packaging=use_packaging)
        if parsed is None:
            checks.append(Check("packages", Status.WARN, f"cannot parse the requirement {req!r}"))
            continue
        name, spec, needed = parsed
        if not needed or _norm(name) in skipped:
            continue
        version = installed.get(name)
        if version is None:
            version = {_norm(k): v for k, v in installed.items()}.get(_norm(name))
        wanted = f"{name}{spec}"
        if version is None:
            checks.append(Check(name, Status.FAIL, f"not installed (need {spec or 'any version'})",
                                f"pip install '{wanted}'"))
        elif not satisfies(version, spec, use_packaging=use_packaging):
            checks.append(Check(name, Status.FAIL, f"{version} installed, need {spec}", f"pip install '{wanted}'"))
        else:
            checks.append(Check(name, Status.OK, f"{version} ({spec or 'any version'})"))
    return checks


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_torch(probe: TorchProbe, requirement: str | None = None, *, use_packaging: bool = True,
                gpu: str = "auto") -> list[Check]:
    """torch as the Worker will see it, whether CUDA is visible to it, and what the ``gpu`` setting makes of that."""
    if probe.error is not None or probe.version is None:
        return [
            Check("torch", Status.FAIL, f"the Worker cannot import torch: {probe.error or 'no version reported'}",
                  "on a Jetson use torch from the L4T base image or NVIDIA's Jetson wheels; elsewhere pip install "
                  "torch (the CPU build is enough)"),
            Check("cuda", Status.FAIL if gpu == "on" else Status.WARN, "not checked: torch does not import"),
        ]
    spec = ""
    if requirement:
        parsed = parse_requirement(requirement, use_packaging=use_packaging)
        spec = parsed[1] if parsed else ""
    if spec and not satisfies(probe.version, spec, use_packaging=use_packaging):
        torch_check = Check("torch", Status.FAIL, f"{probe.version} imports, need {spec}",
                            "install a newer torch (on a Jetson: a newer JetPack image or NVIDIA's wheels)")
    else:
        torch_check = Check("torch", Status.OK, f"{probe.version} ({spec or 'any version'}) imports in a fresh "
                                                "interpreter")
    no_cuda_fix = ("on a Jetson: run on JetPack with torch from the L4T image or NVIDIA's wheels (a CPU wheel from PyPI "
                   "has no CUDA); in Docker add --runtime nvidia")
    if probe.cuda:
        devices = ", ".join(probe.devices) or "a device"
        seen = f"CUDA {probe.cuda_version or '?'} visible to torch: {devices}"
        if gpu == "off":
            cuda_check = Check("cuda", Status.OK, f"{seen}; gpu = off: the Worker trains on CPU")
        else:
            cuda_check = Check("cuda", Status.OK, f"{seen}; the Worker trains on it (gpu = {gpu})")
    elif gpu == "on":
        cuda_check = Check("cuda", Status.FAIL, "gpu = on but torch sees no CUDA: every job would fail",
                           no_cuda_fix + "; or set gpu = auto to train on CPU")
    else:
        cuda_check = Check("cuda", Status.WARN, "no CUDA: the Worker trains on CPU", no_cuda_fix)
    return [torch_check, cuda_check]


def check_disk(path: str, free_bytes: int | None) -> Check:
    if free_bytes is None:
        return Check("disk", Status.WARN, f"cannot tell the free space at {path}", "check that the path is readable")
    gib = free_bytes / (1 << 30)
    detail = f"{gib:.1f} GiB free at {path}"
    if free_bytes < DISK_FAIL_BYTES:
        return Check("disk", Status.FAIL, detail + " (under 1 GiB: the store cannot take a dataset or a job)",
                     "free space, or put the home on a larger disk (--home or HIVECELL_HOME)")
    if free_bytes < DISK_WARN_BYTES:
        return Check("disk", Status.WARN, detail + " (under 5 GiB)",
                     "free space, or put the home on a larger disk (--home or HIVECELL_HOME)")
    return Check("disk", Status.OK, detail)


def parse_listen(addr: str) -> tuple[int, str, int, str] | None:
    """``(family, host, port, "tcp"|"udp")`` of an ``/ip4|ip6/HOST/tcp|udp/PORT/...`` multiaddr, else ``None``."""
    parts = addr.split("/")
    if len(parts) < 5 or parts[0] != "" or parts[1] not in ("ip4", "ip6") or parts[3] not in ("tcp", "udp"):
        return None
    try:
        port = int(parts[4])
    except ValueError:
        return None
    if not 0 <= port <= 65535:
        return None
    return (socket.AF_INET if parts[1] == "ip4" else socket.AF_INET6), parts[2], port, parts[3]


def check_listen(fact: ListenFact, *, daemon_running: bool, daemon_addrs: Iterable[str] = ()) -> Check:
    name = f"listen {fact.addr}"
    parsed = parse_listen(fact.addr)
    if parsed is None:
        return Check(name, Status.WARN, "not checked: doctor checks /ip4 and /ip6 addresses with /tcp or /udp")
    _, _, port, proto = parsed
    if port == 0:
        return Check(name, Status.OK, "any free port, chosen when the daemon starts")
    if fact.bind_errno is None:
        return Check(name, Status.OK, f"{proto} port {port} can be bound")
    if fact.bind_errno == errno.EADDRINUSE:
        held = {(p[2], p[3]) for p in map(parse_listen, daemon_addrs) if p is not None}
        if daemon_running and (port, proto) in held:
            return Check(name, Status.OK, "in use by this node's running daemon")
        return Check(name, Status.FAIL, f"{proto} port {port} is in use by another program",
                     f"stop that program (ss -ltnp 'sport = :{port}' shows it), or {_LISTEN_FIX}")
    if fact.bind_errno in (errno.EACCES, errno.EPERM):
        return Check(name, Status.FAIL, f"not allowed to bind {proto} port {port}: {fact.bind_error}",
                     "use a port of 1024 or above, " + _LISTEN_FIX)
    if fact.bind_errno == errno.EADDRNOTAVAIL:
        return Check(name, Status.FAIL, f"{parsed[1]} is not an address of this machine",
                     "use one of this machine's addresses or 0.0.0.0, " + _LISTEN_FIX)
    return Check(name, Status.FAIL, f"cannot bind: {fact.bind_error or os.strerror(fact.bind_errno)}", _LISTEN_FIX)


def check_key_mode(key_path: str, mode: int | None) -> Check:
    if mode is None:
        return Check("node key", Status.WARN, f"no node key at {key_path}: the home is not initialised",
                     "hivecell init")
    if mode & 0o077:
        return Check("node key", Status.FAIL, f"{key_path} has mode {mode:04o}: other users can read the key",
                     f"chmod 600 {key_path}")
    return Check("node key", Status.OK, f"{key_path} mode {mode:04o}")


def check_home_mode(home_path: str, mode: int | None) -> Check:
    if mode is None:
        return Check("home", Status.WARN, f"{home_path} does not exist", "hivecell init")
    if mode & 0o077:
        return Check("home", Status.WARN, f"{home_path} has mode {mode:04o}: other users can list it",
                     f"chmod 700 {home_path}")
    return Check("home", Status.OK, f"{home_path} mode {mode:04o}")


def check_daemon(running: bool, info: Mapping[str, Any] | None) -> Check:
    if not running:
        return Check("daemon", Status.OK, "not running", "start it with: hivecell run")
    if info is None:
        return Check("daemon", Status.OK, "running, not yet listening")
    addrs = ", ".join(info.get("addrs", [])) or "no address yet"
    return Check("daemon", Status.OK, f"running (pid {info.get('pid', '?')}) on {addrs}")


def parse_flags(psutil_flags: str | None, sysfs_flags: str | None) -> tuple[bool, bool, bool] | None:
    """``(up, loopback, multicast)`` from psutil's flag names (``"up,broadcast,running,multicast"``, psutil >= 5.9.3
    on Linux) or from ``/sys/class/net/IF/flags`` (``"0x1003"``); ``None`` if neither is available."""
    if psutil_flags is not None:
        names = {f.strip() for f in psutil_flags.split(",")}
        return "up" in names, "loopback" in names, "multicast" in names
    if sysfs_flags is not None:
        try:
            bits = int(sysfs_flags.strip(), 16)
        except ValueError:
            return None
        return bool(bits & IFF_UP), bool(bits & IFF_LOOPBACK), bool(bits & IFF_MULTICAST)
    return None


def check_interfaces(interfaces: list[Interface]) -> list[Check]:
    """Each interface with an IPv4 address, and whether mDNS (once discovery exists) will have one to use.

    Reported from the flags only: doctor sends no multicast, so "multicast works" means "the flag is set".
    """
    checks = []
    usable = []
    for itf in interfaces:
        if not itf.ipv4:
            continue
        name, addrs = f"interface {itf.name}", ", ".join(itf.ipv4)
        if itf.loopback:
            checks.append(Check(name, Status.OK, f"{addrs} (loopback: local only, not used by mDNS)"))
        elif not itf.up:
            checks.append(Check(name, Status.WARN, f"{addrs}, down", f"ip link set {itf.name} up"))
        elif itf.multicast is None:
            checks.append(Check(name, Status.WARN, f"{addrs}, flags unreadable: multicast unknown"))
        elif not itf.multicast:
            checks.append(Check(name, Status.WARN, f"{addrs}, no MULTICAST flag: mDNS cannot use it",
                                f"ip link set {itf.name} multicast on"))
        else:
            usable.append(itf.name)
            checks.append(Check(name, Status.OK, f"{addrs}, MULTICAST flag set"))
    note = "flags only, no traffic sent; mDNS discovery itself is not built yet"
    if usable:
        checks.append(Check("mdns", Status.OK, f"{len(usable)} interface(s) can carry mDNS: {', '.join(usable)} "
                                               f"({note})"))
    else:
        checks.append(Check("mdns", Status.WARN, f"no interface is up with IPv4 and MULTICAST ({note})",
                            "connect the box to the LAN; in Docker use host networking (network_mode: host)"))
    return checks


def check_clock(sample: ClockSample, *, floor: float = CLOCK_FLOOR) -> Check:
    """The wall clock is plausible (after ``floor``) and runs with the monotonic clock.

    Skew against peers is :func:`check_peer_clocks`.
    """
    not_checked = f"skew against peers: see peer-clocks (records allow {CLOCK_SKEW_S} s)"
    now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(sample.wall1))
    if sample.wall1 < floor:
        return Check("clock", Status.FAIL, f"the system clock says {now}, before this software existed; peers "
                                           f"will refuse this node's signed records and it theirs",
                     "enable time sync: timedatectl set-ntp true (or set it: date -s)")
    drift = abs((sample.wall1 - sample.wall0) - (sample.mono1 - sample.mono0))
    if drift > 0.5:
        return Check("clock", Status.WARN, f"{now}; the wall clock jumped {drift:.1f} s against the monotonic clock "
                                           f"while sampling (being stepped?); {not_checked}",
                     "let time sync settle, then run doctor again")
    return Check("clock", Status.OK, f"{now}, runs with the monotonic clock; {not_checked}")


def check_peer_clocks(clocks: Sequence[PeerClock] | None, *, allowed: float = CLOCK_SKEW_S) -> Check:
    """The peers' clocks agree with ours: signed records (adverts, job requests, sign-offs) issued more than
    ``allowed`` seconds in the future, or expired by our clock, are refused. Fails beyond ``allowed``, warns beyond a
    quarter of it (the margin that is left for a record's travel and its lifetime)."""
    if clocks is None:
        return Check("peer-clocks", Status.OK, "not measured: no daemon runs in this home (a running daemon reads "
                                               "its peers' clocks; run doctor again while it runs)")
    if not clocks:
        return Check("peer-clocks", Status.OK, "the daemon has not read a peer's clock yet (no peer connected)")
    worst = max(clocks, key=lambda c: abs(c.offset_s))
    ahead = "ahead of" if worst.offset_s > 0 else "behind"
    detail = (f"{len(clocks)} peer(s) read; the largest offset is peer {worst.peer_id[-8:]}, "
              f"{abs(worst.offset_s):.2f} s {ahead} this box (±{worst.rtt_s / 2:.3f} s)")
    fix = ("enable time sync on this box and on that peer (timedatectl set-ntp true; chrony or systemd-timesyncd "
           "with a LAN time server if the mesh has no internet)")
    if abs(worst.offset_s) > allowed:
        return Check("peer-clocks", Status.FAIL, f"{detail}: beyond the {allowed} s that signed records allow, so "
                                                 f"records between the two are refused", fix)
    if abs(worst.offset_s) > allowed / 4:
        return Check("peer-clocks", Status.WARN, f"{detail}: within the {allowed} s allowed, with little margin",
                     fix)
    return Check("peer-clocks", Status.OK, detail)


def peer_clocks_of(peers_info: Mapping[str, Any] | None) -> tuple[PeerClock, ...] | None:
    """The readings in a daemon's ``peers.json`` (rows with ``clock_offset_s``); malformed rows are skipped."""
    if peers_info is None:
        return None
    out = []
    for row in peers_info.get("peers", []) if isinstance(peers_info.get("peers"), list) else []:
        try:
            out.append(PeerClock(str(row["peer_id"]), float(row["clock_offset_s"]),
                                 float(row.get("clock_rtt_s", 0.0))))
        except (KeyError, TypeError, ValueError):
            continue
    return tuple(out)


def check_config(path: str, exists: bool, error: str | None, keys: Iterable[str]) -> Check:
    if error is not None:
        return Check("config", Status.FAIL, error, f"fix or remove {path}; see: hivecell config show")
    if not exists:
        return Check("config", Status.OK, f"no {path}: defaults, environment variables and flags")
    keys = list(keys)
    return Check("config", Status.OK, f"{path}: " + (f"sets {', '.join(keys)}" if keys else "sets nothing"))


def evaluate(facts: Facts) -> list[Check]:
    """All checks over ``facts``, in report order."""
    torch_req = None
    for req in facts.requirements or []:
        parsed = parse_requirement(req, use_packaging=facts.use_packaging)
        if parsed and _norm(parsed[0]) == "torch":
            torch_req = req
    daemon_addrs = (facts.daemon_info or {}).get("addrs", [])
    return [
        check_python(facts.python),
        *check_packages(facts.requirements, facts.installed, use_packaging=facts.use_packaging),
        *check_torch(facts.torch, torch_req, use_packaging=facts.use_packaging, gpu=facts.gpu),
        check_config(facts.config_path, facts.config_exists, facts.config_error, facts.config_keys),
        check_home_mode(facts.home_path, facts.home_mode),
        check_key_mode(facts.key_path, facts.key_mode),
        check_disk(facts.store_path, facts.free_bytes),
        check_daemon(facts.daemon_running, facts.daemon_info),
        *(check_listen(f, daemon_running=facts.daemon_running, daemon_addrs=daemon_addrs) for f in facts.listen),
        *check_interfaces(facts.interfaces),
        check_clock(facts.clock),
        check_peer_clocks(facts.peer_clocks),
    ]


def exit_status(checks: Iterable[Check]) -> int:
    """0 if no check failed, else 1."""
    return 1 if any(c.status is Status.FAIL for c in checks) else 0


# -- gathering the real facts -------------------------------------------------------------------------------------
_TORCH_PROBE = """
import json, sys
try:
    import torch
except BaseException as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
    sys.exit(0)
out = {"version": str(torch.__version__), "cuda_version": torch.version.cuda}
try:
    out["cuda"] = bool(torch.cuda.is_available())
    out["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if out["cuda"] else []
except Exception:  # a broken driver: report no CUDA rather than no torch
    out["cuda"], out["devices"] = False, []
print(json.dumps(out))
"""


def probe_torch(python: str = sys.executable, *, timeout: float = TORCH_PROBE_TIMEOUT_S) -> TorchProbe:
    """Import torch in a fresh interpreter (as the Worker does) and ask it about CUDA."""
    try:
        proc = subprocess.run([python, "-c", _TORCH_PROBE], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return TorchProbe(error=f"`import torch` did not finish within {timeout:.0f} s")
    except OSError as exc:
        return TorchProbe(error=f"cannot start {python}: {exc.strerror or exc}")
    lines = proc.stdout.strip().splitlines()
    try:
        out = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return TorchProbe(error=f"the probe exited with {proc.returncode}: {tail[:300]}")
    if "error" in out:
        return TorchProbe(error=str(out["error"])[:300])
    return TorchProbe(version=out.get("version"), cuda=bool(out.get("cuda")), cuda_version=out.get("cuda_version"),
                      devices=tuple(out.get("devices") or ()))


def _installed(requirements: list[str] | None, use_packaging: bool) -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for req in requirements or []:
        parsed = parse_requirement(req, use_packaging=use_packaging)
        if parsed is None:
            continue
        try:
            versions[parsed[0]] = metadata.version(parsed[0])
        except metadata.PackageNotFoundError:
            versions[parsed[0]] = None
    return versions


def _requirements() -> list[str] | None:
    from importlib import metadata

    try:
        return list(metadata.requires("hivecell") or [])
    except metadata.PackageNotFoundError:
        return None


def _packaging_available() -> bool:
    try:
        import packaging.requirements  # noqa: F401
        import packaging.specifiers  # noqa: F401
    except ImportError:
        return False
    return True


def _free_bytes(path: Path) -> int | None:
    probe = path
    while not probe.exists() and probe != probe.parent:  # the store may not exist yet: ask its disk
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def try_bind(family: int, host: str, port: int, proto: str) -> tuple[int | None, str]:
    """Bind (and close) a socket as the daemon would; returns ``(errno, message)``, ``(None, "")`` if it bound.

    Binding sends nothing on the network.
    """
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    try:
        with socket.socket(family, kind) as sock:
            if proto == "tcp":  # as trio's listeners do, so a port in TIME_WAIT is not reported as taken
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
    except OSError as exc:
        return exc.errno or -1, exc.strerror or str(exc)
    return None, ""


def _listen_facts(addrs: Iterable[str],
                  bind: Callable[[int, str, int, str], tuple[int | None, str]]) -> list[ListenFact]:
    facts = []
    for addr in addrs:
        parsed = parse_listen(addr)
        if parsed is None or parsed[2] == 0:
            facts.append(ListenFact(addr))
            continue
        err, message = bind(*parsed)
        facts.append(ListenFact(addr, err, message))
    return facts


def _interfaces() -> list[Interface]:
    import psutil

    addrs = psutil.net_if_addrs()
    stats = psutil.net_if_stats()
    result = []
    for name in sorted(addrs):
        ipv4 = tuple(a.address for a in addrs[name] if a.family == socket.AF_INET)
        stat = stats.get(name)
        psutil_flags = getattr(stat, "flags", None) if stat is not None else None
        sysfs = None
        if psutil_flags is None:
            try:
                sysfs = Path(f"/sys/class/net/{name}/flags").read_text()
            except OSError:
                sysfs = None
        parsed = parse_flags(psutil_flags, sysfs)
        if parsed is None:
            up = bool(stat.isup) if stat is not None else False
            result.append(Interface(name, ipv4, up, name == "lo", None))
        else:
            result.append(Interface(name, ipv4, parsed[0], parsed[1], parsed[2]))
    return result


def _clock_sample(interval: float = 0.05) -> ClockSample:
    wall0, mono0 = time.time(), time.monotonic()
    time.sleep(interval)
    return ClockSample(wall0, mono0, time.time(), time.monotonic())


def _mode(path: Path) -> int | None:
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return None


def gather_facts(home: Home, *, listen: Iterable[str], config_path: Path, config_error: str | None,
                 config_keys: Iterable[str], torch_timeout: float = TORCH_PROBE_TIMEOUT_S, gpu: str = "auto") -> Facts:
    """Read this machine. Starts one subprocess (the torch probe) and binds the listen ports; sends no traffic."""
    use_packaging = _packaging_available()
    requirements = _requirements()
    running = home.daemon_running()
    return Facts(
        python=tuple(sys.version_info[:3]),
        requirements=requirements,
        installed=_installed(requirements, use_packaging),
        torch=probe_torch(timeout=torch_timeout),
        home_path=str(home.path),
        key_path=str(home.key_path),
        store_path=str(home.store_path),
        free_bytes=_free_bytes(home.store_path),
        listen=_listen_facts(listen, try_bind),
        daemon_running=running,
        daemon_info=home.daemon_info() if running else None,
        key_mode=_mode(home.key_path),
        home_mode=_mode(home.path),
        interfaces=_interfaces(),
        clock=_clock_sample(),
        config_path=str(config_path),
        config_exists=config_path.exists(),
        config_error=config_error,
        config_keys=tuple(config_keys),
        gpu=gpu,
        use_packaging=use_packaging,
        peer_clocks=peer_clocks_of(home.peers_info() or {}) if running else None,
    )


def print_table(checks: list[Check]) -> None:
    """The human report: a rich table, then a one-line summary."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    style = {Status.OK: "green", Status.WARN: "yellow", Status.FAIL: "bold red"}
    table = Table(show_lines=False, header_style="bold")
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("detail", overflow="fold")
    table.add_column("fix", overflow="fold")
    for c in checks:
        table.add_row(Text(c.name), Text(c.status.value, style=style[c.status]), Text(c.detail), Text(c.fix))
    # Piped into a log or a CI job, rich would assume 80 columns and fold every detail; give it room instead.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    console.print(table)
    counts = {s: sum(1 for c in checks if c.status is s) for s in Status}
    console.print(f"{counts[Status.OK]} ok, {counts[Status.WARN]} warn, {counts[Status.FAIL]} fail")
