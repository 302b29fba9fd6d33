"""Import py-libp2p without losing the application's logging configuration.

py-libp2p's ``__init__`` calls its ``setup_logging()``, which (with ``LIBP2P_DEBUG`` unset) clears the handlers of the
``libp2p`` logger, sets it to WARNING and stops it propagating. A logger with no handler that does not propagate hands
its records to :data:`logging.lastResort`, so every routine warning of py-libp2p (a failed dial, a closed stream, with
its traceback) landed on stderr, whatever level the CLI had set before the first import. Import this module before
anything from ``libp2p``: it puts back the level, handlers and propagation that the ``libp2p`` logger had before, so the
application's ``logging`` configuration decides (the CLI keeps py-libp2p at CRITICAL unless ``-vv``).
"""

from __future__ import annotations

import logging
import sys

_logger = logging.getLogger("libp2p")
_first_import = "libp2p" not in sys.modules
_saved = (_logger.level, _logger.propagate, list(_logger.handlers))

import libp2p  # noqa: F401  (the import whose side effect is undone below)

if _first_import:
    _logger.setLevel(_saved[0])
    _logger.propagate = _saved[1]
    _logger.handlers[:] = _saved[2]
