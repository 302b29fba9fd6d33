"""Exception groups, as trio and py-libp2p raise them, taken apart in one place.

Imports nothing heavy (no libp2p, no trio), so the CLI can use it without starting the network stack.
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from builtins import BaseExceptionGroup
else:  # pragma: no cover - trio depends on the backport there
    from exceptiongroup import BaseExceptionGroup

__all__ = ["BaseExceptionGroup", "MdnsError", "leaves"]


class MdnsError(Exception):
    """mDNS cannot run as configured (an unknown interface, or none with an IPv4 address)."""


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc`` and any groups nested in it (``[exc]`` for a plain exception)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]
