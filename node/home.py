"""A node's home directory: its key, its store and the running daemon's address file.

    $HIVECELL_HOME/            (default ~/.hivecell; mode 0700)
        node.key               Ed25519 key, mode 0600
        store/                 LMDB environment (datasets, blobs, jobs, results)
        daemon.json            written by a running daemon: peer id, addresses, pid
        peers.json             written by a running daemon (each second, on change): known peers, the index's counters
        daemon.lock            held (flock) by the running daemon for its whole life

A daemon is running exactly when someone holds ``daemon.lock``. The lock dies with the process, so a daemon killed by
SIGKILL or a power cut leaves no stale "running" state behind (a pid file alone would: in a container the restarted
daemon is pid 1 again, the same pid as the dead one).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hivecell.crypto.identity import Identity

__all__ = ["Home", "default_home", "DaemonRunning"]


class DaemonRunning(Exception):
    """Another daemon already runs for this home."""


def default_home() -> Path:
    return Path(os.environ.get("HIVECELL_HOME") or Path.home() / ".hivecell").expanduser()


@dataclass(frozen=True)
class Home:
    path: Path

    @property
    def key_path(self) -> Path:
        return self.path / "node.key"

    @property
    def store_path(self) -> Path:
        return self.path / "store"

    @property
    def daemon_file(self) -> Path:
        return self.path / "daemon.json"

    def is_initialized(self) -> bool:
        return self.key_path.exists()

    def init(self) -> tuple[Identity, bool]:
        """Create the home and a node key if missing. Returns the identity and whether it was created now."""
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        if self.key_path.exists():
            return Identity.load(self.key_path), False
        identity = Identity.generate()
        identity.save(self.key_path)
        return identity, True

    def identity(self) -> Identity:
        """Load the node key.

        Raises:
            FileNotFoundError: the home is not initialised (run ``hivecell init``).
        """
        if not self.key_path.exists():
            raise FileNotFoundError(f"{self.path} has no node key; run: hivecell --home {self.path} init")
        return Identity.load(self.key_path)

    @property
    def lock_file(self) -> Path:
        return self.path / "daemon.lock"

    @contextmanager
    def daemon_lock(self) -> Iterator[None]:
        """Hold the daemon lock for the ``with`` block.

        Raises:
            DaemonRunning: another daemon holds it.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            for attempt in range(20):  # `hivecell status` probes hold the lock for microseconds: retry a little
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if attempt == 19:
                        raise DaemonRunning(f"a daemon already runs for {self.path} (see: hivecell status)") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

    def daemon_running(self) -> bool:
        try:
            fd = os.open(self.lock_file, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def write_daemon_info(self, info: dict[str, Any]) -> None:
        tmp = self.daemon_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(info, pid=os.getpid(), started=time.time()), indent=2))
        os.replace(tmp, self.daemon_file)

    @property
    def peers_file(self) -> Path:
        return self.path / "peers.json"

    def write_peers(self, info: dict[str, Any]) -> None:
        """What the running daemon knows of the mesh (peers, index counters), for ``hivecell peers``."""
        tmp = self.peers_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(info, pid=os.getpid(), written=time.time()), indent=2))
        os.replace(tmp, self.peers_file)

    def peers_info(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.peers_file.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def clear_daemon_info(self) -> None:
        try:
            info = json.loads(self.daemon_file.read_text())
            if info.get("pid") == os.getpid():
                self.daemon_file.unlink()
        except (FileNotFoundError, ValueError):
            pass

    def daemon_info(self) -> dict[str, Any] | None:
        """The running daemon's address file, or ``None`` if no daemon of this home runs."""
        if not self.daemon_running():
            return None
        try:
            return json.loads(self.daemon_file.read_text())
        except (FileNotFoundError, ValueError):
            return None  # starting: locked, not yet listening
