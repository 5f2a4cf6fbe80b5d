"""Writing the files a user keeps (checkpoints, logs, reports, figures) so that none is ever half-written.

Every write goes to a temporary file beside the target, is flushed and fsync'ed, renamed over the target
(atomic on POSIX), and the folder is fsync'ed so the rename itself survives a power cut. A reader, or a
crash at any instant, sees the old file or the new one. A failed write (a full disk raises ENOSPC) leaves
the target as it was and removes the temporary file.
"""
from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

_TEMP_MARK = ".tmp-"


class NotDurable(OSError):
    """The new file is in place, but its folder could not be fsync'ed: a power cut may still undo the rename."""


def temp_path_for(path: Path) -> Path:
    """The temporary name this process writes `path` under (hidden, beside it, tagged with our pid)."""
    return path.with_name(f".{path.name}{_TEMP_MARK}{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    """Make the renames inside `folder` durable. Some filesystems cannot fsync a directory; there the
    rename is as durable as that filesystem makes it, which is all one can have."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EPERM):
            raise
    finally:
        os.close(fd)


def _keep_as(path: Path, previous: Path) -> None:
    """Make `previous` the current `path` while `path` stays in place: a hard link renamed over `previous`,
    so at every instant both names hold a whole file. Without hard links (some network filesystems) the file
    is moved, and for a moment only `previous` exists; readers fall back to it."""
    link = temp_path_for(previous)
    if link.exists():
        link.unlink()
    try:
        os.link(path, link)
    except OSError:
        os.replace(path, previous)
        return
    os.replace(link, previous)


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[BinaryIO], Any], *,
                       keep_previous: str | os.PathLike | None = None) -> None:
    """write(file) into a temporary file beside `path`, fsync it, then rename it over `path`.

    keep_previous: a second name (e.g. RUN_DIR/previous.pt) that receives the file `path` held before, so
    the last two good versions exist side by side."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            _keep_as(path, Path(keep_previous))
        os.replace(tmp, path)
        try:
            fsync_dir(path.parent)
        except OSError as err:
            raise NotDurable(err.errno, err.strerror) from err
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """JSON with a final newline. Values JSON cannot represent raise (nothing is silently stringified)."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


class MarkersMissing(ValueError):
    """A file lacks a (start, end) marker pair that a generated block should go between."""


def read_with_markers(path: str | os.PathLike, markers: Iterable[tuple[str, str]]) -> str:
    """The text of `path`, after checking that it holds every (start, end) marker pair, start first.
    MarkersMissing names the first pair that is not there, so a caller can check before hours of work."""
    text = Path(path).read_text()
    for start, end in markers:
        if start not in text or end not in text or text.index(start) > text.index(end):
            raise MarkersMissing(f"{path} has no {start} ... {end} block to fill: add the two markers where the "
                                 "generated text should go")
    return text


def replace_between_markers(path: str | os.PathLike, blocks: Mapping[tuple[str, str], str]) -> None:
    """Replace what stands between each (start, end) marker pair of `path` with its body, on lines of its own
    between the kept markers, in one atomic write; the rest of the file is kept as it was. A missing pair
    raises MarkersMissing before anything is written."""
    text = read_with_markers(path, list(blocks))
    for (start, end), body in blocks.items():
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{body}\n{end}{tail}"
    atomic_write_text(path, text)


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that processes killed mid-write left in `folder` (their pid is gone);
    returns what was deleted. A live process's temporary file is left alone."""
    removed = []
    for candidate in Path(folder).glob(f".*{_TEMP_MARK}*"):
        pid_text = candidate.name.rsplit(_TEMP_MARK, 1)[-1]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid != os.getpid() and _pid_alive(pid):
            continue
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
