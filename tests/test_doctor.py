"""``hivecell doctor``: each check against faked facts (ok, warn, fail), then the whole command on this machine."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import sys
import textwrap

import pytest

from hivecell.node import doctor as dr
from hivecell.node.doctor import (
    Check, ClockSample, Facts, Interface, ListenFact, Status, TorchProbe, check_clock, check_config, check_daemon,
    check_disk, check_home_mode, check_interfaces, check_key_mode, check_listen, check_packages, check_python,
    check_torch, evaluate, exit_status, parse_flags, parse_listen, parse_requirement, probe_torch, satisfies,
)

GiB = 1 << 30
REQUIREMENTS = ["libp2p==0.8.1", "trio>=0.26", "torch>=2.5.0a0", "lmdb>=1.4",
                'scikit-learn>=1.3; extra == "demo"', 'pytest>=8; extra == "test"']
ALL_INSTALLED = {"libp2p": "0.8.1", "trio": "0.35.0", "torch": "2.13.0+cpu", "lmdb": "3.0.0"}
both = pytest.mark.parametrize("use_packaging", [True, False], ids=["packaging", "simple"])


def statuses(checks):
    return {c.name: c.status for c in checks}


# -- versions -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version, ok", [((3, 10, 12), True), ((3, 13, 0), True), ((3, 9, 18), False)])
def test_python(version, ok):
    check = check_python(version)
    assert check.status is (Status.OK if ok else Status.FAIL)
    assert ok or "3.10" in check.detail and check.fix


@both
@pytest.mark.parametrize("version, spec, ok", [
    ("0.8.1", "==0.8.1", True), ("0.8.2", "==0.8.1", False), ("0.8", "==0.8.0", True),
    ("2.5.0a0+nv24.08", ">=2.5.0a0", True), ("2.13.0+cpu", ">=2.5.0a0", True), ("2.4.1", ">=2.5.0a0", False),
    ("2.5.0a0", ">=2.5", False), ("1.4", ">=1.4", True), ("1.3.9", ">=1.4", False), ("1.9", ">=1.4,<2", True),
    ("2.0", ">=1.4,<2", False), ("1.2.5", "~=1.2", True), ("2.0", "~=1.2", False), ("1.5", "!=1.5", False),
    ("1.5.3", "==1.5.*", True), ("1.6", "==1.5.*", False), ("7.2.2", "", True),
])
def test_satisfies(use_packaging, version, spec, ok):
    assert satisfies(version, spec, use_packaging=use_packaging) is ok


@both
def test_parse_requirement(use_packaging):
    assert parse_requirement("libp2p==0.8.1", use_packaging=use_packaging) == ("libp2p", "==0.8.1", True)
    name, spec, needed = parse_requirement('scikit-learn>=1.3; extra == "demo"', use_packaging=use_packaging)
    assert (name, spec, needed) == ("scikit-learn", ">=1.3", False)
    assert parse_requirement("zeroconf", use_packaging=use_packaging) == ("zeroconf", "", True)
    assert parse_requirement("!!", use_packaging=use_packaging) is None


@both
def test_packages(use_packaging):
    checks = check_packages(REQUIREMENTS, ALL_INSTALLED, use_packaging=use_packaging)
    assert [c.name for c in checks] == ["libp2p", "trio", "lmdb"]  # torch has its own check, extras are optional
    assert all(c.status is Status.OK for c in checks)
    checks = check_packages(REQUIREMENTS, {**ALL_INSTALLED, "libp2p": "0.9.0", "lmdb": None},
                            use_packaging=use_packaging)
    got = {c.name: c for c in checks}
    assert got["libp2p"].status is Status.FAIL and "0.9.0 installed, need ==0.8.1" in got["libp2p"].detail
    assert got["libp2p"].fix == "pip install 'libp2p==0.8.1'"
    assert got["lmdb"].status is Status.FAIL and "not installed" in got["lmdb"].detail
    assert got["trio"].status is Status.OK


def test_packages_without_metadata():
    (check,) = check_packages(None, {})
    assert check.status is Status.WARN and "metadata" in check.detail


def test_the_real_requirements_parse():
    from importlib import metadata

    for req in metadata.requires("hivecell"):
        name, spec, needed = parse_requirement(req, use_packaging=True)
        simple = parse_requirement(req, use_packaging=False)
        assert simple[0] == name and set(simple[1].replace(" ", "").split(",")) == set(spec.split(",")), req
        assert simple[2] == needed, req


@pytest.mark.parametrize("req, needed", [
    ('tomli>=2; python_version < "3.11"', sys.version_info < (3, 11)),
    ("tomli>=2; python_version >= '3.10'", True),
    ('pytest>=8; extra == "test"', False),
])
def test_markers(req, needed):
    assert parse_requirement(req, use_packaging=False)[2] is needed
    assert parse_requirement(req, use_packaging=True)[2] is needed


# -- torch and CUDA -----------------------------------------------------------------------------------------------
def test_torch_missing():
    torch, cuda = check_torch(TorchProbe(error="ModuleNotFoundError: No module named 'torch'"), "torch>=2.5.0a0")
    assert torch.status is Status.FAIL and "No module named" in torch.detail and "Jetson" in torch.fix
    assert cuda.status is Status.WARN


def test_torch_on_cpu():
    torch, cuda = check_torch(TorchProbe(version="2.13.0+cpu", cuda=False), "torch>=2.5.0a0")
    assert torch.status is Status.OK and "2.13.0+cpu" in torch.detail
    assert cuda.status is Status.WARN and cuda.detail == "no CUDA: the Worker trains on CPU"


def test_torch_on_a_jetson():
    probe = TorchProbe(version="2.5.0a0+872d972e41.nv24.08", cuda=True, cuda_version="12.6", devices=("Orin",))
    torch, cuda = check_torch(probe, "torch>=2.5.0a0")
    assert torch.status is Status.OK
    assert cuda.status is Status.OK and "CUDA 12.6" in cuda.detail and "Orin" in cuda.detail
    assert "the Worker trains on it (gpu = auto)" in cuda.detail
    _, off = check_torch(probe, "torch>=2.5.0a0", gpu="off")
    assert off.status is Status.OK and "gpu = off: the Worker trains on CPU" in off.detail


def test_gpu_on_without_cuda_fails():
    _, cuda = check_torch(TorchProbe(version="2.13.0+cpu", cuda=False), "torch>=2.5.0a0", gpu="on")
    assert cuda.status is Status.FAIL and "every job would fail" in cuda.detail and "gpu = auto" in cuda.fix
    _, broken = check_torch(TorchProbe(error="ImportError: libcudart.so"), gpu="on")
    assert broken.status is Status.FAIL


def test_torch_too_old():
    torch, _ = check_torch(TorchProbe(version="2.1.0", cuda=True, cuda_version="11.4"), "torch>=2.5.0a0")
    assert torch.status is Status.FAIL and "need >=2.5.0a0" in torch.detail


def _fake_python(tmp_path, body: str):
    script = tmp_path / "python"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return str(script)


def test_probe_torch_reads_the_subprocess(tmp_path):
    out = '{"version": "2.5.0a0+nv24.08", "cuda": true, "cuda_version": "12.6", "devices": ["Orin"]}'
    probe = probe_torch(_fake_python(tmp_path, f"echo 'some warning'; echo '{out}'"))
    assert probe == TorchProbe(version="2.5.0a0+nv24.08", cuda=True, cuda_version="12.6", devices=("Orin",))
    probe = probe_torch(_fake_python(tmp_path, """echo '{"error": "ImportError: libcudnn.so.9"}'"""))
    assert probe.error == "ImportError: libcudnn.so.9"
    probe = probe_torch(_fake_python(tmp_path, "echo 'Segmentation fault' >&2; exit 139"))
    assert "exited with 139" in probe.error and "Segmentation fault" in probe.error
    probe = probe_torch(_fake_python(tmp_path, "sleep 30"), timeout=0.5)
    assert "did not finish" in probe.error
    assert "cannot start" in probe_torch(str(tmp_path / "no-such-python")).error


# -- disk, home, key, daemon, config ------------------------------------------------------------------------------
@pytest.mark.parametrize("free, status", [(100 * GiB, Status.OK), (5 * GiB, Status.OK), (4 * GiB, Status.WARN),
                                          (GiB, Status.WARN), (GiB - 1, Status.FAIL), (0, Status.FAIL),
                                          (None, Status.WARN)])
def test_disk(free, status):
    check = check_disk("/h/store", free)
    assert check.status is status
    assert status is Status.OK or check.fix


def test_free_bytes_of_a_store_not_yet_made(tmp_path):
    assert dr._free_bytes(tmp_path / "home" / "store") > 0


@pytest.mark.parametrize("mode, status", [(0o600, Status.OK), (0o400, Status.OK), (0o640, Status.FAIL),
                                          (0o644, Status.FAIL), (None, Status.WARN)])
def test_key_mode(mode, status):
    check = check_key_mode("/h/node.key", mode)
    assert check.status is status
    if status is Status.FAIL:
        assert check.fix == "chmod 600 /h/node.key"


@pytest.mark.parametrize("mode, status", [(0o700, Status.OK), (0o755, Status.WARN), (None, Status.WARN)])
def test_home_mode(mode, status):
    assert check_home_mode("/h", mode).status is status


def test_daemon():
    assert check_daemon(False, None).status is Status.OK and "not running" in check_daemon(False, None).detail
    check = check_daemon(True, {"pid": 42, "addrs": ["/ip4/127.0.0.1/tcp/4001/p2p/12D3"]})
    assert check.status is Status.OK and "pid 42" in check.detail and "tcp/4001" in check.detail


def test_config():
    assert check_config("/h/config.toml", False, None, []).status is Status.OK
    assert "max_jobs" in check_config("/h/config.toml", True, None, ["max_jobs"]).detail
    bad = check_config("/h/config.toml", True, "/h/config.toml: unknown key 'gpu'", [])
    assert bad.status is Status.FAIL and "unknown key 'gpu'" in bad.detail


# -- listen -------------------------------------------------------------------------------------------------------
def test_parse_listen():
    assert parse_listen("/ip4/0.0.0.0/tcp/4001") == (socket.AF_INET, "0.0.0.0", 4001, "tcp")
    assert parse_listen("/ip6/::/udp/4001/quic-v1") == (socket.AF_INET6, "::", 4001, "udp")
    assert parse_listen("/dns4/jetson.local/tcp/4001") is None
    assert parse_listen("/ip4/0.0.0.0/tcp/99999") is None


@pytest.mark.parametrize("fact, running, status, words", [
    (ListenFact("/ip4/0.0.0.0/tcp/0"), False, Status.OK, "any free port"),
    (ListenFact("/ip4/0.0.0.0/tcp/4001"), False, Status.OK, "can be bound"),
    (ListenFact("/ip4/0.0.0.0/tcp/4001", errno.EADDRINUSE, "Address in use"), False, Status.FAIL, "in use by another"),
    (ListenFact("/ip4/0.0.0.0/tcp/4001", errno.EADDRINUSE, "Address in use"), True, Status.OK, "running daemon"),
    (ListenFact("/ip4/0.0.0.0/tcp/400", errno.EADDRINUSE, "Address in use"), True, Status.FAIL, "another"),
    (ListenFact("/ip4/0.0.0.0/tcp/80", errno.EACCES, "Permission denied"), False, Status.FAIL, "not allowed"),
    (ListenFact("/ip4/10.9.9.9/tcp/4001", errno.EADDRNOTAVAIL, "x"), False, Status.FAIL, "not an address of this"),
    (ListenFact("/ip4/0.0.0.0/tcp/4001", errno.ENOBUFS, "No buffer space"), False, Status.FAIL, "No buffer space"),
    (ListenFact("/dns4/jetson.local/tcp/4001"), False, Status.WARN, "not checked"),
])
def test_listen(fact, running, status, words):
    check = check_listen(fact, daemon_running=running, daemon_addrs=["/ip4/0.0.0.0/tcp/4001/p2p/12D3"])
    assert check.status is status and words in check.detail
    assert status is not Status.FAIL or "--listen" in check.fix


def test_try_bind_on_loopback():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert dr.try_bind(socket.AF_INET, "127.0.0.1", port, "tcp")[0] == errno.EADDRINUSE
    assert dr.try_bind(socket.AF_INET, "127.0.0.1", port, "tcp") == (None, "")
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737); .123 is on no interface here (binding sends nothing).
    assert dr.try_bind(socket.AF_INET, "192.0.2.123", port, "tcp")[0] == errno.EADDRNOTAVAIL
    facts = dr._listen_facts(["/ip4/127.0.0.1/tcp/0", f"/ip4/127.0.0.1/tcp/{port}"],
                             lambda *a: (errno.EADDRINUSE, "taken"))
    assert facts == [ListenFact("/ip4/127.0.0.1/tcp/0"), ListenFact(f"/ip4/127.0.0.1/tcp/{port}", errno.EADDRINUSE,
                                                                    "taken")]


# -- interfaces and clock -----------------------------------------------------------------------------------------
def test_parse_flags():
    assert parse_flags("up,broadcast,running,multicast", None) == (True, False, True)
    assert parse_flags("up,loopback,running", "0x1009") == (True, True, False)  # psutil wins
    assert parse_flags(None, "0x1003\n") == (True, False, True)
    assert parse_flags(None, "0x1002") == (False, False, True)
    assert parse_flags(None, "0x9") == (True, True, False)
    assert parse_flags(None, "garbage") is None and parse_flags(None, None) is None


def test_interfaces():
    interfaces = [
        Interface("lo", ("127.0.0.1",), True, True, False),
        Interface("eth0", ("192.168.1.20",), True, False, True),
        Interface("wlan0", ("10.0.0.5",), True, False, False),
        Interface("eth1", ("172.16.0.2",), False, False, True),
        Interface("usb0", ("192.168.55.1",), True, False, None),
        Interface("ifb0", (), True, False, True),
    ]
    checks = check_interfaces(interfaces)
    assert statuses(checks) == {"interface lo": Status.OK, "interface eth0": Status.OK,
                                "interface wlan0": Status.WARN, "interface eth1": Status.WARN,
                                "interface usb0": Status.WARN, "mdns": Status.OK}
    got = {c.name: c for c in checks}
    assert got["interface wlan0"].fix == "ip link set wlan0 multicast on"
    assert "eth0" in got["mdns"].detail and "no traffic sent" in got["mdns"].detail


def test_no_interface_for_mdns():
    checks = check_interfaces([Interface("lo", ("127.0.0.1",), True, True, False)])
    assert checks[-1].name == "mdns" and checks[-1].status is Status.WARN and "host networking" in checks[-1].fix


def test_real_interfaces_are_read():
    interfaces = dr._interfaces()
    assert any(i.loopback and "127.0.0.1" in i.ipv4 for i in interfaces)


@pytest.mark.parametrize("sample, status, words", [
    (ClockSample(1.8e9, 100.0, 1.8e9 + 0.05, 100.05), Status.OK, "see peer-clocks"),
    (ClockSample(1e6, 100.0, 1e6 + 0.05, 100.05), Status.FAIL, "1970"),
    (ClockSample(1.8e9, 100.0, 1.8e9 + 30.0, 100.05), Status.WARN, "jumped"),
    (ClockSample(1.8e9, 100.0, 1.8e9 - 5.0, 100.05), Status.WARN, "jumped"),
])
def test_clock(sample, status, words):
    check = check_clock(sample)
    assert check.status is status and words in check.detail


PEER = "12D3KooWPeerPeerPeerPeerPeerPeerPeerPeer"


@pytest.mark.parametrize("clocks, status, words", [
    (None, Status.OK, "no daemon runs"),
    ((), Status.OK, "not read a peer's clock yet"),
    ((dr.PeerClock(PEER, 0.004, 0.002), dr.PeerClock("x" * 40, -1.5, 0.01)), Status.OK, "1.50 s behind"),
    ((dr.PeerClock(PEER, 45.0, 0.01),), Status.WARN, "45.00 s ahead"),
    ((dr.PeerClock(PEER, 0.2), dr.PeerClock("y" * 40, -121.0, 0.01)), Status.FAIL, "refused"),
])
def test_peer_clocks(clocks, status, words):
    check = dr.check_peer_clocks(clocks)
    assert check.name == "peer-clocks" and check.status is status and words in check.detail
    assert (status is Status.OK) == (check.fix == "")


def test_peer_clocks_are_read_from_the_daemons_peers_file():
    info = {"peers": [{"peer_id": PEER, "clock_offset_s": 2.5, "clock_rtt_s": 0.01}, {"peer_id": "no reading"},
                      {"peer_id": "bad", "clock_offset_s": "soon"}, "not a row"]}
    assert dr.peer_clocks_of(info) == (dr.PeerClock(PEER, 2.5, 0.01),)
    assert dr.peer_clocks_of(None) is None and dr.peer_clocks_of({"peers": "junk"}) == ()
    failing = fake_facts(daemon_running=True, peer_clocks=(dr.PeerClock(PEER, 500.0),))
    assert exit_status(evaluate(failing)) == 1


# -- the whole report ---------------------------------------------------------------------------------------------
def fake_facts(**changes) -> Facts:
    facts = dict(
        python=(3, 10, 12), requirements=REQUIREMENTS, installed=ALL_INSTALLED,
        torch=TorchProbe(version="2.5.0a0+nv24.08", cuda=True, cuda_version="12.6", devices=("Orin",)),
        home_path="/h", key_path="/h/node.key", store_path="/h/store", free_bytes=50 * GiB,
        listen=[ListenFact("/ip4/0.0.0.0/tcp/4001")], daemon_running=False, daemon_info=None, key_mode=0o600,
        home_mode=0o700, interfaces=[Interface("eth0", ("192.168.1.20",), True, False, True)],
        clock=ClockSample(1.8e9, 1.0, 1.8e9 + 0.05, 1.05), config_path="/h/config.toml", config_exists=False,
    )
    return Facts(**{**facts, **changes})


def test_a_healthy_jetson():
    checks = evaluate(fake_facts())
    assert all(c.status is Status.OK for c in checks), [c for c in checks if c.status is not Status.OK]
    assert [c.name for c in checks] == ["python", "libp2p", "trio", "lmdb", "torch", "cuda", "config", "home",
                                        "node key", "disk", "daemon", "listen /ip4/0.0.0.0/tcp/4001",
                                        "interface eth0", "mdns", "clock", "peer-clocks"]
    assert exit_status(checks) == 0


def test_warnings_exit_0_failures_exit_1():
    warned = evaluate(fake_facts(torch=TorchProbe(version="2.13.0+cpu"), free_bytes=2 * GiB))
    assert statuses(warned)["cuda"] is Status.WARN and statuses(warned)["disk"] is Status.WARN
    assert exit_status(warned) == 0
    failed = evaluate(fake_facts(key_mode=0o644, listen=[ListenFact("/ip4/0.0.0.0/tcp/4001", errno.EADDRINUSE)]))
    assert statuses(failed)["node key"] is Status.FAIL and exit_status(failed) == 1


def test_table(capsys):
    dr.print_table([Check("disk", Status.WARN, "2.0 GiB free at [/h/store]", "free space"),
                    Check("python", Status.OK, "Python 3.10.12")])
    out = capsys.readouterr().out
    assert "[/h/store]" in out and "free space" in out and "1 ok, 1 warn, 0 fail" in out


# -- on this machine ----------------------------------------------------------------------------------------------
# Runs the CLI in a fresh interpreter and reports, at exit, whether torch got into its sys.modules.
WRAPPER = textwrap.dedent("""
    import atexit, sys
    atexit.register(lambda: sys.stderr.write("\\nTORCH_IN_CLI=%s\\n" % ("torch" in sys.modules)))
    from hivecell.node.cli import main
    sys.argv = ["hivecell", *sys.argv[1:]]
    main()
""")


def doctor_json(home, *args, env=None):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HIVECELL_")}
    proc = subprocess.run([sys.executable, "-c", WRAPPER, "--home", str(home), "doctor", "--json", *args],
                          capture_output=True, text=True, env={**environ, **(env or {})}, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "TORCH_IN_CLI=False" in proc.stderr, proc.stderr
    checks = json.loads(proc.stdout)
    assert isinstance(checks, list) and checks
    for c in checks:
        assert set(c) == {"name", "status", "detail", "fix"} and c["status"] in ("ok", "warn", "fail"), c
        assert all(isinstance(v, str) for v in c.values())
    assert proc.returncode == (1 if any(c["status"] == "fail" for c in checks) else 0), proc.stderr
    return {c["name"]: c for c in checks}, proc.returncode


def test_doctor_on_this_machine(tmp_path):
    from hivecell.node.home import Home

    home = tmp_path / "home"
    Home(home).init()
    checks, _ = doctor_json(home)
    for name in ("python", "libp2p", "trio", "msgpack", "lmdb", "cryptography", "safetensors", "zeroconf", "torch",
                 "cuda", "config", "home", "node key", "disk", "daemon", "listen /ip4/127.0.0.1/tcp/0", "mdns",
                 "clock"):
        assert name in checks, name
    assert checks["python"]["status"] == "ok" and checks["libp2p"]["status"] == "ok"
    assert checks["node key"]["status"] == "ok" and checks["home"]["status"] == "ok"
    assert checks["torch"]["status"] == "ok", checks["torch"]  # probed in a subprocess: the Worker can import it
    assert stat.S_IMODE((home / "node.key").stat().st_mode) == 0o600
    assert any(n.startswith("interface ") for n in checks)


def test_doctor_reports_a_bad_config_and_a_taken_port(tmp_path):
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "config.toml").write_text("max_jobs = 0\n")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        checks, code = doctor_json(home, env={"HIVECELL_LISTEN": f"/ip4/127.0.0.1/tcp/{port}", "HIVECELL_GPU": "on"})
    assert code == 1
    import torch

    if not torch.cuda.is_available():  # gpu = on (from the environment) needs CUDA, and this box has none
        assert checks["cuda"]["status"] == "fail" and "gpu = on" in checks["cuda"]["detail"]
    assert checks["config"]["status"] == "fail" and "max_jobs must be an integer" in checks["config"]["detail"]
    assert checks[f"listen /ip4/127.0.0.1/tcp/{port}"]["status"] == "fail"
    assert checks["node key"]["status"] == "warn" and checks["node key"]["fix"] == "hivecell init"


def test_without_packaging(monkeypatch):
    for name in ("packaging", "packaging.requirements", "packaging.specifiers", "packaging.version"):
        monkeypatch.setitem(sys.modules, name, None)  # `import packaging...` raises ImportError
    assert not dr._packaging_available()
    assert parse_requirement("libp2p==0.8.1") == ("libp2p", "==0.8.1", True)
    assert satisfies("2.5.0a0+nv24.08", ">=2.5.0a0") and not satisfies("0.9.0", "==0.8.1")
