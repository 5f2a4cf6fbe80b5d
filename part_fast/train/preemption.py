"""Stopping cleanly when asked: SIGTERM (what SLURM, Kubernetes and torchrun send before they kill a job)
and SIGINT (Ctrl-C).

The handler only records the request; the trainer reads it between optimiser steps, finishes the step it
is in, writes a checkpoint of the exact state and raises `Interrupted`. Under torchrun the request travels
with the per-step collective, so every rank stops after the same step even when only one was signalled.

Signals come in pairs in a process tree: Ctrl-C reaches torchrun and its workers, and torchrun forwards it
to the workers again; a scheduler may signal every process of a job and the launcher forward it too. So a
repeated SIGTERM is the same request (the launcher's SIGKILL after its grace period is the hard stop), and
a second SIGINT counts as "stop now, unsaved" only when it comes more than REPEAT_WINDOW seconds after the
first: Ctrl-C pressed again by a person, not forwarded by a launcher.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW = 1.0  # seconds: a SIGINT sooner after the first is the same Ctrl-C, forwarded
_clock = time.monotonic


class StopRequest:
    """The first stop signal received, if any."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.at: float | None = None  # when it came (_clock)

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def stop_requests(announce: bool = True) -> Iterator[StopRequest]:
    """Handle SIGTERM and SIGINT inside the block by setting the yielded request; the caller's handlers are
    restored afterwards. Off the main thread (where Python cannot install handlers) the request is never
    set and signals keep their usual effect."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def handler(signum, _frame):
        if request.signum is not None:
            if signum == signal.SIGINT and _clock() - request.at > REPEAT_WINDOW:  # Ctrl-C again: stop now
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            return  # the same request again (forwarded by a launcher, or a repeated SIGTERM)
        request.signum, request.at = signum, _clock()
        if announce:
            # os.write, not print: a handler may interrupt a print to the same stream.
            name = signal.Signals(signum).name
            again = "; press Ctrl-C again to stop at once, unsaved" if signum == signal.SIGINT else ""
            os.write(2, f"part-fast: {name} received: stopping after this step and writing a checkpoint{again}\n"
                     .encode())

    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: a terminal's Ctrl-C and a scheduler's SIGTERM reach every process of the
    job, and a data worker dying of them would fail the step the main process is finishing. The main
    process decides when to stop; its workers end with it."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
