"""Datasets: import from .npz or CSV, describe (schema, tags), preview with a synthetic mock, advertise signed.

The private tensors go into the store as one safetensors blob (``features`` float32 [N, ...], ``labels`` int64 or
float32 [N]) that only the Worker reads. What leaves the node is the *advert*: name, description, tags, schema and a
mock preview of synthetic rows drawn at random inside the features' overall range -- never a private row.
"""

from __future__ import annotations

import csv
import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hivecell.crypto.canonical import canonical_packb
from hivecell.crypto.identity import Identity
from hivecell.crypto.record import InvalidRecord, open_record, seal

if TYPE_CHECKING:  # numpy is imported where rows are handled: a daemon only signs adverts (0.2 s less to start)
    import numpy as np

__all__ = [
    "DatasetError", "DatasetInfo", "load_file", "make_record", "encode_tensors", "make_advert", "make_tombstone",
    "open_advert",
    "ADVERT_DOMAIN", "SIGNOFF_POLICIES",
]

ADVERT_DOMAIN = "advert"
ADVERT_TTL_S = 3600  # an advert lives an hour and is re-published every 20 minutes (see advertiser.py)
MAX_ADVERT_MOCK_BYTES = 8 << 10
SIGNOFF_POLICIES = ("auto", "manual")
MOCK_ROWS = 5
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TAG = re.compile(r"^[a-z0-9][a-z0-9_.:-]{0,31}$")
_X_KEYS = ("features", "x", "X", "data", "inputs")
_Y_KEYS = ("labels", "y", "Y", "target", "targets")


class DatasetError(ValueError):
    """A file or a description that cannot become a dataset; the message says what to fix."""


@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    """A dataset as others see it: the verified content of its advert."""

    name: str
    description: str
    tags: list[str]
    schema: dict[str, Any]
    mock: dict[str, Any]
    signoff: str
    owner: str  # peer id of the key that signs off results
    node: str = ""  # peer id of the node that holds it (the advert's signer)
    delegation: bytes | None = None  # the owner's delegation to the node, when the owner key is not the node key
    extra: dict[str, Any] = field(default_factory=dict)
    addrs: list[str] = field(default_factory=list)  # where the node listens (as it advertised)
    budget: dict[str, Any] = field(default_factory=dict)  # the privacy budget's summary, as the node advertised it
    issued_at: int = 0
    expires_at: int = 0
    advert: bytes = field(default=b"", repr=False)  # the signed advert itself

    def mock_hash(self) -> str:
        return hashlib.sha256(canonical_packb(self.mock)).hexdigest()

    @property
    def address(self) -> str:
        """The first advertised address of the node (``/ip4/.../tcp/.../p2p/<node>``), or ``""``."""
        return next((a for a in self.addrs if a.endswith("/p2p/" + self.node)), "")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise DatasetError("a dataset name is 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
    return name


def _check_tags(tags: list[str]) -> list[str]:
    out = sorted({t.strip().lower() for t in tags if t.strip()})
    for t in out:
        if not _TAG.match(t):
            raise DatasetError(f"tag {t!r}: use 1-32 lowercase letters, digits, '_', '.', ':' or '-'")
    if len(out) > 32:
        raise DatasetError("at most 32 tags")
    return out


def _labels(y: np.ndarray) -> np.ndarray:
    import numpy as np

    if y.ndim != 1:
        raise DatasetError(f"labels must be one value per sample, got shape {list(y.shape)}")
    if np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_):
        y = y.astype(np.int64)
        if y.size and (y.min() < 0 or y.max() >= 1 << 16):
            raise DatasetError("class labels must be integers from 0 to 65535; store other targets as floats")
        return y
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)):
            raise DatasetError("labels contain NaN or infinity")
        if np.all(y == np.round(y)) and np.all(y >= 0) and y.max(initial=0) < 1 << 20:
            return y.astype(np.int64)
        return y.astype(np.float32)
    raise DatasetError(f"labels of type {y.dtype} are not supported; use integers (classes) or numbers")


def _features(x: np.ndarray) -> np.ndarray:
    import numpy as np

    if x.ndim < 2:
        raise DatasetError(f"features need one row per sample, got shape {list(x.shape)}")
    if not (np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.bool_)):
        raise DatasetError(f"features of type {x.dtype} are not numeric")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DatasetError("features contain NaN or infinity")
    return x


def load_npz(path: Path, *, features_key: str | None = None, labels_key: str | None = None
             ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import numpy as np

    try:
        archive = np.load(path, allow_pickle=False)  # an .npz can hold pickled objects; never load them
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path} is not a readable .npz file: {exc}") from exc
    with archive:
        def pick(explicit: str | None, candidates: tuple[str, ...], what: str) -> np.ndarray:
            keys = [explicit] if explicit else [k for k in candidates if k in archive.files]
            if not keys or keys[0] not in archive.files:
                raise DatasetError(f"{path}: no {what} array (looked for {', '.join(explicit and [explicit] or candidates)};"
                                   f" the file has {', '.join(archive.files) or 'nothing'})")
            try:
                return archive[keys[0]]
            except ValueError as exc:  # object arrays need pickle
                raise DatasetError(f"{path}: array {keys[0]!r} holds Python objects; store plain numbers") from exc
        x, y = pick(features_key, _X_KEYS, "features"), pick(labels_key, _Y_KEYS, "labels")
    return x, y, []


def load_csv(path: Path, *, label_column: str = "label") -> tuple[np.ndarray, np.ndarray, list[str]]:
    import numpy as np

    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not a readable UTF-8 CSV file: {exc}") from exc
    if len(rows) < 2:
        raise DatasetError(f"{path}: expected a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    if label_column not in header:
        raise DatasetError(f"{path}: no column {label_column!r} (columns: {', '.join(header)}); use --label-column")
    li = header.index(label_column)
    names = [h for i, h in enumerate(header) if i != li]
    xs, ys = [], []
    for n, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DatasetError(f"{path}:{n}: {len(row)} fields where the header has {len(header)}")
        try:
            ys.append(float(row[li]))
            xs.append([float(c) for i, c in enumerate(row) if i != li])
        except ValueError as exc:
            raise DatasetError(f"{path}:{n}: not a number ({exc})") from exc
    return np.asarray(xs, dtype=np.float64), np.asarray(ys), names


def load_file(path: str | Path, *, label_column: str = "label", features_key: str | None = None,
              labels_key: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read ``features, labels, feature_names`` from an .npz or .csv file, validated.

    Raises:
        DatasetError: unreadable file, missing arrays or columns, non-numeric or non-finite values, size mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        x, y, names = load_npz(path, features_key=features_key, labels_key=labels_key)
    elif suffix == ".csv":
        x, y, names = load_csv(path, label_column=label_column)
    else:
        raise DatasetError(f"{path}: unsupported file type {suffix or '(none)'}; use .npz (features + labels) or .csv")
    import numpy as np

    x, y = _features(x), _labels(np.asarray(y))
    if len(x) != len(y):
        raise DatasetError(f"{len(x)} feature rows but {len(y)} labels")
    if len(x) == 0:
        raise DatasetError("the dataset is empty")
    return x, y, names


def encode_tensors(features: np.ndarray, labels: np.ndarray) -> bytes:
    import numpy as np

    from safetensors.numpy import save as save_tensors

    return save_tensors({"features": np.ascontiguousarray(features), "labels": np.ascontiguousarray(labels)})


MOCK_MAX_VALUES = 20_000  # keeps an advert small (records are capped at 1 MiB) whatever the sample shape


def _mock(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    """Synthetic rows: uniform noise inside the features' overall [min, max], labels drawn from the label space.

    Only two numbers of the private data shape the features (the global min and max), and labels are drawn from the
    schema's class range (or the labels' overall range for regression), so no private row can appear in it. Rows are
    flattened (``shape`` says how to fold them) and there are fewer of them for large samples.
    """
    import numpy as np

    row = int(np.prod(x.shape[1:]))
    n = max(0, min(MOCK_ROWS, MOCK_MAX_VALUES // max(row, 1)))
    lo, hi = float(x.min()), float(x.max())
    rows = rng.uniform(lo, hi, size=(n, row)).round(2)
    if y.dtype == np.int64:
        labels = rng.integers(0, int(y.max()) + 1, size=n).tolist()
    else:
        labels = rng.uniform(float(y.min()), float(y.max()), size=n).round(2).tolist()
    return {"features": rows.tolist(), "shape": [int(d) for d in x.shape[1:]], "labels": labels, "synthetic": True}


def make_record(*, name: str, features: np.ndarray, labels: np.ndarray, feature_names: list[str],
                description: str = "", tags: list[str] = (), signoff: str = "auto",  # type: ignore[assignment]
                owner: str, seed: int | None = None) -> dict[str, Any]:
    """The dataset's stored record (everything but the tensors)."""
    import numpy as np

    check_name(name)
    if signoff not in SIGNOFF_POLICIES:
        raise DatasetError(f"sign-off policy must be one of {', '.join(SIGNOFF_POLICIES)}")
    if len(description) > 2000:
        raise DatasetError("description: at most 2000 characters")
    classification = labels.dtype == np.int64
    schema: dict[str, Any] = {
        "num_samples": int(len(features)),
        "feature_shape": [int(d) for d in features.shape[1:]],
        "feature_dtype": "float32",
        "label_dtype": "int64" if classification else "float32",
        "task": "classification" if classification else "regression",
    }
    if classification:
        schema["num_classes"] = int(labels.max()) + 1
    if feature_names:
        schema["feature_names"] = feature_names
    return {
        "name": name,
        "description": description,
        "tags": _check_tags(list(tags)),
        "schema": schema,
        "mock": _mock(features, labels, np.random.default_rng(seed)),
        "signoff": signoff,
        "owner": owner,
        "created": time.time(),
    }


def make_advert(identity: Identity, record: dict[str, Any], *, owner: str | None = None,
                delegation: bytes | None = None, addrs: list[str] = (),  # type: ignore[assignment]
                budget: dict[str, Any] | None = None, ttl: float = ADVERT_TTL_S, now: float | None = None) -> bytes:
    """The signed advert of a stored dataset. ``owner`` (default: the node key) is the key whose sign-offs count;
    ``delegation`` is that key's delegation to this node, if any (see ``owner.py``); ``addrs`` are where the node
    listens; ``budget`` a summary of the dataset's privacy budget (see ``privacy.py``)."""
    fields = {k: record[k] for k in ("name", "description", "tags", "schema", "signoff")}
    fields["owner"] = owner or identity.peer_id
    mock = record["mock"]
    fields["mock_hash"] = hashlib.sha256(canonical_packb(mock)).hexdigest()
    if len(canonical_packb(mock)) <= MAX_ADVERT_MOCK_BYTES:  # a large preview is fetched from the node instead
        fields["mock"] = mock
    if delegation is not None:
        fields["delegation"] = delegation
    if addrs:
        fields["addrs"] = list(addrs)[:8]
    if budget:
        fields["budget"] = budget
    now = time.time() if now is None else now
    fields["us"] = _micros(now)
    return seal(identity, ADVERT_DOMAIN, fields, ttl=ttl, now=now)


def _micros(now: float) -> int:
    """The sub-second part of ``now``: adverts (and tombstones) of one dataset issued in the same second still order
    (see hivecell.mesh.index)."""
    return min(999_999, max(0, int((now - int(now)) * 1_000_000)))


def make_tombstone(identity: Identity, name: str, *, ttl: float = ADVERT_TTL_S, now: float | None = None) -> bytes:
    """A signed record that takes the advert of dataset ``name`` back (the owner removed it). It outlives any advert
    it replaces (same ttl), so no peer that missed the removal can bring the advert back."""
    now = time.time() if now is None else now
    return seal(identity, ADVERT_DOMAIN, {"name": check_name(name), "tombstone": True, "us": _micros(now)}, ttl=ttl,
                now=now)


def open_advert(unverified: bytes, *, now: float | None = None) -> DatasetInfo:
    """Verify a signed advert and return what it says.

    Raises:
        InvalidRecord: bad signature, expired, or fields of the wrong shape.
    """
    record = open_record(unverified, domain=ADVERT_DOMAIN, now=now)
    f = record.fields()
    if f.get("tombstone") is True:
        raise InvalidRecord("a tombstone: the dataset was removed")
    try:
        addrs = [str(a) for a in f.get("addrs", [])]
        budget = f.get("budget", {})
        info = DatasetInfo(name=check_name(f["name"]), description=str(f["description"]), tags=list(f["tags"]),
                           schema=dict(f["schema"]), mock=dict(f.get("mock", {})), signoff=str(f["signoff"]),
                           owner=str(f["owner"]), node=record.signer, delegation=f.get("delegation"),
                           addrs=addrs, budget=dict(budget), issued_at=record.issued_at,
                           expires_at=record.expires_at, advert=record.raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidRecord("malformed advert") from exc
    if info.mock and "mock_hash" in f and info.mock_hash() != f["mock_hash"]:
        raise InvalidRecord("the mock preview does not match its hash")
    if info.delegation is not None and not isinstance(info.delegation, bytes):
        raise InvalidRecord("malformed advert")
    if not all(isinstance(t, str) for t in info.tags) or info.signoff not in SIGNOFF_POLICIES:
        raise InvalidRecord("malformed advert")
    return info


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """A JSON-friendly view of a stored record for listings (no tensors, no data key)."""
    return {k: record[k] for k in ("name", "description", "tags", "schema", "signoff", "owner", "created")}


