"""The node's LMDB store: the one module that opens transactions.

Sub-databases::

    blobs     sha256 hex -> bytes          models, dataset tensors, results (content-addressed, written once)
    datasets  name -> msgpack record       metadata, schema, mock preview, key of the tensor blob
    jobs      job id -> msgpack record     the persisted job state machine (see job.py)
    nonces    nonce -> expiry (8 bytes)    job-request nonces seen, to refuse replays
    ledger    seq (8 bytes) -> entry       the privacy ledger (see ledger.py), appended in the job's transaction
    meta      key -> bytes                 store format version, the ledger's replayed state, the data owner, the
                                           names of the datasets this node advertised (to send tombstones)
    index     16-byte key -> advert        the gossip index (see hivecell.mesh.index), re-verified when loaded

LMDB gives us crash safety (copy-on-write B-tree, a committed transaction survives ``kill -9``) and lets the CLI, the
daemon and read-only Worker processes share one store. Every write happens in one short transaction.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb

from hivecell.crypto.canonical import canonical_packb, strict_unpackb
from hivecell.crypto.identity import Identity

from .ledger import DatasetBudget, LedgerState, replay_chain, seal_entry

# (signing key, entries(job record) -> ledger entry bodies to append in the same transaction)
LedgerWrite = tuple[Identity, Callable[[dict[str, Any]], list[dict[str, Any]]]]

__all__ = ["QueueFull", "Store", "StoreError", "open_blob_reader", "sha256_hex"]

FORMAT_VERSION = b"1"
_MAP_SIZE = 1 << 40  # address space only: LMDB files are sparse and grow with the data
_LEDGER_SNAPSHOT = 2  # the layout of the replayed ledger state kept in meta
_DBS = (b"blobs", b"datasets", b"jobs", b"nonces", b"meta", b"ledger", b"index")
_MAX_RECORD = 64 << 20


class StoreError(Exception):
    """The store cannot do what was asked (missing record, duplicate name, wrong format)."""


class QueueFull(StoreError):
    """A new job would pass the node's queue limits."""


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


Blob = bytes | tuple[str, bytes]  # the bytes, or (sha256_hex of them, the bytes) where the caller hashed them already


def _keyed(blobs: Iterable[Blob]) -> Iterator[tuple[bytes, bytes]]:
    """(LMDB key, bytes) per blob: a 25 MB model's weights are hashed once per job, not once per step."""
    for blob in blobs:
        key, data = blob if isinstance(blob, tuple) else (sha256_hex(blob), blob)
        yield key.encode(), data


def _pack(record: dict[str, Any]) -> bytes:
    return canonical_packb(record)


def _unpack(data: bytes) -> dict[str, Any]:
    value = strict_unpackb(bytes(data), max_len=_MAX_RECORD)
    if not isinstance(value, dict):
        raise StoreError("corrupt record")
    return value


class Store:
    """One node's store. Open with :meth:`open`; use as a context manager or call :meth:`close`."""

    def __init__(self, env: lmdb.Environment, path: Path) -> None:
        self._env = env
        self.path = path
        self._db = {name.decode(): env.open_db(name) for name in _DBS}

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Store:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)  # private data lives here
        env = lmdb.open(str(path), map_size=_MAP_SIZE, max_dbs=len(_DBS), subdir=True, lock=True, max_readers=256)
        store = cls(env, path)
        with env.begin(write=True, db=store._db["meta"]) as txn:
            version = txn.get(b"format")
            if version is None:
                txn.put(b"format", FORMAT_VERSION)
            elif version != FORMAT_VERSION:
                env.close()
                raise StoreError(f"store format {version!r} is not supported by this version ({FORMAT_VERSION!r})")
        return store

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- blobs -----------------------------------------------------------------------------------------------------
    def put_blob(self, data: bytes) -> str:
        key = sha256_hex(data)
        with self._env.begin(write=True, db=self._db["blobs"]) as txn:
            txn.put(key.encode(), data, overwrite=False)
        return key

    def get_blob(self, key: str) -> bytes | None:
        with self._env.begin(db=self._db["blobs"]) as txn:
            return txn.get(key.encode())

    def _delete_unshared(self, txn: lmdb.Transaction, key: str, owner: str) -> bool:
        """Delete a blob unless a job other than ``owner`` (still needing it) or a dataset refers to it.

        Blobs are content-addressed, so two jobs with the same plan and data share one result blob.
        """
        for _, raw in txn.cursor(db=self._db["jobs"]):
            job = _unpack(raw)
            if job["id"] == owner:
                continue
            if job.get("result_hash") == key and job.get("state") != "withheld":
                return False
            if key in (job.get("program_key"), job.get("weights_key")) and job.get("state") in ("queued", "running"):
                return False
        for _, raw in txn.cursor(db=self._db["datasets"]):
            if _unpack(raw).get("data_key") == key:
                return False
        return txn.delete(key.encode(), db=self._db["blobs"])

    # -- datasets --------------------------------------------------------------------------------------------------
    def add_dataset(self, record: dict[str, Any], data: bytes) -> None:
        """Store a dataset's tensors and its record in one transaction.

        Raises:
            StoreError: a dataset of that name exists.
        """
        name = record["name"]
        key = sha256_hex(data)
        record = dict(record, data_key=key)
        with self._env.begin(write=True) as txn:
            if txn.get(name.encode(), db=self._db["datasets"]) is not None:
                raise StoreError(f"dataset {name!r} already exists")
            txn.put(key.encode(), data, db=self._db["blobs"], overwrite=False)
            txn.put(name.encode(), _pack(record), db=self._db["datasets"])

    def _get(self, db: str, key: str) -> dict[str, Any] | None:
        with self._env.begin(db=self._db[db]) as txn:
            raw = txn.get(key.encode())
        return None if raw is None else _unpack(raw)

    def _all(self, db: str) -> list[dict[str, Any]]:
        with self._env.begin(db=self._db[db]) as txn:
            return [_unpack(v) for _, v in txn.cursor()]

    def get_dataset(self, name: str) -> dict[str, Any] | None:
        return self._get("datasets", name)

    def list_datasets(self) -> list[dict[str, Any]]:
        return self._all("datasets")

    def remove_dataset(self, name: str) -> None:
        """Remove a dataset and its tensors.

        Raises:
            StoreError: no such dataset.
        """
        with self._env.begin(write=True) as txn:
            raw = txn.get(name.encode(), db=self._db["datasets"])
            if raw is None:
                raise StoreError(f"no dataset named {name!r}")
            record = _unpack(raw)
            txn.delete(name.encode(), db=self._db["datasets"])
            still_used = any(
                _unpack(v).get("data_key") == record["data_key"] for _, v in txn.cursor(db=self._db["datasets"])
            )
            if not still_used:
                txn.delete(record["data_key"].encode(), db=self._db["blobs"])

    # -- jobs ------------------------------------------------------------------------------------------------------
    def create_job(self, record: dict[str, Any], blobs: Iterable[Blob] = (),
                   *, ledger: LedgerWrite | None = None, max_queued: tuple[int, int] | None = None) -> None:
        """Persist a new job, the blobs it refers to and its ledger entries (``ledger(record)``) in one transaction.
        A blob is its bytes, or ``(sha256_hex(bytes), bytes)`` when the caller has the hash already.

        ``max_queued`` = (per scientist, overall): the queue limits, checked in the same transaction, so concurrent
        submits cannot together pass them.

        Raises:
            StoreError: a job with that id exists.
            QueueFull: the queue limits would be passed; nothing is written.
            LedgerError: the ledger refuses an entry (e.g. the budget does not fit); nothing is written.
        """
        with self._env.begin(write=True) as txn:
            if txn.get(record["id"].encode(), db=self._db["jobs"]) is not None:
                raise StoreError(f"job {record['id']} already exists")
            if max_queued is not None:
                queued = self._count_queued(txn, record["scientist"])
                if queued["mine"] >= max_queued[0] or queued["all"] >= max_queued[1]:
                    raise QueueFull("too many jobs waiting on this node")
            self._ledger_append(txn, ledger, record)
            for key, data in _keyed(blobs):
                txn.put(key, data, db=self._db["blobs"], overwrite=False)
            txn.put(record["id"].encode(), _pack(record), db=self._db["jobs"])

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        return self._get("jobs", job_id)

    def list_jobs(self) -> list[dict[str, Any]]:
        return sorted(self._all("jobs"), key=lambda j: j.get("created", 0))

    def update_job(
        self, job_id: str, change: Callable[[dict[str, Any]], dict[str, Any]], blobs: Iterable[Blob] = (),
        *, drop: Callable[[dict[str, Any]], list[str]] | None = None, ledger: LedgerWrite | None = None,
    ) -> dict[str, Any]:
        """Apply ``change`` to a job record atomically (read, change, write in one transaction) and return the new one.

        ``change`` may raise to abort; nothing is written then. ``blobs`` (as in :meth:`create_job`) are stored in the
        same transaction, and the blobs named by ``drop(new_record)`` are deleted in it unless another job (still
        needing them) or a dataset refers to them.

        Raises:
            StoreError: no such job.
        """
        with self._env.begin(write=True) as txn:
            raw = txn.get(job_id.encode(), db=self._db["jobs"])
            if raw is None:
                raise StoreError(f"no job {job_id}")
            record = change(_unpack(raw))
            self._ledger_append(txn, ledger, record)
            for key, data in _keyed(blobs):
                txn.put(key, data, db=self._db["blobs"], overwrite=False)
            txn.put(job_id.encode(), _pack(record), db=self._db["jobs"])
            for key in drop(record) if drop else ():
                if key:
                    self._delete_unshared(txn, key, job_id)
        return record

    def claim_next_job(
        self, state: str, change: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> dict[str, Any] | None:
        """Atomically take the oldest job in ``state`` and apply ``change`` to it; ``None`` if there is none."""
        with self._env.begin(write=True) as txn:
            candidates = [_unpack(v) for _, v in txn.cursor(db=self._db["jobs"])]
            waiting = sorted((j for j in candidates if j.get("state") == state), key=lambda j: j.get("created", 0))
            if not waiting:
                return None
            record = change(waiting[0])
            txn.put(record["id"].encode(), _pack(record), db=self._db["jobs"])
        return record

    def count_jobs(self, scientist: str) -> dict[str, int]:
        """Jobs waiting to run (queued): from ``scientist`` and from everyone."""
        with self._env.begin() as txn:
            return self._count_queued(txn, scientist)

    def _count_queued(self, txn: Any, scientist: str) -> dict[str, int]:
        mine = total = 0
        for _, raw in txn.cursor(db=self._db["jobs"]):
            job = _unpack(raw)
            if job.get("state") == "queued":
                total += 1
                mine += job.get("scientist") == scientist
        return {"mine": mine, "all": total}

    # -- the gossip index and what this node advertised ------------------------------------------------------------
    def index_records(self) -> list[tuple[bytes, bytes]]:
        with self._env.begin(db=self._db["index"]) as txn:
            return [(bytes(k), bytes(v)) for k, v in txn.cursor()]

    def index_apply(self, changes: dict[bytes, bytes | None]) -> None:
        """Store (``raw``) or drop (``None``) index records by key, in one transaction."""
        with self._env.begin(write=True, db=self._db["index"]) as txn:
            for key, raw in changes.items():
                if raw is None:
                    txn.delete(key)
                else:
                    txn.put(key, raw)

    def get_advertised(self) -> list[str]:
        """Names of the datasets this node advertised last (a removed one gets a tombstone)."""
        with self._env.begin(db=self._db["meta"]) as txn:
            raw = txn.get(b"advertised")
        value = strict_unpackb(bytes(raw), max_len=1 << 20) if raw is not None else []
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []

    def set_advertised(self, names: list[str]) -> None:
        with self._env.begin(write=True, db=self._db["meta"]) as txn:
            txn.put(b"advertised", canonical_packb(sorted(names)))

    # -- the data owner (see owner.py) -------------------------------------------------------------------------------
    def get_owner(self) -> dict[str, Any] | None:
        with self._env.begin(db=self._db["meta"]) as txn:
            raw = txn.get(b"owner")
        return None if raw is None else _unpack(raw)

    def set_owner(self, record: dict[str, Any] | None) -> None:
        with self._env.begin(write=True, db=self._db["meta"]) as txn:
            if record is None:
                txn.delete(b"owner")
            else:
                txn.put(b"owner", _pack(record))

    # -- the privacy ledger ------------------------------------------------------------------------------------------
    def _ledger_state(self, txn: lmdb.Transaction) -> LedgerState:
        raw = txn.get(b"ledger_state", db=self._db["meta"])
        if raw is None:
            return LedgerState()
        snap = _unpack(raw)
        if snap.get("v") != _LEDGER_SNAPSHOT:  # written by an older version: replay the chain (it is the truth)
            entries = [bytes(v) for _, v in txn.cursor(db=self._db["ledger"])]
            return replay_chain(entries)
        return LedgerState(seq=snap["seq"], head=snap["head"],
                           datasets={k: DatasetBudget(**v) for k, v in snap["datasets"].items()},
                           open={k: (v[0], v[1], v[2]) for k, v in snap["open"].items()})

    def _ledger_append(self, txn: lmdb.Transaction, ledger: LedgerWrite | None, record: dict[str, Any]) -> None:
        if ledger is None:
            return
        identity, entries = ledger
        fields = entries(record)
        if not fields:
            return
        state = self._ledger_state(txn)
        for f in fields:
            if f["kind"] in ("settle", "refund") and f.get("job_id") not in state.open:
                continue  # a job from before the ledger existed: nothing was reserved, so nothing to close
            raw = seal_entry(identity, state, f)  # raises LedgerError: the whole transaction is abandoned
            txn.put(struct.pack(">Q", state.seq - 1), raw, db=self._db["ledger"], overwrite=False)
        # The replayed state, kept beside the chain so an append costs O(1); `verify` recomputes it from the chain.
        txn.put(b"ledger_state", _pack({
            "v": _LEDGER_SNAPSHOT, "seq": state.seq, "head": state.head,
            "datasets": {k: {"total": b.total, "allow_non_dp": b.allow_non_dp, "per_job": b.per_job,
                             "per_scientist": b.per_scientist, "scientists": b.scientists, "reserved": b.reserved,
                             "spent": b.spent, "used": b.used} for k, b in state.datasets.items()},
            "open": {k: [d, e, who] for k, (d, e, who) in state.open.items()},
        }), db=self._db["meta"])

    def append_ledger(self, identity: Identity, fields: list[dict[str, Any]]) -> LedgerState:
        """Append entries on their own (e.g. a budget change) and return the new state.

        Raises:
            LedgerError: the rules refuse an entry; nothing is written.
        """
        with self._env.begin(write=True) as txn:
            self._ledger_append(txn, (identity, lambda _: fields), {})
            return self._ledger_state(txn)

    def ledger_state(self) -> LedgerState:
        with self._env.begin() as txn:
            return self._ledger_state(txn)

    def ledger_entries(self) -> list[bytes]:
        with self._env.begin(db=self._db["ledger"]) as txn:
            return [bytes(v) for _, v in txn.cursor()]

    # -- nonces ----------------------------------------------------------------------------------------------------
    def nonce_seen(self, nonce: bytes) -> bool:
        with self._env.begin(db=self._db["nonces"]) as txn:
            return txn.get(nonce) is not None

    def remember_nonce(self, nonce: bytes, expires_at: int, *, now: float | None = None) -> bool:
        """Record a request nonce; return False if it was seen before (a replay). Expired nonces are pruned."""
        t = time.time() if now is None else now
        with self._env.begin(write=True, db=self._db["nonces"]) as txn:
            if txn.get(nonce) is not None:
                return False
            txn.put(nonce, struct.pack(">q", expires_at))
            cursor = txn.cursor()
            stale = [k for k, v in cursor if struct.unpack(">q", v)[0] < t - 3600]
            for k in stale[:1000]:
                txn.delete(k)
        return True


@contextmanager
def open_blob_reader(path: str | os.PathLike[str]) -> Iterator[Callable[[str], memoryview | None]]:
    """Open a store read-only (as the Worker does) and yield ``get(key)`` returning a zero-copy view of a blob.

    The views are valid only inside the ``with`` block.
    """
    env = lmdb.open(str(path), readonly=True, lock=True, max_dbs=len(_DBS), subdir=True, max_readers=256)
    try:
        blobs = env.open_db(b"blobs", create=False)
        with env.begin(db=blobs, buffers=True) as txn:
            yield lambda key: txn.get(key.encode())
    finally:
        env.close()
