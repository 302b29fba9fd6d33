"""The daemon's configuration: config.toml parsing, precedence flag > env > file > default, and the CLI around it."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest

from hivecell.node import config as cfg
from hivecell.node.config import OPTIONS, ConfigError, ConfigParserMissing, Source, load_file, resolve


def hc(home, *args, env=None, check=True):
    # Only what the test sets, and mDNS off: a daemon started here must not announce on the machine's interfaces.
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HIVECELL_")} | {"HIVECELL_MDNS": "0"}
    proc = subprocess.run([sys.executable, "-m", "hivecell.node.cli", "--home", str(home), *args],
                          capture_output=True, text=True, env={**environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr}")
    return proc


def write(tmp_path, text: str | bytes):
    path = tmp_path / "config.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_defaults_are_the_daemons():
    from hivecell.node.daemon import DaemonConfig

    kwargs = cfg.daemon_kwargs(resolve({}, {}))
    assert DaemonConfig(**kwargs) == DaemonConfig()
    # Every option sets a DaemonConfig field, and no two set the same one.
    fields = {f.name for f in dataclasses.fields(DaemonConfig)}
    assert {o.field for o in OPTIONS} <= fields and len({o.field for o in OPTIONS}) == len(OPTIONS)


def test_names_agree_everywhere():
    for option in OPTIONS:
        if option.key == "mdns_interfaces":  # a repeatable flag, named in the singular
            assert option.flag == "--mdns-interface"
        else:
            assert option.flag == "--" + option.key.replace("_", "-")
        assert option.envvar == "HIVECELL_" + option.key.upper()
    assert [o.key for o in OPTIONS] == ["listen", "warm_workers", "worker_fork", "max_jobs", "worker_timeout", "worker_memory_mb",
                                        "worker_threads", "max_queued_per_peer", "max_attempts", "mdns",
                                        "mdns_interfaces", "bootstrap", "index", "advert_ttl", "lane", "lane_port",
                                        "lane_threshold", "gpu"]


def test_missing_file_is_an_empty_config(tmp_path):
    assert load_file(tmp_path / "config.toml") == {}


def test_a_valid_file(tmp_path):
    path = write(tmp_path, 'listen = ["/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4001"]\nwarm_workers = 0\n'
                           "worker_timeout = 60\nworker_threads = 2\nmax_attempts = 10\n")
    values = load_file(path)
    assert values == {"listen": ("/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4001"), "warm_workers": 0,
                      "worker_timeout": 60.0, "worker_threads": 2, "max_attempts": 10}
    assert isinstance(values["worker_timeout"], float)


@pytest.mark.parametrize("text, words", [
    ("frobnicate = true\n", ["unknown key 'frobnicate'", "known keys: listen"]),
    ("use_gpu = true\n", ["unknown key 'use_gpu'", "did you mean 'gpu'"]),
    ("mdns_interfaces = ['eth 0']\n", ["mdns_interfaces", "not an interface name or an IPv4 address"]),
    ("mdns = 1\n", ["mdns must be true or false", "got 1"]),
    ("gpu = true\n", ['gpu must be one of "auto", "on", "off"', "got True"]),
    ("gpu = 'cuda'\n", ['gpu must be one of "auto", "on", "off"', "got 'cuda'"]),
    ("bootstrap = ['/ip4/10.0.0.1/tcp/4001']\n", ["bootstrap", "names no peer", "/p2p/<peer id>"]),
    ("max_job = 2\n", ["unknown key 'max_job'", "did you mean 'max_jobs'"]),
    ("[daemon]\nmax_jobs = 2\n", ["unknown key 'daemon'"]),
    ("max_jobs = '2'\n", ["max_jobs must be an integer from 1 to 64", "got '2'"]),
    ("max_jobs = true\n", ["max_jobs must be an integer", "got True"]),
    ("max_jobs = 2.0\n", ["max_jobs must be an integer"]),
    ("max_jobs = 0\n", ["max_jobs must be an integer from 1 to 64", "got 0"]),
    ("max_jobs = 65\n", ["max_jobs must be an integer from 1 to 64"]),
    ("warm_workers = -1\n", ["warm_workers must be an integer from 0 to 8"]),
    ("worker_timeout = 0.5\n", ["worker_timeout must be a number from 1 to 604800"]),
    ("worker_timeout = inf\n", ["worker_timeout must be a number"]),
    ("worker_timeout = nan\n", ["worker_timeout must be a number"]),
    ("worker_memory_mb = { mb = 5 }\n", ["worker_memory_mb must be an integer", "got dict"]),
    ("listen = '/ip4/0.0.0.0/tcp/4001'\n", ["listen must be a list of multiaddr strings"]),
    ("listen = []\n", ["listen must be a list of multiaddr strings"]),
    ("listen = [4001]\n", ["listen must be a list of multiaddr strings"]),
    ("listen = ['0.0.0.0:4001']\n", ["listen:", "not a multiaddr"]),
    ("listen = ['/ip4/1.2.3/tcp/1']\n", ["listen:", "not a valid multiaddr"]),
    ("max_jobs = \n", ["not valid TOML"]),
    (b"max_jobs = 1 # \xff\xfe\n", ["not valid TOML"]),
])
def test_bad_files_name_the_file_and_the_key(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    for word in words:
        assert word in message


def test_an_unreadable_file(tmp_path):
    (tmp_path / "config.toml").mkdir()
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_file(tmp_path / "config.toml")


def test_python_310_without_tomli(tmp_path, monkeypatch):
    assert load_file(tmp_path / "config.toml") == {}  # no file: no parser needed
    path = write(tmp_path, "max_jobs = 2\n")
    monkeypatch.setattr(cfg.sys, "version_info", (3, 10, 12, "final", 0))
    monkeypatch.setitem(sys.modules, "tomli", None)  # `import tomli` raises ImportError
    with pytest.raises(ConfigParserMissing, match="pip install tomli"):
        load_file(path)
    # The example `hivecell init` writes is comments only: it must not stop a 3.10 box without tomli from running.
    assert load_file(write(tmp_path, cfg.example_config())) == {}


def test_precedence_flag_env_file_default():
    given = {"max_jobs": (4, Source.FLAG), "warm_workers": (2, Source.ENV), "listen": (["/ip4/1.2.3.4/tcp/1"],
                                                                                     Source.ENV)}
    file_values = {"max_jobs": 3, "warm_workers": 3, "max_attempts": 5}
    settings = {s.option.key: s for s in resolve(given, file_values)}
    assert (settings["max_jobs"].value, settings["max_jobs"].source) == (4, Source.FLAG)
    assert (settings["warm_workers"].value, settings["warm_workers"].source) == (2, Source.ENV)
    assert (settings["listen"].value, settings["listen"].source) == (("/ip4/1.2.3.4/tcp/1",), Source.ENV)
    assert (settings["max_attempts"].value, settings["max_attempts"].source) == (5, Source.FILE)
    assert (settings["worker_threads"].value, settings["worker_threads"].source) == (None, Source.DEFAULT)
    kwargs = cfg.daemon_kwargs(list(settings.values()))
    assert kwargs["max_concurrent_jobs"] == 4 and kwargs["listen"] == ["/ip4/1.2.3.4/tcp/1"]
    with pytest.raises(KeyError):
        resolve({"use_gpu": (True, Source.FLAG)}, {})


def test_example_config_changes_nothing(tmp_path):
    text = cfg.example_config()
    assert all(line.startswith("#") for line in text.splitlines() if line)
    assert load_file(write(tmp_path, text)) == {}
    # Uncommenting every setting line gives a valid file with the defaults (worker_threads shows an example value).
    settings = "\n".join(line[2:] for line in text.splitlines() if " = " in line and line.startswith("# "))
    values = load_file(write(tmp_path, settings))
    assert set(values) == {o.key for o in OPTIONS}
    for option in OPTIONS:
        if option.default is not None:
            expected = option.default
        else:
            expected = ("eth0",) if option.kind is list else 4
        assert values[option.key] == expected


# -- through the CLI ----------------------------------------------------------------------------------------------
def test_config_show_sources(tmp_path):
    home = tmp_path / "home"
    hc(home, "init")
    (home / "config.toml").write_text("max_jobs = 3\nwarm_workers = 3\nmax_attempts = 5\n")
    out = json.loads(hc(home, "config", "show", "--json", "--max-jobs", "4", "--gpu", "off", env={
        "HIVECELL_WARM_WORKERS": "2", "HIVECELL_LISTEN": " /ip4/127.0.0.1/tcp/4001 ,/ip4/127.0.0.1/tcp/0,"}).stdout)
    assert out["file"] == str(home / "config.toml") and out["file_exists"]
    got = {k: (v["value"], v["source"]) for k, v in out["options"].items()}
    assert got == {
        "listen": (["/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/tcp/0"], "env"),
        "warm_workers": (2, "env"), "worker_fork": (True, "default"), "max_jobs": (4, "flag"),
        "max_attempts": (5, "file"),
        "worker_timeout": (3600.0, "default"), "worker_memory_mb": (4096, "default"),
        "worker_threads": (None, "default"), "max_queued_per_peer": (16, "default"),
        "mdns": (False, "env"), "mdns_interfaces": (None, "default"), "bootstrap": ([], "default"),
        "index": (True, "default"), "advert_ttl": (3600.0, "default"), "lane": (True, "default"),
        "lane_port": (0, "default"), "lane_threshold": (1 << 20, "default"), "gpu": ("off", "flag"),
    }
    assert out["options"]["max_jobs"]["env"] == "HIVECELL_MAX_JOBS" and out["options"]["max_jobs"]["flag"] == \
        "--max-jobs"
    human = hc(home, "config", "show").stdout
    assert "max_attempts" in human and "file" in human and "HIVECELL_MAX_ATTEMPTS" in human


def test_empty_env_sets_nothing(tmp_path):
    out = json.loads(hc(tmp_path / "h", "config", "show", "--json", env={"HIVECELL_LISTEN": " , ",
                                                                         "HIVECELL_MAX_JOBS": ""}).stdout)
    assert out["options"]["listen"]["source"] == "default" and out["options"]["max_jobs"]["source"] == "default"
    assert not out["file_exists"]


@pytest.mark.parametrize("command", [("config", "show"), ("run",)])
def test_bad_config_file_exits_bad_input(tmp_path, command):
    home = tmp_path / "home"
    hc(home, "init")
    (home / "config.toml").write_text("max_jobs = 'many'\n")
    proc = hc(home, *command, check=False)
    assert proc.returncode == 6, proc.stderr
    assert f"{home / 'config.toml'}: max_jobs must be an integer" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (home / "daemon.json").exists()


@pytest.mark.parametrize("env, flag", [
    ({"HIVECELL_MAX_JOBS": "many"}, "HIVECELL_MAX_JOBS"),
    ({"HIVECELL_WARM_WORKERS": "9"}, "HIVECELL_WARM_WORKERS"),
    ({"HIVECELL_GPU": "yes"}, "HIVECELL_GPU"),
    ({"HIVECELL_LISTEN": "/ip4/0.0.0.0/tcp/1,nonsense"}, "HIVECELL_LISTEN"),
])
def test_bad_env_is_a_usage_error(tmp_path, env, flag):
    proc = hc(tmp_path / "h", "config", "show", env=env, check=False)
    assert proc.returncode == 2 and flag in proc.stderr and "Traceback" not in proc.stderr


def test_help_documents_env_vars():
    proc = subprocess.run([sys.executable, "-m", "hivecell.node.cli", "run", "--help"], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200"})
    for option in OPTIONS:
        assert option.flag in proc.stdout and option.envvar in proc.stdout


def test_init_writes_an_example_once(tmp_path):
    home = tmp_path / "home"
    first = json.loads(hc(home, "init", "--json").stdout)
    assert first["config_created"] and first["config"] == str(home / "config.toml")
    assert (home / "config.toml").read_text() == cfg.example_config()
    (home / "config.toml").write_text("max_jobs = 2\n")
    again = json.loads(hc(home, "init", "--json").stdout)
    assert not again["config_created"] and (home / "config.toml").read_text() == "max_jobs = 2\n"


def test_the_daemon_uses_the_file(tmp_path):
    from hivecell.node.localnet import start_daemon

    with socket.socket() as s:  # a free port, for the file to name
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tmp_path / "home"
    hc(home, "init")
    (home / "config.toml").write_text(f'listen = ["/ip4/127.0.0.1/tcp/{port}"]\nwarm_workers = 0\n')
    daemon = start_daemon(home, env={k: "" for k in os.environ if k.startswith("HIVECELL_")})
    try:
        assert [a.split("/p2p/")[0] for a in daemon.addrs] == [f"/ip4/127.0.0.1/tcp/{port}"]
    finally:
        daemon.stop()
    log = daemon.log_tail()
    assert f"listen=('/ip4/127.0.0.1/tcp/{port}',) (file)" in log and "warm_workers=0 (file)" in log
