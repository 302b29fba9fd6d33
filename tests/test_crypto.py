"""Identities, signed records and sign-offs: pure, no sockets."""

from __future__ import annotations

import math
import os
import stat
import time
from dataclasses import asdict

import pytest

from hivecell.crypto.identity import Identity, IdentityError, PublicIdentity
from hivecell.crypto.record import InvalidRecord, open_record, seal
from hivecell.crypto.signoff import SignOff, SignoffRejected, sign_signoff, verify_signoff


def test_peer_id_is_libp2p_peer_id():
    from libp2p.crypto.ed25519 import Ed25519PrivateKey
    from libp2p.peer.id import ID

    for _ in range(5):
        ident = Identity.generate()
        theirs = ID.from_pubkey(Ed25519PrivateKey.from_bytes(ident.seed()).get_public_key()).to_base58()
        assert ident.peer_id == theirs and theirs.startswith("12D3KooW")
        assert PublicIdentity.from_peer_id(ident.peer_id).public_key == ident.public_key


@pytest.mark.parametrize("text", ["", "x" * 50, "12D3KooW" + "0" * 44, "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"])
def test_bad_peer_ids(text):
    with pytest.raises(IdentityError):
        PublicIdentity.from_peer_id(text)


def test_key_file_mode_and_round_trip(tmp_path):
    ident = Identity.generate()
    path = tmp_path / "keys" / "node.key"
    ident.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load(path).peer_id == ident.peer_id
    with pytest.raises(FileExistsError):
        Identity.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load(path)
    os.chmod(path, 0o600)
    path.write_bytes(b"not a key")
    with pytest.raises(IdentityError):
        Identity.load(path)


def test_record_round_trip_and_nonce():
    ident = Identity.generate()
    raw = seal(ident, "job", {"a": 1, "b": [b"x", "y"]}, with_nonce=True)
    rec = open_record(raw, domain="job")
    assert rec.signer == ident.peer_id and rec.fields() == {"a": 1, "b": [b"x", "y"]}
    assert isinstance(rec.nonce, bytes) and len(rec.nonce) == 16
    assert open_record(seal(ident, "job", {"a": 1}, with_nonce=True), domain="job").nonce != rec.nonce


def test_record_refusals():
    ident = Identity.generate()
    raw = seal(ident, "job", {"a": 1})
    with pytest.raises(InvalidRecord, match="domain"):
        open_record(raw, domain="signoff")
    with pytest.raises(InvalidRecord, match="expired"):
        open_record(seal(ident, "job", {"a": 1}, ttl=10, now=time.time() - 1000), domain="job")
    with pytest.raises(InvalidRecord, match="future"):
        open_record(seal(ident, "job", {"a": 1}, now=time.time() + 1000), domain="job")
    for i in range(len(raw)):  # any single flipped byte is refused, whatever it hits
        bad = bytearray(raw)
        bad[i] ^= 0x40
        with pytest.raises(InvalidRecord):
            open_record(bytes(bad), domain="job")
    with pytest.raises(ValueError):
        seal(ident, "job", {"exp": 1})


def _statement(**changes):
    base = dict(job_id="a" * 32, dataset="digits", scientist=Identity.generate().peer_id, node="n", plan_hash="p" * 64,
                result_hash="r" * 64, epsilon=math.inf, delta=0.0, budget_left=None, decision="auto")
    return SignOff(**{**base, **changes})


def test_signoff_verifies_only_what_was_asked():
    owner, other = Identity.generate(), Identity.generate()
    st = _statement()
    raw = sign_signoff(owner, st)
    got, _ = verify_signoff(raw, owner=owner.peer_id, job_id=st.job_id, result_hash=st.result_hash,
                            plan_hash=st.plan_hash, scientist=st.scientist, dataset="digits")
    assert got == st
    expectations = dict(owner=owner.peer_id, job_id=st.job_id, result_hash=st.result_hash, plan_hash=st.plan_hash,
                        scientist=st.scientist, dataset="digits")
    for key, wrong in [("owner", other.peer_id), ("job_id", "b" * 32), ("result_hash", "0" * 64),
                       ("plan_hash", "1" * 64), ("scientist", other.peer_id), ("dataset", "other")]:
        with pytest.raises(SignoffRejected):
            verify_signoff(raw, **{**expectations, key: wrong})
    with pytest.raises(SignoffRejected, match="not the dataset owner"):
        verify_signoff(sign_signoff(other, st), **expectations)
    with pytest.raises(SignoffRejected):
        verify_signoff(seal(owner, "advert", asdict(st)), **expectations)  # a signature made for another purpose


@pytest.mark.parametrize("bad", [dict(epsilon=-1.0), dict(delta=float("nan")), dict(decision="maybe"),
                                 dict(job_id=5)])
def test_signoff_statement_validation(bad):
    with pytest.raises(ValueError):
        _statement(**bad)
