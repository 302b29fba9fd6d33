"""Node daemons as local subprocesses: used by ``hivecell demo``, the tests and the benchmarks.

Each daemon is a real ``hivecell run`` process with its own home; it is ready once it has written ``daemon.json``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DaemonProcess", "start_daemon", "DaemonStartError"]


class DaemonStartError(RuntimeError):
    """A daemon exited or did not get ready in time; the message carries the tail of its log."""


@dataclass
class DaemonProcess:
    home: Path
    process: subprocess.Popen
    log_path: Path
    peer_id: str = ""
    addrs: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.addrs[0]

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """``kill -9``: no clean-up at all, as a power cut would."""
        if self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; workers die with the process group."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # Worker children, if any are left
        except ProcessLookupError:
            pass
        self.process.wait()


def start_daemon(home: Path, *run_args: str, env: dict[str, str] | None = None,
                 timeout: float = 120.0) -> DaemonProcess:
    """Start ``hivecell --home HOME run RUN_ARGS`` and wait until it listens.

    mDNS is off unless ``env`` or ``run_args`` turn it on: these daemons share one machine, find each other by the
    addresses their callers pass, and must not announce on the machine's real interfaces.

    Raises:
        DaemonStartError: it exited or was not ready within ``timeout``.
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    info_file = home / "daemon.json"
    info_file.unlink(missing_ok=True)
    log_path = home / "daemon.log"
    log = open(log_path, "ab")
    cmd = [sys.executable, "-m", "hivecell.node.cli", "--home", str(home), "run", *run_args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, "HIVECELL_MDNS": "0", **(env or {})}, start_new_session=True)
    log.close()
    daemon = DaemonProcess(home=home, process=proc, log_path=log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DaemonStartError(f"daemon for {home} exited with {proc.returncode}:\n{daemon.log_tail()}")
        try:
            info = json.loads(info_file.read_text())
            if info.get("pid") == proc.pid:
                daemon.peer_id, daemon.addrs = info["peer_id"], info["addrs"]
                return daemon
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.05)
    daemon.stop()
    raise DaemonStartError(f"daemon for {home} not ready after {timeout:.0f} s:\n{daemon.log_tail()}")
