"""Where part_fast's messages go: the standard `logging` module, one logger per module (all under "part_fast").

As a library part_fast installs no handler: what it logs at INFO (the trainer's epoch lines, the check's
verdicts, the demo's steps) reaches whatever handlers its user configured, e.g.
`logging.basicConfig(level=logging.INFO, format="%(message)s")`; with none configured only warnings show,
on stderr (Python's last-resort handler). The `part-fast` command runs inside `console()`, which prints what
the command always printed: INFO lines on stdout, warnings and errors on stderr, each a plain message.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

ROOT = "part_fast"


class ConsoleHandler(logging.Handler):
    """Plain messages: below WARNING to stdout, WARNING and above to stderr. Each line goes out in one write
    (under torchrun the ranks share one pipe, so a message and its newline written apart could interleave
    with another rank's), and the stream is looked up per record, so a redirected sys.stdout is followed."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's contract: a failing handler reports, never raises
            self.handleError(record)


@contextlib.contextmanager
def console(level: int = logging.INFO) -> Iterator[None]:
    """Print part_fast's messages at `level` and above on the console (see ConsoleHandler) for the duration,
    then restore the logger as it was: the command line's output, and a script's if it wants the same.

    Args:
        level: the lowest level printed (logging.INFO: everything the command line shows).
    """
    logger = logging.getLogger(ROOT)
    handler, old_level = ConsoleHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@contextlib.contextmanager
def watching(name: str, observe, prefix: str = "") -> Iterator[None]:
    """For the duration, hand every line logger `name` logs below WARNING to `observe` (even when nothing prints
    it) and print it with `prefix` before it: how the demo watches the trainer's epoch lines and indents them
    under its own. The logger's level and filters are restored afterwards.

    Args:
        name: the logger watched (its own records only, not its children's).
        observe: called with each message, formatted.
        prefix: put before each message the handlers then print.
    """
    logger = logging.getLogger(name)
    line_filter, old_level = _LineFilter(observe, prefix), logger.level
    logger.addFilter(line_filter)
    if not logger.isEnabledFor(logging.INFO):
        logger.setLevel(logging.INFO)  # INFO records are made only when enabled, and `observe` needs them
    try:
        yield
    finally:
        logger.removeFilter(line_filter)
        logger.setLevel(old_level)


class _LineFilter(logging.Filter):
    def __init__(self, observe, prefix: str):
        super().__init__()
        self.observe, self.prefix = observe, prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            message = record.getMessage()
            self.observe(message)
            record.msg, record.args = self.prefix + message, None
        return True
