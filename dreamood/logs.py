"""Where the ``dreamood`` logger's messages go when the library runs as a command (``dreamood``, ``dreamood demo``).

As a library, dreamood only logs through ``logging.getLogger("dreamood...")`` and leaves the output to the
application. The commands show those messages (stage headers, plans, skipped stages) on stderr, one line each,
and turn them down with ``-q``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

__all__ = ["log_to_stderr"]


@contextlib.contextmanager
def log_to_stderr(level: int = logging.INFO) -> Iterator[None]:
    """Show the ``dreamood`` logger's messages of ``level`` and above on stderr inside the block.

    The handler is removed and the logger's level and propagation restored on exit.

    Args:
        level: The lowest level shown (``logging.WARNING`` for a quiet command).

    Yields:
        Nothing; the block runs with the handler in place.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("dreamood")
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
