"""Progress lines on a stream (stderr) while memopt plans: the shell door's view of the pipeline's log.

The pipeline logs a record as each pass starts and one as it ends (logger
``memopt.pipeline``, fields ``memopt_pass`` and ``memopt_seconds``; ``timed``
logs any block the same way). Under ``show_progress()``, a pass still running
after ``after_s`` seconds gets a line saying so, and its end a line with the
time it took; other INFO records of the ``memopt`` loggers (a Pareto sweep's
points) are written as they come. Passes that end sooner say nothing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import TextIO


class ProgressHandler(logging.Handler):
    """Writes ``memopt [elapsed] ...`` lines for slow passes and for INFO records to ``stream``."""

    def __init__(self, stream: TextIO, *, after_s: float = 1.0) -> None:
        super().__init__(logging.DEBUG)
        self.stream, self.after_s = stream, after_s
        self._timers: dict[str, threading.Timer] = {}
        self._announced: set[str] = set()
        self._write_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._started = time.perf_counter()

    def emit(self, record: logging.LogRecord) -> None:
        name = getattr(record, "memopt_pass", None)
        if name is None:
            if record.levelno >= logging.INFO:
                self._write(record.getMessage())
            return
        seconds = getattr(record, "memopt_seconds", None)
        if seconds is None:  # a pass starts: say so if it is still running after `after_s`
            timer = threading.Timer(self.after_s, self._still_running, (name,))
            timer.daemon = True
            with self._state_lock:
                self._timers[name] = timer
            timer.start()
            return
        with self._state_lock:
            timer = self._timers.pop(name, None)
            announced = name in self._announced
            self._announced.discard(name)
        if timer is not None:
            timer.cancel()
        if seconds >= self.after_s or announced:
            self._write(f"{name} done in {seconds:.1f} s")

    def _still_running(self, name: str) -> None:
        with self._state_lock:
            if name not in self._timers:
                return
            self._announced.add(name)
        self._write(f"{name} running ...")

    def _write(self, text: str) -> None:
        with self._write_lock:
            self.stream.write(f"memopt [{time.perf_counter() - self._started:6.1f} s] {text}\n")
            self.stream.flush()

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        super().close()


@contextlib.contextmanager
def timed(name: str, logger: logging.Logger) -> Iterator[None]:
    """Log the block as the pipeline logs a pass (start, end), so that ``show_progress`` reports it when slow."""
    logger.debug("%s started", name, extra={"memopt_pass": name, "memopt_seconds": None})
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - started
        logger.log(logging.INFO if seconds >= 1.0 else logging.DEBUG, "%s took %.1f s", name, seconds,
                   extra={"memopt_pass": name, "memopt_seconds": seconds})


@contextlib.contextmanager
def show_progress(stream: TextIO, *, after_s: float = 1.0) -> Iterator[ProgressHandler]:
    """Within the block, memopt's slow passes and INFO records show on ``stream``; restored after."""
    logger = logging.getLogger("memopt")
    handler = ProgressHandler(stream, after_s=after_s)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()
