"""Import py-libp2p without losing the application's logging configuration.

py-libp2p's ``__init__`` calls its ``setup_logging()``, which (with ``LIBP2P_DEBUG`` unset) clears the handlers of the
``libp2p`` logger, sets it to WARNING and stops it propagating. A logger with no handler that does not propagate hands
its records to :data:`logging.lastResort`, so every routine warning of py-libp2p (a failed dial, a closed stream, with
its traceback) landed on stderr, whatever level the CLI had set before the first import. Merely putting propagation
back is no better: some py-libp2p modules set their own logger to INFO, and a parent's level does not stop what its
children propagate, so their chatter would reach the application's handlers.

Import this module before anything from ``libp2p``. Afterwards the ``libp2p`` logger keeps the level the application
gave it (py-libp2p's WARNING if none; the CLI sets CRITICAL unless ``-vv``) and the handlers it had, and, instead of
propagating, hands the records at or above its current level to the root logger's handlers
(:class:`_ToApplication`), so that level is the one threshold for everything under ``libp2p``.
"""

from __future__ import annotations

import logging
import sys

_logger = logging.getLogger("libp2p")
_first_import = "libp2p" not in sys.modules
_saved = (_logger.level, _logger.propagate, list(_logger.handlers))


class _ToApplication(logging.Handler):
    """Passes py-libp2p's records at or above the ``libp2p`` logger's level to the root logger's handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= _logger.getEffectiveLevel():
            logging.getLogger().handle(record)


import libp2p  # noqa: F401  (the import whose side effect is undone below)

if _first_import:
    level, propagate, handlers = _saved
    _logger.setLevel(level if level != logging.NOTSET else logging.WARNING)
    _logger.handlers[:] = handlers + ([_ToApplication()] if propagate else [])
    _logger.propagate = False


PINNED = "0.8.1"  # the version mesh/_pubsub.py and mesh/_streams.py patch (pyproject.toml pins it)


def is_pinned(what: str) -> bool:
    """Whether the installed py-libp2p is :data:`PINNED`; if not, log that ``what`` stays unpatched."""
    from importlib.metadata import version

    found = version("libp2p")
    if found != PINNED:
        logging.getLogger(__name__).warning("py-libp2p %s is not the pinned %s: %s stays unpatched", found, PINNED,
                                            what)
    return found == PINNED
