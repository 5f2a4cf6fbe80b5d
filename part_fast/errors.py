"""The errors part_fast reports to a person, and the exit codes the command line gives them.

| exit | meaning |
|---|---|
| 0 | done |
| 1 | an internal error (a bug: the traceback is printed) |
| 2 | a user error: bad input, a missing or damaged file, a full disk (one line, no traceback) |
| 3 | training diverged (NaN/inf loss or weights); the last good checkpoint is kept |
| 128 + signal | stopped by a signal: 130 (SIGINT), 143 (SIGTERM); the line printed says which checkpoint holds the state |
"""
from __future__ import annotations

import signal
import sys

def report(line: str) -> None:
    """One line to stderr in one write: print() writes the text and the newline separately, and under
    torchrun the ranks share one pipe, so their lines would interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3


class UserError(Exception):
    """Something the user can fix: printed as one line, exit code 2."""


class ConfigError(UserError, ValueError):
    """A setting that cannot be (a value out of range, a name that does not exist, a combination refused)."""


class DataError(UserError, ValueError):
    """Data on disk that cannot be read as the dataset it should be (no images, mixed sizes, a bad line)."""


class OutputWriteError(UserError, OSError):
    """A log or report in RUN_DIR could not be written (e.g. the disk is full)."""


# What the command line reports as a user error (one line, exit 2), and what the trainer's process-group
# session treats as one: the library's own errors and a missing or existing file. A bare ValueError is not
# one: from the command line it can only be a bug, and it keeps its traceback.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError)


class CheckpointError(UserError):
    """A checkpoint is missing, damaged (truncated, failed CRC), or not a part_fast checkpoint."""


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is intact."""


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite; the last good checkpoint is kept."""


class Interrupted(Exception):
    """Training stopped on SIGTERM / SIGINT after writing a checkpoint of the exact state it reached."""

    def __init__(self, signum: int, checkpoint: str, global_step: int, where: str):
        self.signum = int(signum)
        self.checkpoint = checkpoint
        self.global_step = global_step
        super().__init__(f"stopped by {signal.Signals(self.signum).name} after step {global_step} ({where}); "
                         f"checkpoint {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
