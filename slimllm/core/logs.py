"""Quieting other libraries' loggers for the length of one call, never for good.

    >>> with quiet_loggers("gguf", level=logging.WARNING):
    ...     writer.write_tensors_to_file()

Also a decorator: `@quiet_loggers("gguf.vocab")` quiets them while the function runs. The previous levels come back
afterwards, so a user's own logging configuration survives slimllm's calls.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise these loggers (the root logger for "") to `level` inside the block, then restore their own levels."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(level, logger.level))
    try:
        yield
    finally:
        for logger, previous in zip(loggers, levels, strict=True):
            logger.setLevel(previous)
