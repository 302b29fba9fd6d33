"""Pure cryptography for Hivecell: identities, signed records, sign-off statements.

No network, no trio, no libp2p, no LMDB, no torch: everything here is testable with bytes alone.
"""
