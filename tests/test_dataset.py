"""Dataset import (.npz, CSV), validation errors, the synthetic mock and the signed advert."""

from __future__ import annotations

import numpy as np
import pytest

from hivecell.crypto.identity import Identity
from hivecell.crypto.record import InvalidRecord
from hivecell.node.dataset import DatasetError, load_file, make_advert, make_record, open_advert


def test_npz_and_csv(tmp_path, digits):
    x, y = digits
    np.savez(tmp_path / "d.npz", x=x, y=y)
    fx, fy, _ = load_file(tmp_path / "d.npz")
    assert fx.shape == x.shape and fx.dtype == np.float32 and fy.dtype == np.int64 and (fy == y).all()
    (tmp_path / "t.csv").write_text("age,height,label\n30,1.8,1\n41,1.6,0\n\n52,1.7,1\n")
    cx, cy, names = load_file(tmp_path / "t.csv")
    assert cx.shape == (3, 2) and list(cy) == [1, 0, 1] and names == ["age", "height"]
    (tmp_path / "r.csv").write_text("a,target\n1,0.5\n2,1.25\n")
    _, ry, _ = load_file(tmp_path / "r.csv", label_column="target")
    assert ry.dtype == np.float32


@pytest.mark.parametrize("name, content, match", [
    ("x.txt", "1,2", "unsupported file type"),
    ("x.csv", "a,b\n1,2\n", "no column 'label'"),
    ("x.csv", "a,label\n1,2\n3\n", "fields where the header has"),
    ("x.csv", "a,label\nfoo,1\n", "not a number"),
    ("x.csv", "a,label\nnan,1\n", "NaN"),
    ("x.csv", "a,label\n", "at least one data row"),
])
def test_bad_files(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(DatasetError, match=match):
        load_file(tmp_path / name)


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "o.npz", x=np.array([{"a": 1}, {"b": 2}], dtype=object), y=np.array([0, 1]))
    with pytest.raises(DatasetError, match="Python objects"):
        load_file(tmp_path / "o.npz")
    np.savez(tmp_path / "n.npz", foo=np.zeros((2, 2)))
    with pytest.raises(DatasetError, match="no features array"):
        load_file(tmp_path / "n.npz")


def test_mock_has_no_private_rows_and_advert_verifies(digits):
    x, y = digits
    owner = Identity.generate()
    record = make_record(name="digits", features=x, labels=y, feature_names=[], tags=["Digits", "images"],
                         owner=owner.peer_id)
    mock = np.asarray(record["mock"]["features"], dtype=np.float32).reshape(-1, *record["mock"]["shape"])
    assert mock.shape == (5, 1, 8, 8) and record["mock"]["synthetic"]
    for row in mock:
        assert not np.any(np.all(np.isclose(x, row, atol=1e-6), axis=(1, 2, 3)))
    assert record["tags"] == ["digits", "images"] and record["schema"]["num_classes"] == 10
    info = open_advert(make_advert(owner, record))
    assert info.name == "digits" and info.owner == owner.peer_id and info.node == owner.peer_id
    forged = bytearray(make_advert(owner, record))
    forged[-1] ^= 1
    with pytest.raises(InvalidRecord):
        open_advert(bytes(forged))


@pytest.mark.parametrize("kw, match", [(dict(name="../etc"), "dataset name"), (dict(tags=["BAD TAG!"]), "tag"),
                                       (dict(signoff="sometimes"), "sign-off policy")])
def test_bad_descriptions(digits, kw, match):
    x, y = digits
    with pytest.raises(DatasetError, match=match):
        make_record(**{"name": "ok", "features": x, "labels": y, "feature_names": [], "owner": "o", **kw})


def test_mock_of_large_samples_stays_small():
    x = np.random.default_rng(0).random((4, 3, 128, 128), dtype=np.float32)
    record = make_record(name="big", features=x, labels=np.array([0, 1, 2, 1]), feature_names=[], owner="o")
    assert record["mock"]["features"] == [] and record["mock"]["shape"] == [3, 128, 128]
    assert len(make_advert(Identity.generate(), record)) < 10_000


def test_negative_class_labels_are_refused(tmp_path):
    np.savez(tmp_path / "neg.npz", x=np.zeros((2, 3)), y=np.array([-1, 1]))
    with pytest.raises(DatasetError, match="0 to 65535"):
        load_file(tmp_path / "neg.npz")
