#!/usr/bin/env python3
"""Write the four nodes' datasets for docker-compose.yml: non-IID shards of scikit-learn's digits, one .npz per node.

    python3 deploy/compose/make_data.py                 # needs numpy and scikit-learn (pip install numpy scikit-learn)
    docker compose run --rm make-data                   # the same in a python:3.11 container, for hosts without them

The split is the "fedavg-digits" work that `hivecell federate` is measured on: a 20% stratified test split (random
state 0) is kept out of every node, and the remaining 1437 rows are sorted by label, cut into 8 shards and dealt 2 per
node (seeded), as in McMahan et al. (2017). Each node therefore sees only a few digits, and the test digits that
`hivecell federate` scores the global model on are in no node's data. It reproduces
`hivecell.node.demo.fedavg_digits(4)` (a test checks) without needing hivecell itself.

Files: OUT/node1.npz .. OUT/node4.npz with `features` float32 [N, 1, 8, 8] in [0, 1] and `labels` int64 [N], mode
0644 (the nodes read them as uid 10001 through a read-only bind mount). Existing files are replaced. Run as root (the
make-data service), the files and OUT are given to the owner of OUT's parent folder, so that they are not left
root-owned in a checkout.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

NODES = 4
SHARDS_PER_NODE = 2
SEED = 0
TEST_SIZE = 0.2
DEFAULT_OUT = Path(__file__).resolve().parent / "data"


def shards(n: int = NODES, *, shards_per_node: int = SHARDS_PER_NODE, seed: int = SEED) -> list[tuple]:
    """The node shards of the "fedavg-digits" split: ``[(features, labels), ...]``, one per node."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, _x_test, y_train, _y_test = train_test_split(x, y, test_size=TEST_SIZE, stratify=y, random_state=0)
    order = np.argsort(y_train, kind="stable")
    pieces = np.array_split(order, shards_per_node * n)
    pick = np.random.default_rng(seed).permutation(len(pieces))
    out = []
    for i in range(n):
        idx = np.concatenate([pieces[j] for j in pick[i * shards_per_node:(i + 1) * shards_per_node]])
        out.append((x_train[idx], y_train[idx]))
    return out


def _give_to_parent_owner(paths: list[Path], out: Path) -> None:
    if os.geteuid() != 0:
        return
    parent = out.resolve().parent.stat()
    for path in [out, *paths]:
        os.chown(path, parent.st_uid, parent.st_gid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder to write to (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        import numpy as np
        import sklearn  # noqa: F401  (only to fail early with a clear message)
    except ImportError as exc:
        print(f"make_data.py needs numpy and scikit-learn ({exc.name} is missing): pip install numpy scikit-learn",
              file=sys.stderr)
        return 1
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k, (features, labels) in enumerate(shards(), start=1):
        path = out / f"node{k}.npz"
        tmp = out / f".node{k}.npz.tmp"
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, features=features, labels=labels)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        written.append(path)
        counts = np.bincount(labels, minlength=10)
        digits = ", ".join(f"{d}: {c}" for d, c in enumerate(counts) if c)
        print(f"{path}: {len(labels)} rows, digits {{{digits}}}")
    _give_to_parent_owner(written, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
