"""Who owns this node's data: the key whose word releases a result, and what it delegated to the node key.

By default the node key is the owner key (one key per box): the node signs off by policy (``auto``) and the data owner
approves with ``hivecell jobs approve`` on the node itself. An owner who keeps a key of their own (on a laptop) tells
the node so with ``hivecell owner use``:

* ``--delegation FILE``: a delegation signed by the owner key (``hivecell owner delegate``) lets the node sign off on
  its own within limits (epsilon per job, jobs without DP or not, datasets, expiry). Anything beyond waits in
  ``awaiting_signoff``.
* ``--owner PEER_ID``: no delegation; every result waits for the owner's signature.

The owner approves a waiting job with the owner key, on the node (``jobs approve ID --owner-key FILE``) or offline:
``jobs export ID`` writes the statement to sign, ``owner sign`` signs it where the key lives, and ``jobs approve ID
--signoff FILE`` delivers the signature. Adverts name the owner and carry the delegation, so a scientist's client
checks every sign-off against the owner key (see ``hivecell.crypto.delegation``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from hivecell.crypto.delegation import Delegation, DelegationRefused, open_delegation
from hivecell.crypto.identity import Identity, public_key_from_peer_id

from .store import Store

__all__ = ["OwnerConfig", "OwnerError", "load_owner", "use_owner", "reset_owner"]


class OwnerError(Exception):
    """An owner setting that cannot be used (a bad peer id, a delegation for another node, expired, ...)."""


@dataclass(frozen=True)
class OwnerConfig:
    owner: str  # peer id of the owner key
    node: str  # peer id of this node's key
    delegation: bytes | None = None  # signed by the owner key, naming the node key

    @property
    def separate(self) -> bool:
        """The owner key is not the node key."""
        return self.owner != self.node

    def delegation_info(self, *, now: float | None = None) -> tuple[Delegation | None, int | None, str | None]:
        """(the delegation, its expiry, why it cannot be used now or ``None``)."""
        if self.delegation is None:
            return None, None, "no delegation" if self.separate else None
        try:
            d, record = open_delegation(self.delegation, owner=self.owner, check_times=False)
        except DelegationRefused as exc:
            return None, None, exc.reason
        try:
            open_delegation(self.delegation, owner=self.owner, now=now)
        except DelegationRefused as exc:
            return d, record.expires_at, exc.reason
        return d, record.expires_at, None

    def may_sign(self, dataset: str, epsilon: float, *, now: float | None = None) -> str | None:
        """Why the node key may not sign off a result of ``epsilon`` on ``dataset`` by itself now, or ``None``."""
        if not self.separate:
            return None
        d, _, why = self.delegation_info(now=now)
        if why is not None or d is None:
            return f"the owner's key must sign: {why or 'no delegation'}"
        return d.covers(dataset, epsilon)

    def to_dict(self, *, now: float | None = None) -> dict[str, Any]:
        d, expires, why = self.delegation_info(now=now)
        return {"owner": self.owner, "node": self.node, "separate": self.separate,
                "delegation": None if d is None else {
                    "max_epsilon": d.max_epsilon, "allow_non_dp": d.allow_non_dp, "datasets": list(d.datasets),
                    "expires": expires},
                "delegation_usable": why is None and (d is not None or not self.separate), "problem": why}


def load_owner(store: Store, identity: Identity) -> OwnerConfig:
    record = store.get_owner()
    if not record:
        return OwnerConfig(owner=identity.peer_id, node=identity.peer_id)
    return OwnerConfig(owner=record["owner"], node=identity.peer_id, delegation=record.get("delegation"))


def use_owner(store: Store, identity: Identity, *, owner: str | None = None, delegation: bytes | None = None,
              now: float | None = None) -> OwnerConfig:
    """Record the owner key (and its delegation to this node).

    Raises:
        OwnerError: ``owner`` is not a peer id; the delegation does not verify, names another node, is expired, or
            is signed by another key than ``owner``.
    """
    if delegation is not None:
        try:
            d, record = open_delegation(delegation, owner=owner, now=time.time() if now is None else now)
        except DelegationRefused as exc:
            raise OwnerError(exc.reason) from exc
        if d.node != identity.peer_id:
            raise OwnerError(f"the delegation is for node {d.node}, not this node ({identity.peer_id})")
        owner = record.signer
    if owner is None:
        raise OwnerError("give the owner's peer id or a delegation signed by the owner key")
    try:
        public_key_from_peer_id(owner)
    except ValueError as exc:
        raise OwnerError(f"{owner[:64]!r} is not a peer id") from exc
    if owner == identity.peer_id:
        raise OwnerError("that is this node's own key, the default owner: use `hivecell owner reset`")
    store.set_owner({"owner": owner, "delegation": delegation})
    return load_owner(store, identity)


def reset_owner(store: Store, identity: Identity) -> OwnerConfig:
    """Back to the default: the node key is the owner key."""
    store.set_owner(None)
    return load_owner(store, identity)
