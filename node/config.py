"""The daemon's configuration: ``$HIVECELL_HOME/config.toml``, environment variables and ``hivecell run`` flags.

Every option has one name in all three places: the TOML key ``worker_timeout`` is the flag ``--worker-timeout`` and
the environment variable ``HIVECELL_WORKER_TIMEOUT``. A value is taken from the first of

    flag  >  environment variable  >  config file  >  built-in default

that sets it. The file is flat (top-level keys only) and strict: an unknown key, a value of the wrong type or one out
of range is an error naming the file, the key and what was expected, so a typo never silently runs the defaults.

Only options the daemon has today are here. A config written for a later version therefore fails loudly here instead
of being half-applied.

This module is pure (no click, no trio, no libp2p) so that ``hivecell config show`` and ``hivecell doctor`` stay
cheap; the CLI turns ``OPTIONS`` into flags and the result into a ``DaemonConfig``.
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_FILE", "OPTIONS", "ConfigError", "ConfigParserMissing", "Option", "Setting", "Source", "config_path",
    "daemon_kwargs", "example_config", "load_file", "resolve", "validate_item", "validate_multiaddr",
]

CONFIG_FILE = "config.toml"


class ConfigError(Exception):
    """A config file that cannot be used: unreadable, not TOML, or with an unknown key or a bad value."""


class ConfigParserMissing(ConfigError):
    """A config file exists but this Python (3.10) has no TOML parser: ``tomli`` is not installed."""


class Source(str, Enum):
    """Where an effective value came from, strongest last."""

    DEFAULT = "default"
    FILE = "file"
    ENV = "env"
    FLAG = "flag"


@dataclass(frozen=True, kw_only=True)
class Option:
    """One daemon option: its TOML key, type, range, default and the ``DaemonConfig`` field it sets.

    ``kind`` is ``int``, ``float``, ``bool``, ``str`` (one of ``choices``) or ``list`` (of multiaddr strings, or of
    interface names or IPv4 addresses when ``item`` is ``"interface"``). ``default`` ``None`` means "not set": the daemon picks (for
    ``worker_threads``: torch's own choice; for ``mdns_interfaces``: every non-loopback interface).
    """

    key: str
    kind: type
    default: Any
    help: str
    field: str
    lo: float | None = None
    hi: float | None = None
    item: str = "multiaddr"  # for lists: "multiaddr", "peer" (a multiaddr ending in /p2p/<id>) or "interface"
    empty_ok: bool = False  # for lists: may be empty
    flag_name: str | None = None  # a repeatable flag named in the singular (--mdns-interface) for a plural key
    choices: tuple[str, ...] = ()  # for str: the values allowed

    @property
    def flag(self) -> str:
        return "--" + (self.flag_name or self.key.replace("_", "-"))

    @property
    def envvar(self) -> str:
        return "HIVECELL_" + self.key.upper()

    def expected(self) -> str:
        """What a valid value looks like, for error messages."""
        if self.kind is list and self.item == "interface":
            return "a list of interface names or IPv4 addresses, e.g. [\"eth0\"]"
        if self.kind is list:
            return "a list of multiaddr strings, e.g. [\"/ip4/0.0.0.0/tcp/4001\"]"
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return "one of " + ", ".join(f'"{c}"' for c in self.choices)
        what = "an integer" if self.kind is int else "a number"
        return f"{what} from {_num(self.lo)} to {_num(self.hi)}"


def _num(value: float | None) -> str:
    return str(int(value)) if value is not None and float(value).is_integer() else str(value)


# The same names, ranges and defaults as the `hivecell run` flags always had; the defaults equal DaemonConfig's (a
# test checks), kept here so that reading the config does not import the daemon (trio, libp2p).
OPTIONS: tuple[Option, ...] = (
    Option(key="listen", kind=list, default=("/ip4/127.0.0.1/tcp/0",), field="listen",
           help="Listen address (multiaddr), repeatable. Default /ip4/127.0.0.1/tcp/0 (loopback, any free port); "
                "use /ip4/0.0.0.0/tcp/4001 to serve a LAN."),
    Option(key="warm_workers", kind=int, default=1, lo=0, hi=8, field="warm_workers",
           help="Worker interpreters kept started (torch imported) so a job does not wait for one. "
                "Each serves one job and exits."),
    Option(key="worker_fork", kind=bool, default=True, field="worker_fork",
           help="Fork Workers from one interpreter that imported torch once (a zygote, kept while warm_workers > 0): "
                "milliseconds per Worker instead of seconds of CPU. Off: each Worker starts a fresh interpreter."),
    Option(key="max_jobs", kind=int, default=1, lo=1, hi=64, field="max_concurrent_jobs", help="Jobs run at once."),
    Option(key="worker_timeout", kind=float, default=3600.0, lo=1, hi=7 * 24 * 3600, field="worker_wall_s",
           help="Wall-time limit of one job, seconds; the Worker is killed after it."),
    Option(key="worker_memory_mb", kind=int, default=4096, lo=256, hi=1 << 20, field="worker_memory_mb",
           help="Memory limit of one Worker, MiB."),
    Option(key="worker_threads", kind=int, default=None, lo=1, hi=256, field="worker_threads",
           help="torch threads per Worker. Default: torch's own choice."),
    Option(key="max_queued_per_peer", kind=int, default=16, lo=1, hi=10_000, field="max_queued_per_peer",
           help="Jobs one scientist may have waiting; more are refused with 'busy'."),
    Option(key="max_attempts", kind=int, default=2, lo=1, hi=10, field="max_attempts",
           help="Runs of one job, counting re-runs after the daemon was killed mid-job; then it is failed."),
    Option(key="mdns", kind=bool, default=True, field="mdns",
           help="Find peers on the LAN with mDNS and announce this node there (on mdns_interfaces)."),
    Option(key="mdns_interfaces", kind=list, default=None, field="mdns_interfaces", item="interface",
           flag_name="mdns-interface",
           help="Interfaces (names or IPv4 addresses) mDNS runs on, repeatable. Default: every interface with an "
                "IPv4 address except loopback."),
    Option(key="bootstrap", kind=list, default=(), field="bootstrap", empty_ok=True, item="peer",
           help="Peer to dial at start and whenever not connected to it (/ip4/HOST/tcp/PORT/p2p/PEER_ID), "
                "repeatable: how a node finds a mesh beyond its LAN."),
    Option(key="index", kind=bool, default=True, field="index",
           help="Keep the gossip index of dataset adverts (in the store) and answer searches."),
    Option(key="advert_ttl", kind=float, default=3600.0, lo=60, hi=7 * 24 * 3600, field="advert_ttl",
           help="Lifetime of this node's dataset adverts, seconds; they are re-published every third of it, and a "
                "node that disappears drops out of searches once they expire."),
    Option(key="lane", kind=bool, default=True, field="lane",
           help="Serve a bulk lane (TLS 1.3 bound to the peer ids) for large weights and results; off: they go over "
                "libp2p streams, several times slower."),
    Option(key="lane_port", kind=int, default=0, lo=0, hi=65535, field="lane_port",
           help="TCP port of the bulk lane, on the host of the first listen address. Default 0: any free port."),
    Option(key="lane_threshold", kind=int, default=1 << 20, lo=0, hi=1 << 31, field="lane_threshold",
           help="Results larger than this many bytes go by reference over the bulk lane to a scientist that has "
                "one."),
    Option(key="gpu", kind=str, default="auto", field="gpu", choices=("auto", "on", "off"),
           help="Where the Worker trains: auto uses the first CUDA device torch sees (else the CPU); on requires one "
                "(jobs fail with a clear error without it); off trains on the CPU."),
)
_BY_KEY = {o.key: o for o in OPTIONS}


@dataclass(frozen=True)
class Setting:
    """The effective value of one option and where it came from."""

    option: Option
    value: Any
    source: Source


def config_path(home: Path) -> Path:
    return Path(home) / CONFIG_FILE


def validate_multiaddr(value: str) -> str:
    """Return ``value`` if it parses as a multiaddr.

    Raises:
        ValueError: it does not; the message says why.
    """
    import multiaddr  # a dependency of py-libp2p; imported here so that importing this module stays cheap

    if not value.startswith("/"):
        raise ValueError(f"{value!r} is not a multiaddr (they start with '/', e.g. /ip4/0.0.0.0/tcp/4001)")
    try:
        multiaddr.Multiaddr(value)
    except Exception as exc:  # multiaddr raises several unrelated types for bad input
        raise ValueError(f"{value!r} is not a valid multiaddr: {exc}") from None
    return value


_INTERFACE = re.compile(r"^[A-Za-z0-9_.:@-]{1,32}$")


def validate_item(option: Option, value: str) -> str:
    """Check one item of a list option: a multiaddr, or an interface name / IPv4 address.

    Raises:
        ValueError: the message says why.
    """
    if option.item == "interface":
        if not _INTERFACE.match(value):
            raise ValueError(f"{value!r} is not an interface name or an IPv4 address")
        return value
    validate_multiaddr(value)
    if option.item == "peer" and "/p2p/" not in value:
        raise ValueError(f"{value!r} names no peer: a bootstrap address ends in /p2p/<peer id>")
    return value


def _toml_load(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python 3.10 only
        try:
            import tomli as tomllib
        except ImportError:
            # A file of comments only (the example `hivecell init` writes) is an empty config: no parser needed.
            if _only_comments(path):
                return {}
            raise ConfigParserMissing(
                f"{path}: reading the config file needs a TOML parser, which Python 3.10 lacks; "
                f"install one with: pip install tomli (or remove the file to run with defaults)") from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: the file is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None


def _only_comments(path: Path) -> bool:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return all(not line.strip() or line.lstrip().startswith("#") for line in text.splitlines())


def load_file(path: Path) -> dict[str, Any]:
    """Read and check a config file. A missing file is an empty config.

    Returns:
        The keys set in the file, with values of the option's type (a ``worker_timeout = 60`` becomes ``60.0``).

    Raises:
        ConfigError: the file cannot be read, is not TOML, or has an unknown key or a bad value.
        ConfigParserMissing: the file sets something and this is Python 3.10 without ``tomli`` (a file of comments
            only, like the example ``hivecell init`` writes, reads as empty without a parser).
    """
    path = Path(path)
    if not path.exists():
        return {}
    return check_values(_toml_load(path), origin=str(path))


def check_values(raw: Mapping[str, Any], *, origin: str) -> dict[str, Any]:
    """Check parsed TOML against ``OPTIONS``; ``origin`` (the file name) starts every error message.

    Raises:
        ConfigError: an unknown key or a bad value.
    """
    values: dict[str, Any] = {}
    for key, value in raw.items():
        option = _BY_KEY.get(key)
        if option is None:
            close = difflib.get_close_matches(key, _BY_KEY, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(_BY_KEY)}"
            raise ConfigError(f"{origin}: unknown key {key!r}{hint}")
        values[key] = _check_value(option, value, origin)
    return values


def _check_value(option: Option, value: Any, origin: str) -> Any:
    def bad(why: str = "") -> ConfigError:
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        return ConfigError(f"{origin}: {option.key} must be {option.expected()}, got {shown}{why}")

    if option.kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad()
        if not value and not option.empty_ok:
            raise bad(" (an empty list)")
        for item in value:
            try:
                validate_item(option, item)
            except ValueError as exc:
                raise ConfigError(f"{origin}: {option.key}: {exc}") from None
        return tuple(value)
    if option.kind is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if option.kind is str:
        if not isinstance(value, str) or value not in option.choices:
            raise bad()
        return value
    # bool is an int in Python, and TOML's `true` must not pass for 1.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad()
    if option.kind is int and not isinstance(value, int):
        raise bad()
    if not math.isfinite(value) or not (option.lo <= value <= option.hi):  # type: ignore[operator]
        raise bad()
    return option.kind(value)


def resolve(given: Mapping[str, tuple[Any, Source]], file_values: Mapping[str, Any]) -> list[Setting]:
    """The effective configuration, in ``OPTIONS`` order.

    Args:
        given: values set by a flag or an environment variable (already parsed and range-checked by the CLI), as
            ``key -> (value, Source.FLAG | Source.ENV)``.
        file_values: what ``load_file`` returned.
    """
    unknown = (set(given) | set(file_values)) - set(_BY_KEY)
    if unknown:
        raise KeyError(f"not daemon options: {sorted(unknown)}")
    settings = []
    for option in OPTIONS:
        if option.key in given:
            value, source = given[option.key]
            if option.kind is list:
                value = tuple(value)
        elif option.key in file_values:
            value, source = file_values[option.key], Source.FILE
        else:
            value, source = option.default, Source.DEFAULT
        settings.append(Setting(option, value, source))
    return settings


def daemon_kwargs(settings: list[Setting]) -> dict[str, Any]:
    """Keyword arguments for ``DaemonConfig`` from the effective settings."""
    kwargs = {s.option.field: s.value for s in settings}
    for s in settings:
        if s.option.kind is list and s.value is not None:
            kwargs[s.option.field] = list(s.value)
    return kwargs


def example_config() -> str:
    """A config file with every option commented out: written by ``hivecell init``, it changes nothing."""
    lines = [
        "# Hivecell node configuration. Uncomment a line to change the option.",
        "# Precedence: `hivecell run` flag > environment variable > this file > default.",
        "# See the effective values and where they come from with: hivecell config show",
        "#",
        "# Unknown keys are an error.",
    ]
    for option in OPTIONS:
        lines.append("")
        lines.extend(f"# {part}" for part in _wrap(option.help))
        lines.append(f"# Also: {option.flag}, ${option.envvar}.")
        if option.kind is list and option.default is None:
            lines.append(f"# {option.key} = [\"eth0\"]")
        elif option.kind is list:
            lines.append(f"# {option.key} = [{', '.join(_toml_str(v) for v in option.default)}]")
        elif option.kind is bool:
            lines.append(f"# {option.key} = {'true' if option.default else 'false'}")
        elif option.kind is str:
            lines.append(f"# {option.key} = {_toml_str(option.default)}")
        elif option.default is None:
            lines.append(f"# {option.key} = 4")
        else:
            lines.append(f"# {option.key} = {option.default!r}")
    return "\n".join(lines) + "\n"


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _wrap(text: str, width: int = 110) -> list[str]:
    out: list[str] = []
    line = ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        out.append(line)
    return out
