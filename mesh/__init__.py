"""The network substrate: a libp2p host, length-prefixed frames and typed wire messages.

No torch, no LMDB, no dataset semantics beyond the advert record.
"""
