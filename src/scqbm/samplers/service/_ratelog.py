"""Rate-limited logging: a flood of bad requests must not become a flood of log lines.

Every malformed HTTP request makes uvicorn log a warning, and every request to a backend that
cannot run would log an error: a client sending garbage in a loop would fill the disk at the
speed of the network. :class:`RateLimitedLog` lets one line per message through every
``interval`` seconds and counts the others; the next line that gets through says how many
were suppressed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

#: Seconds between two log lines with the same message about bad requests.
LOG_INTERVAL = 10.0
#: Distinct messages tracked at once (messages are format strings, so this is plenty).
_MAX_MESSAGES = 256


class RateLimitedLog:
    """A logger front that emits each message at most once per ``interval`` seconds.

    Messages are told apart by their format string (``msg``), not by their arguments, so
    ``"backend %r failed: %s"`` is one message whatever the error. A line that follows
    suppressed ones ends with ``(N more like this in the last S s)``. Attributes other than
    the logging methods are those of the wrapped logger, so it can stand in for a
    :class:`logging.Logger` (uvicorn's protocols call ``self.logger.warning(...)``).

    Parameters
    ----------
    logger
        The logger written to.
    interval
        Seconds between two lines with the same message.
    clock
        Monotonic clock (replaceable in tests).

    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.logger, self.interval, self._clock = logger, float(interval), clock
        self._seen: dict[str, tuple[float, int]] = {}  # msg -> (last emitted, suppressed)
        self._lock = threading.Lock()

    def suppressed(self, msg: str) -> int:
        """Lines with this message suppressed since the last one emitted."""
        with self._lock:
            return self._seen.get(msg, (0.0, 0))[1]

    def log(self, level: int, msg: str, *args, **kwargs) -> bool:
        """Log like :meth:`logging.Logger.log` unless throttled; ``True`` if emitted."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        with self._lock:
            last, suppressed = self._seen.get(msg, (None, 0))
            if last is not None and now - last < self.interval:
                self._seen[msg] = (last, suppressed + 1)
                return False
            if len(self._seen) >= _MAX_MESSAGES and msg not in self._seen:
                self._seen.pop(next(iter(self._seen)))
            self._seen[msg] = (now, 0)
        if suppressed:
            if not args:  # `msg` was not a format string: keep its own percent signs
                msg = msg.replace("%", "%%")
            msg = f"{msg} (%d more like this in the last %.0f s)"
            args = (*args, suppressed, now - last)
        self.logger.log(level, msg, *args, **kwargs)
        return True

    def debug(self, msg, *args, **kwargs):
        return self.log(logging.DEBUG, msg, *args, **kwargs)

    def info(self, msg, *args, **kwargs):
        return self.log(logging.INFO, msg, *args, **kwargs)

    def warning(self, msg, *args, **kwargs):
        return self.log(logging.WARNING, msg, *args, **kwargs)

    def error(self, msg, *args, **kwargs):
        return self.log(logging.ERROR, msg, *args, **kwargs)

    def exception(self, msg, *args, exc_info=True, **kwargs):
        return self.log(logging.ERROR, msg, *args, exc_info=exc_info, **kwargs)

    def __getattr__(self, name):
        if name == "logger":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.logger, name)
