"""The one exception type for mistakes a user can fix, and how a write that found no room says so.

Library code raises UserError with a message that says what was wrong and what to do; the CLI
prints it on one line and exits with code 2. Anything else is a bug and keeps its traceback.

A write that fails for want of room (a full disk, a quota, a read-only file system) is an OSError with
that errno and the path being written: `writing(path)` makes it one, whatever the writing library raised
(Python's file write names no path; safetensors raises its own error type and numpy's tofile its own
words; torch.save loses the errno, so a full file system is asked for instead), and the CLI prints it on
one line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
"""errnos of a write the environment refused: no space, quota exceeded, read-only file system."""
FULL_BELOW_BYTES = 1 << 20
"""A file system with less than this free after a write failed without an errno was full."""


class UserError(Exception):
    """A user mistake (bad path, bad flag, bad data); the CLI shows the message and exits 2."""


class NoRoomError(OSError):
    """A write of `filename` found no room (errno one of NO_ROOM); raised by `writing`."""


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a write in the block that found no room into NoRoomError(errno, reason, path), naming `path`
    (the output the user asked for, not a temp file inside it); other errors pass unchanged, and so does
    one an inner `writing` already named."""
    try:
        yield
    except NoRoomError:
        raise
    except Exception as err:
        code = no_room_errno(err, Path(path))
        if code is None:
            raise
        raise NoRoomError(code, os.strerror(code), str(path)) from err


def no_room_errno(err: BaseException, path: Path) -> int | None:
    """The NO_ROOM errno behind a failed write of `path`, or None when the failure was something else."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno if err.errno in NO_ROOM else None
    found = re.search(r"\(os error (\d+)\)", str(err))  # Rust's io::Error, as safetensors reports it
    if found:
        return int(found.group(1)) if int(found.group(1)) in NO_ROOM else None
    if isinstance(err, OSError) and "Not enough free space" in str(err):  # numpy's tofile, before it writes
        return errno.ENOSPC
    if isinstance(err, (OSError, RuntimeError)) and _full(path):  # a short write with no errno
        return errno.ENOSPC
    return None


def _full(path: Path) -> bool:
    """Whether the file system `path` is on (or would be on) has less than FULL_BELOW_BYTES free."""
    for place in (path, *path.parents):
        with contextlib.suppress(OSError):
            if place.exists():
                st = os.statvfs(place)
                return st.f_bavail * st.f_frsize < FULL_BELOW_BYTES
    return False


class StudyRefused(UserError):
    """A comparison whose study cannot mean anything at its settings (e.g. data fractions that select the
    same documents): `adaptlab reproduce` records it as not run and goes on with the other comparisons."""
