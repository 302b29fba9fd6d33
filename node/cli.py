"""``hivecell``: the command line of a Hivecell node.

Human output by default, ``--json`` for scripts on every listing; failures exit with a named code (see ``ExitCode``).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import signal
import sys
import time
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path
from typing import Any

import click


from .config import (
    OPTIONS, ConfigError, ConfigParserMissing, Setting, Source, config_path, daemon_kwargs, example_config, load_file,
    resolve, validate_multiaddr,
)
from hivecell.mesh.errors import MdnsError, leaves

from .home import Home, default_home

__all__ = ["main", "ExitCode"]


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # something unexpected; the message says what
    USAGE = 2  # bad command line (click's own code)
    NOT_FOUND = 3  # no such dataset, job, file or home
    CONFLICT = 4  # exists already, or not in a state that allows this
    NOT_RUNNING = 5  # no daemon runs for this home
    BAD_INPUT = 6  # a file or value that cannot be used
    JOB_FAILED = 7  # a job failed or its result was withheld
    UNVERIFIED = 8  # a result whose sign-off did not verify
    UNREACHABLE = 9  # a peer could not be reached


EXIT_CODES_HELP = "Exit codes: " + ", ".join(f"{c.value} {c.name.lower()}" for c in ExitCode)


class CliError(click.ClickException):
    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.exit_code = int(code)


def jsonable(value: Any) -> Any:
    """JSON has no infinity and no bytes: infinity becomes null, bytes their length."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": len(value)}
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def emit_json(value: Any) -> None:
    click.echo(json.dumps(jsonable(value), indent=2, sort_keys=True))


def _setup_logging(verbose: int, *, default: int = logging.WARNING) -> None:
    level = default if verbose == 0 else (logging.INFO if verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # py-libp2p logs routine stream closes at WARNING/ERROR; keep them out of the operator's way unless debugging.
    logging.getLogger("libp2p").setLevel(logging.DEBUG if verbose >= 2 else logging.CRITICAL)
    # dp-accounting warns (through absl) about RDP orders it skips; the epsilon it returns is still an upper bound.
    logging.getLogger("absl").setLevel(logging.DEBUG if verbose >= 2 else logging.ERROR)


class _Cli(click.Group):
    """Maps the errors an operator can fix to a message and a named exit code instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from hivecell.crypto.identity import IdentityError

        from .store import StoreError

        try:
            return super().invoke(ctx)
        except ConfigParserMissing as exc:
            raise CliError(str(exc), ExitCode.FAILURE) from exc
        except ConfigError as exc:
            raise CliError(str(exc), ExitCode.BAD_INPUT) from exc
        except IdentityError as exc:
            raise CliError(str(exc), ExitCode.BAD_INPUT) from exc
        except StoreError as exc:
            raise CliError(f"store: {exc}", ExitCode.FAILURE) from exc
        except PermissionError as exc:
            raise CliError(f"permission denied: {exc.filename or exc}", ExitCode.FAILURE) from exc


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.option("--home", "home_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Node home (key, store). Default: $HIVECELL_HOME, else ~/.hivecell.")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="hivecell")
@click.pass_context
def cli(ctx: click.Context, home_dir: Path | None, verbose: int) -> None:
    """Hivecell Mesh: federated learning on a peer-to-peer mesh of edge boxes.

    A node keeps private datasets, runs training jobs sent by data scientists in a sandboxed Worker, and releases
    results only with the data owner's signed sign-off. Start with `hivecell demo`.
    """
    ctx.ensure_object(dict)
    ctx.obj["home"] = Home((home_dir or default_home()).expanduser())
    ctx.obj["verbose"] = verbose
    if ctx.invoked_subcommand != "run":
        _setup_logging(verbose)


def _home(ctx: click.Context) -> Home:
    return ctx.obj["home"]


def _store(ctx: click.Context):
    from .store import Store, StoreError

    home = _home(ctx)
    if not home.is_initialized():
        raise CliError(f"{home.path} is not a node home; run: hivecell --home {home.path} init", ExitCode.NOT_FOUND)
    try:
        return Store.open(home.store_path)
    except StoreError as exc:
        raise CliError(str(exc), ExitCode.FAILURE) from exc


# -- init / run / status ------------------------------------------------------------------------------------------
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def init(ctx: click.Context, as_json: bool) -> None:
    """Create the node home: an Ed25519 node key (mode 0600), an empty store and, if there is none, an example
    config.toml with every option commented out. Safe to run twice."""
    home = _home(ctx)
    identity, created = home.init()
    _store(ctx).close()
    config_file = config_path(home.path)
    try:  # "x": never overwrite an operator's file, even one written between a check and the write
        with open(config_file, "x", encoding="utf-8") as f:
            f.write(example_config())
        config_created = True
    except FileExistsError:
        config_created = False
    if as_json:
        emit_json({"home": str(home.path), "peer_id": identity.peer_id, "created": created,
                   "config": str(config_file), "config_created": config_created})
    else:
        click.echo(f"{'created' if created else 'already initialised'}: {home.path}")
        click.echo(f"peer id: {identity.peer_id}")
        if config_created:
            click.echo(f"example config (all commented out): {config_file}")


class _Multiaddr(click.ParamType):
    """A multiaddr string; in an environment variable, several are separated by commas."""

    name = "multiaddr"
    envvar_list_splitter = ","

    def split_envvar_value(self, rv: str) -> list[str]:
        return [part.strip() for part in (rv or "").split(",") if part.strip()]

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return validate_multiaddr(str(value).strip())
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class _Peer(_Multiaddr):
    """A multiaddr that ends in /p2p/<peer id>."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from .config import validate_item

        try:
            return validate_item(_BY_KEY["bootstrap"], str(value).strip())
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class _Interface(_Multiaddr):
    """An interface name or IPv4 address; in an environment variable, several are separated by commas."""

    name = "interface"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from .config import validate_item

        try:
            return validate_item(_BY_KEY["mdns_interfaces"], str(value).strip())
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


_BY_KEY = {o.key: o for o in OPTIONS}


def _daemon_options(command: Any) -> Any:
    """The daemon's options (config.OPTIONS) as flags, each with its environment variable.

    The flags default to ``None`` so that the config file can fill what neither a flag nor the environment set; the
    help text states the built-in default. A list option's flag is singular (``--mdns-interface eth0``, repeatable).
    """
    for option in reversed(OPTIONS):
        kwargs: dict[str, Any] = {"envvar": option.envvar, "show_envvar": True, "default": None}
        if option.kind is bool:
            name = option.flag[2:]
            default = f" Default: {'on' if option.default else 'off'}."
            command = click.option(f"--{name}/--no-{name}", option.key, help=option.help + default,
                                   **kwargs)(command)
            continue
        if option.kind is list:
            interface = option.item == "interface"
            kwargs.update(multiple=True,
                          type=_Interface() if interface else _Peer() if option.item == "peer" else _Multiaddr(),
                          metavar="IFACE" if interface else "MULTIADDR",
                          help=option.help + " In the environment: comma-separated.")

        elif option.kind is str:
            kwargs.update(type=click.Choice(option.choices), help=option.help + f" Default: {option.default}.")
        else:
            range_type = click.IntRange if option.kind is int else click.FloatRange
            default = "" if option.default is None else f" Default: {option.default}."
            kwargs.update(type=range_type(option.lo, option.hi), help=option.help + default)
        command = click.option(option.flag, option.key, **kwargs)(command)
    return command


def _effective(ctx: click.Context, params: dict[str, Any], *,
               file_values: dict[str, Any] | None = None) -> list[Setting]:
    """The effective daemon settings: flags and environment variables (as click saw them) over the config file.

    Raises:
        ConfigError: the config file cannot be used (when ``file_values`` is not given).
    """
    from click.core import ParameterSource

    given = {}
    for option in OPTIONS:
        source = ctx.get_parameter_source(option.key)
        value = params[option.key]
        # An empty HIVECELL_LISTEN (or one of only commas) sets nothing, as click treats an empty variable.
        if source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT) and value not in (None, ()):
            given[option.key] = (value, Source.FLAG if source is ParameterSource.COMMANDLINE else Source.ENV)
    if file_values is None:
        file_values = load_file(config_path(_home(ctx).path))
    return resolve(given, file_values)


@cli.command()
@_daemon_options
@click.pass_context
def run(ctx: click.Context, **params: Any) -> None:
    """Run the node daemon in the foreground (Ctrl-C or SIGTERM stops it).

    Each option is taken from its flag, else its environment variable, else $HIVECELL_HOME/config.toml, else its
    default; `hivecell config show` prints the result.
    """
    with _bulk_imports():
        import trio

        from .daemon import DaemonConfig, serve_daemon

    _setup_logging(ctx.obj["verbose"], default=logging.INFO)
    from .home import DaemonRunning

    home = _home(ctx)
    settings = _effective(ctx, params)
    config = DaemonConfig(**daemon_kwargs(settings))
    logging.getLogger(__name__).info(
        "config: %s", ", ".join(f"{s.option.key}={s.value!r} ({s.source.value})" for s in settings))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        logging.getLogger(__name__).info("signal %d: stopping", signum)
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(stop_on_signal)
            addrs = await nursery.start(serve_daemon, home, config)
            for addr in addrs:
                click.echo(f"listening on {addr}")
            sys.stdout.flush()

    if home.daemon_running():
        raise CliError(f"a daemon already runs for {home.path} (see: hivecell status)", ExitCode.CONFLICT)
    try:
        trio.run(main)
    except Exception as exc:  # trio wraps errors in exception groups; map the ones an operator can act on
        for leaf in leaves(exc):
            if isinstance(leaf, DaemonRunning):
                raise CliError(str(leaf), ExitCode.CONFLICT) from exc
            if isinstance(leaf, MdnsError):
                raise CliError(f"mDNS: {leaf} (see --mdns-interface, or --no-mdns)", ExitCode.BAD_INPUT) from exc
            if isinstance(leaf, OSError):
                raise CliError(f"cannot start the daemon: {leaf}", ExitCode.FAILURE) from exc
        raise


@contextmanager
def _bulk_imports() -> Any:
    """Import the heavy modules (py-libp2p alone: about 1.2 s here, and a few hundred thousand objects) with the
    cyclic garbage collector off, then freeze what they made. Otherwise the collector walks those objects again and
    again while they load (0.15 s of a daemon's start on this box) and in every full collection afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.freeze()
            gc.enable()


def _join_options(command: Any) -> Any:
    """How a command that is not the daemon finds the mesh (search, peers)."""
    command = click.option("--mdns-interface", "mdns_interfaces", multiple=True, type=_Interface(),
                           metavar="IFACE", help="Browse mDNS on this interface (name or IPv4 address), repeatable. "
                                                 "Default: every non-loopback interface. Nothing is announced.")(command)
    command = click.option("--mdns/--no-mdns", default=True, show_default=True, envvar="HIVECELL_MDNS",
                           show_envvar=True, help="Look for peers on the LAN with mDNS.")(command)
    command = click.option("--bootstrap", multiple=True, type=_Peer(), metavar="MULTIADDR",
                           help="A peer to dial (/ip4/HOST/tcp/PORT/p2p/PEER_ID), repeatable; with no daemon in "
                                "this home and no mDNS, the only way in.")(command)
    command = click.option("--timeout", type=click.FloatRange(0.1, 3600), default=5.0, show_default=True,
                           help="Seconds to look for peers and answers.")(command)
    return command


def _client_identity(ctx: click.Context) -> Any:
    """A fresh key for looking around (search, peers, finding nodes): the home's key is the node's own when a daemon
    runs here, and a host cannot dial a peer with its own id."""
    return None


def _with_daemon_bootstrap(ctx: click.Context, bootstrap: tuple[str, ...]) -> list[str]:
    """The given bootstrap addresses, plus this home's running daemon (a scientist on a node box gets in at once)."""
    info = _home(ctx).daemon_info() if _home(ctx).daemon_running() else None
    return list(bootstrap) + ([a for a in info.get("addrs", []) if "/ip4/0.0.0.0/" not in a][:1] if info else [])


def _advert_view(info: Any) -> dict[str, Any]:
    return {"name": info.name, "node": info.node, "owner": info.owner, "tags": info.tags,
            "description": info.description, "schema": info.schema, "signoff": info.signoff, "addrs": info.addrs,
            "budget": info.budget, "issued_at": info.issued_at, "expires_at": info.expires_at}


@cli.command()
@click.argument("words", nargs=-1)
@click.option("--tag", "tags", multiple=True, help="Only datasets with this tag, repeatable (all must match).")
@click.option("--field", "fields", multiple=True,
              help="Only datasets whose schema has this key or feature name, repeatable.")
@click.option("--expect", type=click.IntRange(1, 10_000), default=None,
              help="Stop as soon as this many datasets are found (else: when answers stop bringing new ones).")
@click.option("--limit", type=click.IntRange(1, 500), default=100, show_default=True, help="Most results.")
@_join_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list of verified adverts).")
@click.pass_context
def search(ctx: click.Context, words: tuple[str, ...], tags: tuple[str, ...], fields: tuple[str, ...],
           expect: int | None, limit: int, timeout: float, bootstrap: tuple[str, ...], mdns: bool,
           mdns_interfaces: tuple[str, ...], as_json: bool) -> None:
    """Find datasets on the mesh whose name, description or tags contain every WORD.

    Joins the mesh with no configuration (mDNS on the LAN, plus --bootstrap peers and this home's own daemon if it
    runs), asks the index peers it finds, and verifies every advert's signature before showing it. Exit code 3 if
    nothing was found.
    """
    with _bulk_imports():
        import trio

        from .client import Client

    async def main() -> list[Any]:
        async with Client.join(identity=_client_identity(ctx), bootstrap=_with_daemon_bootstrap(ctx, bootstrap),
                               mdns=mdns, mdns_interfaces=list(mdns_interfaces) or None) as client:
            return await client.search(list(words), tags=list(tags), fields=list(fields), timeout=timeout,
                                       expect=expect, limit=limit)

    try:
        found = trio.run(main)
    except Exception as exc:
        for leaf in leaves(exc):
            if isinstance(leaf, MdnsError):
                raise CliError(f"mDNS: {leaf} (see --mdns-interface, or --no-mdns)", ExitCode.BAD_INPUT) from exc
        raise
    if as_json:
        emit_json([_advert_view(i) for i in found])
    elif not found:
        click.echo(f"no dataset found within {timeout:g} s", err=True)
    else:
        for info in found:
            samples = info.schema.get("num_samples", "?")
            click.echo(f"{info.name:<24} {samples:>7} samples  node {info.node[-8:]}  tags {','.join(info.tags)}"
                       f"  {info.address or '(no address)'}")
    if not found:
        ctx.exit(int(ExitCode.NOT_FOUND))


@cli.command()
@_join_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def peers(ctx: click.Context, timeout: float, bootstrap: tuple[str, ...], mdns: bool,
          mdns_interfaces: tuple[str, ...], as_json: bool) -> None:
    """List known peers and how they were found (mdns, bootstrap, inbound).

    With a daemon running in this home: what the daemon knows (and its index's counters). Otherwise: look for
    --timeout seconds, as `hivecell search` does, and list what was found.
    """
    home = _home(ctx)
    info = home.peers_info() if home.daemon_running() else None
    if info is None:
        with _bulk_imports():
            import trio

            from .client import Client

        async def main() -> list[dict[str, Any]]:
            async with Client.join(identity=_client_identity(ctx), bootstrap=list(bootstrap), mdns=mdns,
                                   mdns_interfaces=list(mdns_interfaces) or None) as client:
                await trio.sleep(timeout)
                return client.peers()

        try:
            info = {"peers": trio.run(main), "daemon": False}
        except Exception as exc:
            for leaf in leaves(exc):
                if isinstance(leaf, MdnsError):
                    raise CliError(f"mDNS: {leaf}", ExitCode.BAD_INPUT) from exc
            raise
    else:
        info = dict(info, daemon=True)
    if as_json:
        emit_json(info)
        return
    rows = info.get("peers", [])
    if not rows:
        click.echo("no peers known")
    for row in rows:
        state = "connected" if row.get("connected") else "seen"
        click.echo(f"{row['peer_id']}  {state:<9}  found by {','.join(row.get('found_by', [])) or '?'}"
                   + (f"  clock {row['clock_offset_s']:+.2f} s" if "clock_offset_s" in row else "")
                   + (f"  {row['addrs'][0]}" if row.get("addrs") else ""))
    index = info.get("index")
    if index:
        counters = index.get("counters", {})
        dropped = {k: v for k, v in counters.items() if k not in ("new", "known", "swept") and v}
        click.echo(f"index: {'on' if index.get('role') else 'off'}, {index.get('adverts', 0)} adverts, "
                   f"digest {str(index.get('digest', ''))[:16]}"
                   + (f"; dropped: {', '.join(f'{k} {v}' for k, v in sorted(dropped.items()))}" if dropped else ""))
    lane = info.get("lane")
    if lane:
        stats = lane.get("stats", {})
        ways = (f"{stats.get('lane_served', 0)} served and {stats.get('lane_fetched', 0)} fetched on the lane, "
                f"{stats.get('stream_served', 0)} and {stats.get('stream_fetched', 0)} on libp2p streams")
        fallbacks = stats.get("fallbacks", 0)
        click.echo((f"bulk lane: on, port {lane.get('port')}" if lane.get("enabled") else
                    "bulk lane: off (large blobs go over libp2p streams)") + f"; {ways}"
                   + (f"; {fallbacks} fell back to a stream (see the log)" if fallbacks else ""))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Say whether this home's daemon runs, and where (exit 5 if it does not)."""
    info = _home(ctx).daemon_info()
    if as_json:
        emit_json({"running": info is not None, **(info or {})})
    elif info:
        click.echo(f"running (pid {info['pid']}), peer id {info['peer_id']}")
        for addr in info["addrs"]:
            click.echo(f"  {addr}")
    if info is None:
        if not as_json:
            click.echo("not running")
        ctx.exit(ExitCode.NOT_RUNNING)


# -- config / doctor ----------------------------------------------------------------------------------------------
@cli.group()
def config() -> None:
    """The daemon's configuration: $HIVECELL_HOME/config.toml, HIVECELL_* environment variables and `run` flags."""


@config.command("show")
@_daemon_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def config_show(ctx: click.Context, as_json: bool, **params: Any) -> None:
    """Print the configuration `hivecell run` would use and where each value comes from (flag, env, file, default).

    Takes the same options as `hivecell run`, to see what a command line would change.
    """
    path = config_path(_home(ctx).path)
    settings = _effective(ctx, params)
    if as_json:
        emit_json({
            "file": str(path), "file_exists": path.exists(),
            "options": {s.option.key: {"value": s.value, "source": s.source.value, "flag": s.option.flag,
                                       "env": s.option.envvar} for s in settings},
        })
        return
    click.echo(f"config file: {path}{'' if path.exists() else ' (none)'}")
    for s in settings:
        value = "auto" if s.value is None else (",".join(s.value) if isinstance(s.value, tuple) else s.value)
        click.echo(f"  {s.option.key:<20} {str(value):<32} {s.source.value:<8} ({s.option.flag}, ${s.option.envvar})")


@cli.command()
@_daemon_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of checks.")
@click.option("--torch-timeout", type=click.FloatRange(1, 3600), default=180.0, show_default=True,
              help="Seconds to wait for `import torch` in the probe interpreter.")
@click.pass_context
def doctor(ctx: click.Context, as_json: bool, torch_timeout: float, **params: Any) -> None:
    """Check this box before it joins: Python and packages, torch and CUDA, config, key and home modes, free disk,
    listen ports, network interfaces and the clock. Prints what to fix; exit 1 if any check fails.

    Takes the same options as `hivecell run` and checks the listen addresses that `run` would use. Sends no network
    traffic and does not import torch into this process (a fresh interpreter probes it, as the Worker would).
    """
    from .doctor import evaluate, exit_status, gather_facts, print_table

    home = _home(ctx)
    path = config_path(home.path)
    try:
        file_values = load_file(path)
        error = None
    except ConfigError as exc:  # a broken config is one failed check, not the end of the report
        file_values, error = {}, str(exc)
    settings = _effective(ctx, params, file_values=file_values)
    value = {s.option.key: s.value for s in settings}
    facts = gather_facts(home, listen=value["listen"], config_path=path, config_error=error,
                         config_keys=sorted(file_values), torch_timeout=torch_timeout, gpu=value["gpu"])
    checks = evaluate(facts)
    if as_json:
        emit_json([c.to_dict() for c in checks])
    else:
        print_table(checks)
    ctx.exit(exit_status(checks))


# -- datasets -----------------------------------------------------------------------------------------------------
@cli.group()
def dataset() -> None:
    """Register, list and remove this node's private datasets."""


@dataset.command("add")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--label-column", default="label", show_default=True, help="CSV: the column holding the labels.")
@click.option("--features-key", default=None, help="NPZ: array of features (default: features, x, X, data).")
@click.option("--labels-key", default=None, help="NPZ: array of labels (default: labels, y, Y, target).")
@click.option("--tag", "tags", multiple=True, help="A search tag, repeatable (e.g. --tag digits --tag images).")
@click.option("--description", default="", help="What the data is, for scientists.")
@click.option("--signoff", type=click.Choice(["auto", "manual"]), default="manual", show_default=True,
              help="manual: each result waits for `hivecell jobs approve`; auto: the node signs off results itself "
                   "(until the privacy budget exists, auto releases trained weights with no formal privacy bound).")
@click.option("--budget", "budget_eps", type=click.FloatRange(0, 1e6), default=None,
              help="Total epsilon for this dataset (DP jobs only); see `hivecell budget`.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def dataset_add(ctx: click.Context, name: str, file: Path, label_column: str, features_key: str | None,
                labels_key: str | None, tags: tuple[str, ...], description: str, signoff: str,
                budget_eps: float | None, as_json: bool) -> None:
    """Register FILE (.npz with features + labels, or .csv with a header) as dataset NAME."""
    from .dataset import DatasetError, encode_tensors, load_file, make_record, summary
    from .store import StoreError

    with _store(ctx) as store:
        try:
            x, y, names = load_file(file, label_column=label_column, features_key=features_key,
                                    labels_key=labels_key)
            record = make_record(name=name, features=x, labels=y, feature_names=names, description=description,
                                 tags=list(tags), signoff=signoff, owner=_home(ctx).identity().peer_id)
        except DatasetError as exc:
            raise CliError(str(exc), ExitCode.BAD_INPUT) from exc
        try:
            store.add_dataset(record, encode_tensors(x, y))
        except StoreError as exc:
            raise CliError(str(exc), ExitCode.CONFLICT) from exc
        if budget_eps is not None:
            _set_budget(ctx, store, name, budget_eps)
    if as_json:
        emit_json(summary(record))
    else:
        s = record["schema"]
        click.echo(f"added {name}: {s['num_samples']} samples of shape {s['feature_shape']}, {s['task']}"
                   + (f", {s['num_classes']} classes" if "num_classes" in s else "")
                   + f", sign-off {signoff}")


@dataset.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def dataset_list(ctx: click.Context, as_json: bool) -> None:
    """List this node's datasets."""
    from .dataset import summary

    with _store(ctx) as store:
        records = [summary(r) for r in store.list_datasets()]
    if as_json:
        emit_json(records)
        return
    if not records:
        click.echo("no datasets; add one with: hivecell dataset add NAME FILE")
    for r in records:
        s = r["schema"]
        click.echo(f"{r['name']:<24} {s['num_samples']:>8} samples  {s['task']:<14} sign-off {r['signoff']:<6}"
                   f"  tags: {', '.join(r['tags']) or '-'}")


@dataset.command("remove")
@click.argument("name")
@click.pass_context
def dataset_remove(ctx: click.Context, name: str) -> None:
    """Remove dataset NAME and its data from this node."""
    from .store import StoreError

    with _store(ctx) as store:
        try:
            store.remove_dataset(name)
        except StoreError as exc:
            raise CliError(str(exc), ExitCode.NOT_FOUND) from exc
    click.echo(f"removed {name}")


# -- privacy budget -----------------------------------------------------------------------------------------------
@cli.group()
def budget() -> None:
    """Set, show and verify the epsilon budgets of this node's datasets (the signed, hash-chained ledger)."""


class _Limit(click.ParamType):
    """An epsilon limit, or ``none`` to remove it."""

    name = "EPS|none"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.strip().lower() == "none":
            return _CLEAR
        try:
            eps = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not an epsilon (a number >= 0) or 'none'", param, ctx)
        if not (0 <= eps <= 1e6):
            self.fail(f"{value!r}: an epsilon limit is between 0 and 1e6", param, ctx)
        return eps


class _ScientistLimit(click.ParamType):
    """``PEER_ID=EPS`` (a named scientist's limit) or ``PEER_ID=none`` (back to the default)."""

    name = "PEER=EPS|none"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from hivecell.crypto.identity import public_key_from_peer_id

        peer, sep, eps = str(value).partition("=")
        if not sep:
            self.fail(f"{value!r}: expected PEER_ID=EPS", param, ctx)
        try:
            public_key_from_peer_id(peer.strip())
        except ValueError:
            self.fail(f"{peer!r} is not a peer id (12D3KooW...)", param, ctx)
        return peer.strip(), _Limit().convert(eps, param, ctx)


_CLEAR = object()


def _set_budget(ctx: click.Context, store: Any, dataset_name: str, epsilon: float | None, *,
                allow_non_dp: bool | None = None, per_job: Any = None, per_scientist: Any = None,
                scientists: tuple[tuple[str, Any], ...] = ()) -> Any:
    """Write a ``budget`` entry: the dataset's whole policy, where what is not given keeps its current value."""
    from .ledger import LedgerError

    if store.get_dataset(dataset_name) is None:
        raise CliError(f"no dataset named {dataset_name!r}", ExitCode.NOT_FOUND)
    current = store.ledger_state().datasets.get(dataset_name)
    if epsilon is None:
        if current is None or current.total is None:
            raise CliError(f"{dataset_name} has no budget yet: give its total epsilon", ExitCode.BAD_INPUT)
        epsilon = current.total
    keep = current.to_dict() if current is not None and current.total is not None else {
        "allow_non_dp": False, "per_job": None, "per_scientist": None, "scientists": {}}

    def pick(value: Any, key: str) -> Any:
        return keep[key] if value is None else (None if value is _CLEAR else value)

    named = dict(keep["scientists"])
    for peer, limit in scientists:
        if limit is _CLEAR:
            named.pop(peer, None)
        else:
            named[peer] = limit
    entry = {"kind": "budget", "dataset": dataset_name, "epsilon": float(epsilon),
             "allow_non_dp": keep["allow_non_dp"] if allow_non_dp is None else allow_non_dp,
             "per_job": pick(per_job, "per_job"), "per_scientist": pick(per_scientist, "per_scientist"),
             "scientists": named}
    try:
        return store.append_ledger(_home(ctx).identity(), [entry])
    except LedgerError as exc:
        raise CliError(str(exc), ExitCode.BAD_INPUT) from exc


def _policy_line(name: str, b: Any) -> str:
    out = (f"{name}: budget {b.total:g}, spent {b.spent:.4g}, reserved {b.reserved:.4g}, left {b.left:.4g}"
           + (", jobs without DP allowed" if b.allow_non_dp else ", DP jobs only"))
    if b.per_job is not None:
        out += f", at most {b.per_job:g} per job"
    if b.per_scientist is not None:
        out += f", at most {b.per_scientist:g} per scientist"
    for peer, limit in sorted(b.scientists.items()):
        out += f", {peer[-8:]}: {limit:g}"
    return out


@budget.command("set")
@click.argument("dataset_name", metavar="DATASET")
@click.argument("epsilon", type=click.FloatRange(0, 1e6), required=False)
@click.option("--allow-non-dp/--dp-only", default=None,
              help="Also accept jobs without differential privacy (their results have no privacy bound), or not. "
                   "New budgets are DP only.")
@click.option("--per-job", type=_Limit(), default=None, help="The most epsilon one job may spend ('none': no cap).")
@click.option("--per-scientist", type=_Limit(), default=None,
              help="The most epsilon one scientist (peer id) may spend in all ('none': no limit).")
@click.option("--scientist", "scientists", type=_ScientistLimit(), multiple=True,
              help="A named scientist's own limit, over --per-scientist: PEER_ID=EPS, or PEER_ID=none. Repeatable.")
@click.pass_context
def budget_set(ctx: click.Context, dataset_name: str, epsilon: float | None, allow_non_dp: bool | None,
               per_job: Any, per_scientist: Any, scientists: tuple[tuple[str, Any], ...]) -> None:
    """Set DATASET's privacy budget: its total EPSILON and optional limits per job and per scientist.

    Options not given keep their current values (EPSILON too, once a budget exists). A job whose epsilon does not fit
    every limit is refused before it runs. Lowering a budget below what is spent refuses new jobs; it never rewrites
    what was spent.
    """
    with _store(ctx) as store:
        state = _set_budget(ctx, store, dataset_name, epsilon, allow_non_dp=allow_non_dp, per_job=per_job,
                            per_scientist=per_scientist, scientists=scientists)
    click.echo(_policy_line(dataset_name, state.budget(dataset_name)))


@budget.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def budget_show(ctx: click.Context, as_json: bool) -> None:
    """Budgets, spent, reserved and left per dataset."""
    with _store(ctx) as store:
        state = store.ledger_state()
        names = sorted({d["name"] for d in store.list_datasets()} | set(state.datasets))
    rows = {name: state.budget(name).to_dict() for name in names}
    if as_json:
        emit_json({"entries": state.seq, "head": state.head, "datasets": rows})
        return
    for name, b in rows.items():
        total = "none (no limit)" if b["total"] is None else f"{b['total']:g}"
        left = "-" if b["left"] is None else f"{b['left']:.4g}"
        click.echo(f"{name:<24} budget {total:<16} spent {b['spent']:<10.4g} reserved {b['reserved']:<10.4g} "
                   f"left {left}")
        limits = ([f"per job {b['per_job']:g}"] if b["per_job"] is not None else []) + (
            [f"per scientist {b['per_scientist']:g}"] if b["per_scientist"] is not None else []) + [
            f"{peer} {limit:g}" for peer, limit in sorted(b["scientists"].items())]
        if limits:
            click.echo(f"{'':<24} limits: " + ", ".join(limits))
        for peer, used in sorted(b["used"].items(), key=lambda kv: -kv[1])[:10]:
            click.echo(f"{'':<24} used by {peer}: {used:.4g}")
    click.echo(f"ledger: {state.seq} entries, head {state.head[:16]}…")


@budget.command("verify")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def budget_verify(ctx: click.Context, as_json: bool) -> None:
    """Check the whole ledger: signatures, hash links, sequence and rules. Exit 8 at the first bad entry."""
    from .ledger import ChainBroken, verify_chain

    with _store(ctx) as store:
        entries = store.ledger_entries()
        cached = store.ledger_state()
    try:
        state = verify_chain(entries, signer=_home(ctx).identity().peer_id)
    except ChainBroken as exc:
        if as_json:
            emit_json({"ok": False, "entries": len(entries), "first_bad": exc.index, "reason": exc.reason})
        else:
            click.echo(f"ledger BROKEN at entry {exc.index} of {len(entries)}: {exc.reason}", err=True)
        ctx.exit(ExitCode.UNVERIFIED)
    if (state.seq, state.head) != (cached.seq, cached.head):
        msg = "the chain verifies but does not end where the store's state says (entries removed at the end?)"
        if as_json:
            emit_json({"ok": False, "entries": len(entries), "first_bad": len(entries), "reason": msg})
        else:
            click.echo(f"ledger BROKEN: {msg}", err=True)
        ctx.exit(ExitCode.UNVERIFIED)
    if as_json:
        emit_json({"ok": True, "entries": len(entries), "head": state.head})
    else:
        click.echo(f"ledger ok: {len(entries)} entries, head {state.head[:16]}…")


# -- jobs ---------------------------------------------------------------------------------------------------------
@cli.group()
def jobs() -> None:
    """See the jobs scientists sent, and approve or reject results waiting for sign-off."""


def _job_view(job: dict[str, Any]) -> dict[str, Any]:
    keep = ("id", "state", "dataset", "scientist", "plan_hash", "recipe", "reason", "attempts", "created", "updated",
            "progress", "timings", "metrics", "epsilon", "delta", "result_hash", "decision", "policy")
    return {k: job[k] for k in keep if k in job}


@jobs.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def jobs_list(ctx: click.Context, as_json: bool) -> None:
    """List jobs, oldest first."""
    with _store(ctx) as store:
        records = [_job_view(j) for j in store.list_jobs()]
    if as_json:
        emit_json(records)
        return
    if not records:
        click.echo("no jobs")
    for j in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["created"]))
        acc = j.get("metrics", {}).get("accuracy")
        click.echo(f"{j['id']}  {when}  {j['state']:<17} {j['dataset']:<20} scientist …{j['scientist'][-8:]}"
                   + (f"  accuracy {acc:.3f}" if isinstance(acc, float) else ""))


def _get_job(store: Any, job_id: str) -> dict[str, Any]:
    job = store.get_job(job_id)
    if job is None:
        raise CliError(f"no job {job_id}", ExitCode.NOT_FOUND)
    return job


@jobs.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def jobs_show(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Show one job in full."""
    with _store(ctx) as store:
        job = _job_view(_get_job(store, job_id))
    if as_json:
        emit_json(job)
        return
    for key, value in jsonable(job).items():
        click.echo(f"{key:>12}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")


@jobs.command("approve")
@click.argument("job_id")
@click.option("--owner-key", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Sign with the data owner's key file (when the owner keeps a key apart from the node key).")
@click.option("--signoff", "signoff_file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Deliver an approval the owner signed elsewhere (hivecell jobs export, then hivecell owner sign).")
@click.pass_context
def jobs_approve(ctx: click.Context, job_id: str, owner_key: Path | None, signoff_file: Path | None) -> None:
    """Sign off the result of JOB_ID (waiting in awaiting_signoff) so the scientist can fetch it.

    By default the node key signs (it is the owner key unless `hivecell owner use` said otherwise). An owner with a
    key of their own signs here with --owner-key, or offline: `hivecell jobs export JOB_ID -o req.json` on the node,
    `hivecell owner sign req.json --key owner.key -o approval.signoff` where the key lives, then
    `hivecell jobs approve JOB_ID --signoff approval.signoff` on the node.
    """
    from hivecell.crypto.identity import Identity, IdentityError
    from .job import InvalidTransition
    from .release import ApprovalError, approve_job

    if owner_key is not None and signoff_file is not None:
        raise CliError("give --owner-key or --signoff, not both", ExitCode.BAD_INPUT)
    key = signoff = None
    try:
        key = Identity.load(owner_key) if owner_key is not None else None
    except (IdentityError, OSError) as exc:
        raise CliError(f"{owner_key}: {exc}", ExitCode.BAD_INPUT) from exc
    if signoff_file is not None:
        signoff = _read_small(signoff_file)
    with _store(ctx) as store:
        _get_job(store, job_id)
        try:
            approve_job(store, _home(ctx).identity(), job_id, owner_key=key, signoff=signoff)
        except InvalidTransition as exc:
            raise CliError(str(exc), ExitCode.CONFLICT) from exc
        except ApprovalError as exc:
            raise CliError(str(exc), ExitCode.UNVERIFIED) from exc
    click.echo(f"signed off {job_id}")


def _read_small(path: Path, limit: int = 1 << 20) -> bytes:
    data = path.read_bytes()[: limit + 1]
    if len(data) > limit:
        raise CliError(f"{path}: larger than {limit} bytes; not a signed record", ExitCode.BAD_INPUT)
    return data


SIGNOFF_REQUEST_FORMAT = "hivecell-signoff-request/1"


@jobs.command("export")
@click.argument("job_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the request here (default: standard output).")
@click.pass_context
def jobs_export(ctx: click.Context, job_id: str, output: Path | None) -> None:
    """Write the sign-off statement of JOB_ID for the owner to sign offline (hivecell owner sign)."""
    from .job import JobState
    from .release import signoff_statement

    with _store(ctx) as store:
        job = _get_job(store, job_id)
        if job["state"] != JobState.AWAITING_SIGNOFF.value:
            raise CliError(f"job {job_id} is {job['state']}, not awaiting_signoff", ExitCode.CONFLICT)
        left = store.ledger_state().budget(job["dataset"]).left
        statement = signoff_statement(job, node=_home(ctx).identity().peer_id, decision="owner", budget_left=left)
    text = json.dumps({"format": SIGNOFF_REQUEST_FORMAT, "statement": dataclasses.asdict(statement),
                       "metrics": jsonable(job.get("metrics", {}))}, indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
        click.echo(f"wrote {output}; sign it with: hivecell owner sign {output} --key OWNER_KEY -o APPROVAL", err=True)


@jobs.command("reject")
@click.argument("job_id")
@click.option("--reason", default="", help="Told to the scientist.")
@click.pass_context
def jobs_reject(ctx: click.Context, job_id: str, reason: str) -> None:
    """Withhold the result of JOB_ID for good; the result is deleted."""
    from .job import InvalidTransition
    from .release import reject_job

    with _store(ctx) as store:
        _get_job(store, job_id)
        try:
            reject_job(store, _home(ctx).identity(), job_id, reason)
        except InvalidTransition as exc:
            raise CliError(str(exc), ExitCode.CONFLICT) from exc
    click.echo(f"withheld {job_id}")


# -- owner --------------------------------------------------------------------------------------------------------
@cli.group()
def owner() -> None:
    """The data owner's key: keep it apart from the node key, delegate limits to the node, sign approvals offline.

    \b
    On the owner's machine:  hivecell owner keygen owner.key
                             hivecell owner delegate --key owner.key --node NODE_PEER_ID --max-epsilon 2 -o node.dlg
    On the node:             hivecell owner use --delegation node.dlg
    The node then signs off jobs within the delegation by itself; others wait for the owner's key
    (hivecell jobs approve --owner-key, or jobs export / owner sign / jobs approve --signoff).
    """


@owner.command("keygen")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def owner_keygen(path: Path, as_json: bool) -> None:
    """Create an owner key at PATH (mode 0600; never overwrites) and print its peer id."""
    from hivecell.crypto.identity import Identity

    if path.exists():
        raise CliError(f"{path} exists; an owner key is never overwritten", ExitCode.CONFLICT)
    identity = Identity.generate()
    try:
        identity.save(path)
    except OSError as exc:
        raise CliError(f"{path}: {exc}", ExitCode.BAD_INPUT) from exc
    if as_json:
        emit_json({"owner": identity.peer_id, "key": str(path)})
    else:
        click.echo(f"owner key {identity.peer_id} written to {path}; keep it safe, and offline if you can")


def _load_key(path: Path) -> Any:
    from hivecell.crypto.identity import Identity, IdentityError

    try:
        return Identity.load(path)
    except (IdentityError, OSError) as exc:
        raise CliError(f"{path}: {exc}", ExitCode.BAD_INPUT) from exc


@owner.command("delegate")
@click.option("--key", "key_path", type=click.Path(dir_okay=False, exists=True, path_type=Path), required=True,
              help="The owner key file.")
@click.option("--node", "node_id", default=None,
              help="The node's peer id (default: the node of --home, if it has been initialised here).")
@click.option("--max-epsilon", type=click.FloatRange(0, 1e6), required=True,
              help="The most epsilon one job may spend and still be signed off by the node on its own.")
@click.option("--allow-non-dp", is_flag=True, help="Let the node also release results of jobs without DP.")
@click.option("--dataset", "datasets", multiple=True, help="Limit it to these datasets (repeatable; default all).")
@click.option("--days", type=click.FloatRange(0.001, 730), default=90, show_default=True, help="How long it lasts.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the signed delegation (give it to the node: hivecell owner use --delegation).")
@click.pass_context
def owner_delegate(ctx: click.Context, key_path: Path, node_id: str | None, max_epsilon: float, allow_non_dp: bool,
                   datasets: tuple[str, ...], days: float, output: Path) -> None:
    """Sign a delegation that lets a node key sign off results by itself, within limits."""
    from hivecell.crypto.delegation import Delegation, sign_delegation
    from hivecell.crypto.identity import public_key_from_peer_id

    key = _load_key(key_path)
    if node_id is None:
        home = _home(ctx)
        if not home.is_initialized():
            raise CliError("give --node PEER_ID (the node's peer id: hivecell status on the node)", ExitCode.BAD_INPUT)
        node_id = home.identity().peer_id
    try:
        public_key_from_peer_id(node_id)
    except ValueError as exc:
        raise CliError(f"{node_id!r} is not a peer id", ExitCode.BAD_INPUT) from exc
    if node_id == key.peer_id:
        raise CliError("the owner key and the node key are the same key: no delegation is needed", ExitCode.BAD_INPUT)
    raw = sign_delegation(key, Delegation(node=node_id, max_epsilon=max_epsilon, allow_non_dp=allow_non_dp,
                                          datasets=tuple(datasets)), ttl=days * 86400)
    output.write_bytes(raw)
    click.echo(f"delegation for node {node_id}: up to epsilon {max_epsilon:g} per job"
               + (", jobs without DP too" if allow_non_dp else "")
               + (f", datasets {', '.join(datasets)}" if datasets else ", all datasets")
               + f", {days:g} days; written to {output}")


def _owner_lines(info: dict[str, Any]) -> list[str]:
    if not info["separate"]:
        return [f"owner: the node key {info['node']} (no separate owner key)"]
    lines = [f"owner key: {info['owner']}", f"node key:  {info['node']}"]
    d = info["delegation"]
    if d is None:
        lines.append("delegation: none (every result waits for the owner's key)")
    else:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(d["expires"]))
        lines.append(f"delegation: up to epsilon {d['max_epsilon']:g} per job"
                     + (", jobs without DP too" if d["allow_non_dp"] else "")
                     + (f", datasets {', '.join(d['datasets'])}" if d["datasets"] else ", all datasets")
                     + f", until {when}")
    if info["problem"] and d is not None:
        lines.append(f"NOT USABLE: {info['problem']} (jobs wait for the owner's key)")
    return lines


@owner.command("use")
@click.option("--delegation", "delegation_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="A delegation signed by the owner key (hivecell owner delegate).")
@click.option("--owner", "owner_id", default=None,
              help="The owner key's peer id, without delegation: every result waits for the owner's signature.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def owner_use(ctx: click.Context, delegation_file: Path | None, owner_id: str | None, as_json: bool) -> None:
    """On the node: from now on, results are signed off by this owner key (or by the node within its delegation).

    A running daemon picks it up at once: its adverts name the owner and carry the delegation.
    """
    from .owner import OwnerError, use_owner

    if (delegation_file is None) == (owner_id is None):
        raise CliError("give --delegation FILE or --owner PEER_ID", ExitCode.BAD_INPUT)
    delegation = _read_small(delegation_file) if delegation_file is not None else None
    with _store(ctx) as store:
        try:
            config = use_owner(store, _home(ctx).identity(), owner=owner_id, delegation=delegation)
        except OwnerError as exc:
            raise CliError(str(exc), ExitCode.BAD_INPUT) from exc
    info = config.to_dict()
    if as_json:
        emit_json(info)
    else:
        click.echo("\n".join(_owner_lines(info)))


@owner.command("reset")
@click.pass_context
def owner_reset(ctx: click.Context) -> None:
    """On the node: the node key is the owner key again (the default)."""
    from .owner import reset_owner

    with _store(ctx) as store:
        info = reset_owner(store, _home(ctx).identity()).to_dict()
    click.echo("\n".join(_owner_lines(info)))


@owner.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def owner_show(ctx: click.Context, as_json: bool) -> None:
    """On the node: which key signs off results, and the delegation's limits and expiry."""
    from .owner import load_owner

    with _store(ctx) as store:
        info = load_owner(store, _home(ctx).identity()).to_dict()
    if as_json:
        emit_json(info)
    else:
        click.echo("\n".join(_owner_lines(info)))


@owner.command("sign")
@click.argument("request", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--key", "key_path", type=click.Path(dir_okay=False, exists=True, path_type=Path), required=True,
              help="The owner key file.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the signed approval (deliver it: hivecell jobs approve ID --signoff FILE).")
def owner_sign(request: Path, key_path: Path, output: Path) -> None:
    """Sign a sign-off request (hivecell jobs export) with the owner key, offline; shows what is signed."""
    from hivecell.crypto.signoff import SignOff, sign_signoff

    try:
        doc = json.loads(_read_small(request))
        if doc.get("format") != SIGNOFF_REQUEST_FORMAT:
            raise ValueError(f"not a {SIGNOFF_REQUEST_FORMAT} file")
        statement = SignOff(**doc["statement"])
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CliError(f"{request}: not a sign-off request ({exc})", ExitCode.BAD_INPUT) from exc
    if statement.decision != "owner":
        raise CliError(f"{request}: an owner approval states decision 'owner'", ExitCode.BAD_INPUT)
    key = _load_key(key_path)
    output.write_bytes(sign_signoff(key, statement))
    for name, value in dataclasses.asdict(statement).items():
        click.echo(f"{name:>12}: {value}")
    metrics = doc.get("metrics") or {}
    if metrics:
        click.echo(f"{'metrics':>12}: {json.dumps(metrics)[:400]}")
    click.echo(f"signed with owner key {key.peer_id}; deliver {output} with: "
               f"hivecell jobs approve {statement.job_id} --signoff {output}")


# -- federate -----------------------------------------------------------------------------------------------------
@cli.command()
@click.option("--node", "nodes", multiple=True, metavar="MULTIADDR",
              help="A node to federate over (/ip4/HOST/tcp/PORT/p2p/PEER_ID); repeatable. Default: every node whose "
                   "advert has --tag, found on the mesh as `hivecell search` finds them.")
@click.option("--tag", default="digits", show_default=True, help="Train on each node's first dataset with this tag.")
@click.option("--model", type=click.Choice(["fed-digits-cnn", "digits-cnn", "wide-digits-cnn"]),
              default="fed-digits-cnn", show_default=True,
              help="A model from the built-in zoo (from Python, any exportable model); wide-digits-cnn has 25 MB of "
                   "weights, to see transfers.")
@click.option("--rounds", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--min-nodes", type=click.IntRange(1, 10_000), default=2, show_default=True,
              help="Updates a round needs to be applied.")
@click.option("--max-nodes", type=click.IntRange(1, 10_000), default=None, help="Participants drawn per round.")
@click.option("--deadline", "deadline_s", type=click.FloatRange(1, 86_400), default=300, show_default=True,
              help="Seconds per round; later updates are ignored (stragglers).")
@click.option("--strategy", type=click.Choice(["fedavg", "fedavgm", "fedprox", "median", "trimmed_mean"]),
              default="fedavg", show_default=True)
@click.option("--epochs", type=click.IntRange(1, 1000), default=1, show_default=True, help="Local epochs per round.")
@click.option("--batch-size", type=click.IntRange(1, 65536), default=16, show_default=True)
@click.option("--lr", type=click.FloatRange(1e-6, 10), default=0.05, show_default=True, help="Local SGD step size.")
@click.option("--update", "update", type=click.Choice(["full", "fp16", "bf16", "int8"]), default="full",
              show_default=True,
              help="How nodes send their updates: full float32 weights, or the change from the round's weights in "
                   "fp16 or bf16 (half the bytes; bf16 keeps the tiny changes of a small --lr that fp16 loses) or "
                   "int8 with a per-tensor scale (a quarter).")
@click.option("--checkpoint", "checkpoint_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Checkpoint every round here; run again with the same directory to resume.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG of test accuracy and loss per round.")
@click.option("--json", "as_json", is_flag=True, help="Print the history as JSON instead of progress.")
@_join_options
@click.pass_context
def federate(ctx: click.Context, nodes: tuple[str, ...], tag: str, model: str, rounds: int, min_nodes: int,
             max_nodes: int | None, deadline_s: float, strategy: str, epochs: int, batch_size: int, lr: float,
             update: str, checkpoint_dir: Path | None, plot_file: Path | None, as_json: bool, timeout: float,
             bootstrap: tuple[str, ...], mdns: bool, mdns_interfaces: tuple[str, ...]) -> None:
    """Federate a model over NODES for ROUNDS rounds (FedAvg and friends), measured on digits' public test split.

    Each round is a training job on every node, under that node's own policy and budget; each update is used only
    after its sign-off verified. Prints a line per round (participants, stragglers, accuracy) or, with --json, the
    history: round, participants, dropped, seconds, accuracy, loss, epsilon.
    """
    with _bulk_imports():
        import trio

        from hivecell.mesh.host import PeerUnreachable

        from .demo import DemoError, fedavg_digits
        from .federate import FederationConfig, FederationFailed, federate as run_federation, plot_history, \
            torch_evaluator
        from .plan import PlanError, build_plan
        from .zoo import MODELS, digits_example_input

    if max_nodes is not None and max_nodes < min_nodes:
        raise CliError("--max-nodes must be at least --min-nodes", ExitCode.USAGE)
    if not nodes:  # the mesh finds them: every node advertising a dataset with this tag
        from .client import Client

        async def find() -> list[str]:
            async with Client.join(identity=_client_identity(ctx), bootstrap=_with_daemon_bootstrap(ctx, bootstrap),
                                   mdns=mdns, mdns_interfaces=list(mdns_interfaces) or None) as client:
                found = await client.search(tags=[tag], timeout=timeout, limit=500)
            return list(dict.fromkeys(i.address for i in found if i.address))

        try:
            nodes = tuple(trio.run(find))
        except Exception as exc:
            if any(isinstance(leaf, MdnsError) for leaf in leaves(exc)):
                raise CliError(f"mDNS: {exc}", ExitCode.BAD_INPUT) from exc
            raise
        if len(nodes) < min_nodes:
            raise CliError(f"found {len(nodes)} node(s) advertising tag {tag!r} within {timeout:g} s; the federation "
                           f"needs --min-nodes {min_nodes} (give --node addresses, --bootstrap, or a longer --timeout)",
                           ExitCode.NOT_FOUND)
        if not as_json:
            click.echo(f"found {len(nodes)} nodes with tag {tag!r}", err=True)
    try:
        _, (x_test, y_test) = fedavg_digits(1)
    except DemoError as exc:
        raise CliError(str(exc), ExitCode.FAILURE) from exc
    factory = MODELS[model]
    import torch

    torch.manual_seed(0)
    try:
        plan = build_plan(factory(), digits_example_input(), {"optimizer": "sgd", "lr": lr, "epochs": epochs,
                                                              "batch_size": batch_size, "eval_fraction": 0.0,
                                                              "metrics": [], "seed": 0,
                                                              **({"update": update} if update != "full" else {})})
    except PlanError as exc:
        raise CliError(str(exc), ExitCode.BAD_INPUT) from exc
    config = FederationConfig(rounds=rounds, min_nodes=min_nodes, max_nodes=max_nodes, deadline_s=deadline_s,
                              strategy=strategy, tag=tag)

    def on_round(r: Any) -> None:
        if as_json:
            return
        acc = "-" if r.accuracy is None else f"{r.accuracy:.3f}"
        click.echo(f"round {r.round:>3}/{rounds}: {len(r.accepted)}/{len(r.participants)} updates"
                   + (f", {len(r.stragglers)} stragglers" if r.stragglers else "")
                   + (f", {len(r.dropped)} dropped" if r.dropped else "")
                   + ("" if r.applied else " (not applied: too few)")
                   + f", accuracy {acc}, {r.seconds:.1f} s", err=True)

    try:
        result = trio.run(lambda: run_federation(list(nodes), plan, config=config,
                                                 evaluate=torch_evaluator(factory, x_test, y_test),
                                                 checkpoint_dir=checkpoint_dir, on_round=on_round))
    except FederationFailed as exc:
        raise CliError(f"federation failed: {exc}", ExitCode.JOB_FAILED) from exc
    except (ValueError, PeerUnreachable) as exc:
        raise CliError(str(exc), ExitCode.BAD_INPUT) from exc
    if plot_file is not None:
        plot_history(result.history, plot_file, title=f"{strategy} over {len(nodes)} nodes, {model}")
    history = [r.to_dict() for r in result.history]
    if as_json:
        emit_json({"rounds": len(history), "resumed_from": result.resumed_from,
                   "final_accuracy": history[-1]["accuracy"] if history else None, "history": history})
    elif history:
        click.echo(f"final test accuracy {history[-1]['accuracy']:.3f} after {len(history)} rounds"
                   + (f"; plot in {plot_file}" if plot_file else ""))


# -- demo ---------------------------------------------------------------------------------------------------------
@cli.command()
@click.option("--nodes", type=click.IntRange(1, 16), default=4, show_default=True, help="Node daemons to start.")
@click.option("--epochs", type=click.IntRange(1, 1000), default=30, show_default=True, help="Training epochs.")
@click.option("--rounds", type=click.IntRange(0, 1000), default=5, show_default=True,
              help="FedAvg rounds of the model-centric part (0: skip it).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the nodes' homes here (default: a temporary folder, removed afterwards).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of progress and a summary.")
@click.pass_context
def demo(ctx: click.Context, nodes: int, epochs: int, rounds: int, workdir: Path | None, as_json: bool) -> None:
    """Start a local mesh of node daemons holding shards of the digits data with epsilon budgets, train a CNN on one
    with DP-SGD, verify the sign-off (epsilon spent, budget left), ask the node for a noisy evaluation, then federate
    a model over all of them with FedAvg for a few rounds."""
    with _bulk_imports():
        from .demo import DemoError, run_demo

    try:
        report = run_demo(nodes=nodes, epochs=epochs, rounds=rounds, workdir=workdir, quiet=as_json)
    except DemoError as exc:
        raise CliError(str(exc), exc.exit_code) from exc
    if as_json:
        emit_json(report)
    elif report["job"]["status"] != "released":
        click.echo(f"job {report['job']['status']}: {report['job'].get('reason', '')}", err=True)
    if report["job"]["status"] != "released":
        ctx.exit(ExitCode.JOB_FAILED)
    if not report["job"]["signoff_verified"]:
        ctx.exit(ExitCode.UNVERIFIED)
    if report["federation"] is not None and report["federation"]["status"] != "done":
        click.echo(f"federation failed: {report['federation'].get('reason', '')}", err=True)
        ctx.exit(ExitCode.JOB_FAILED)


def main() -> None:
    cli(prog_name="hivecell")


if __name__ == "__main__":
    main()

