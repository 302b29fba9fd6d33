"""Hivecell Mesh: federated learning on a peer-to-peer mesh of edge boxes.

The code lives in three layers that import downwards only::

    hivecell.node    the peer's roles: daemon, store, Worker, client, CLI   (root folder ``node/``)
    hivecell.mesh    the network substrate: libp2p host, framed messages    (root folder ``mesh/``)
    hivecell.crypto  identities, signed records, sign-off statements        (root folder ``crypto/``)
"""

__version__ = "0.1.0"
