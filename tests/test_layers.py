"""The layers import downwards only, and the daemon never imports torch (only the Worker does)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _modules_after(statement: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{statement}\nimport sys\nprint(' '.join(sys.modules))"],
                         check=True, capture_output=True, text=True).stdout
    return set(out.split())


@pytest.mark.parametrize("module, forbidden", [
    ("hivecell.crypto.record", {"trio", "libp2p", "lmdb", "torch", "hivecell.mesh", "hivecell.node"}),
    ("hivecell.crypto.signoff", {"trio", "libp2p", "lmdb", "torch", "hivecell.mesh", "hivecell.node"}),
    ("hivecell.mesh.host", {"torch", "lmdb", "hivecell.node"}),
    ("hivecell.mesh.gossip", {"torch", "lmdb", "hivecell.node"}),
    ("hivecell.mesh.index", {"trio", "libp2p", "torch", "lmdb", "hivecell.node"}),  # the pure core
    ("hivecell.mesh.discovery", {"torch", "lmdb", "hivecell.node"}),
    ("hivecell.mesh.dht", {"torch", "lmdb", "hivecell.node"}),
    # dp_accounting pulls scipy (~1.7 s, ~65 MB): the daemon prices DP jobs with it on first use only.
    ("hivecell.node.daemon", {"torch", "scipy", "dp_accounting", "numpy"}),  # numpy: 0.2 s of a node's start
    ("hivecell.node.cli", {"torch", "libp2p"}),
])
def test_imports_point_down(module, forbidden):
    loaded = _modules_after(f"import {module}")
    assert not {m for m in loaded if m.split(".")[0] in forbidden or any(m.startswith(f + ".") or m == f
                                                                           for f in forbidden)}


def _dotted(node) -> str:
    import ast

    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def test_no_pickle_on_network_paths():
    """No code of ours calls a pickle-based loader (docstrings may mention them; calls may not)."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    banned = {"pickle.load", "pickle.loads", "torch.load", "torch.export.load", "_pickle_load_obj", "marshal.loads"}
    checked = 0
    for folder in ("crypto", "mesh", "node"):
        for path in (root / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    name = _dotted(node.func)
                    assert name not in banned and not name.endswith("._pickle_load_obj"), f"{path.name} calls {name}"
                    for kw in node.keywords:
                        bad = kw.arg == "allow_pickle" and getattr(kw.value, "value", False) is True
                        assert not bad, f"{path.name} passes allow_pickle=True"
                    checked += 1
    assert checked > 500  # the walk really covered the code
