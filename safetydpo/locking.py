"""One writer per output: a second concurrent run into the same folder would mix its files with the first's."""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: The lock file a command holds inside (or beside) the output it writes.
LOCK_NAME = ".safetydpo.lock"


class LockHeldError(ValueError):
    """Another process is writing the same output."""


@contextmanager
def output_lock(lock: Path, what: str, error: type[ValueError] = LockHeldError) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock``, or raise ``error`` at once naming the process that holds it.

    The holder's pid and command line are written into the file for that message; the OS drops the
    lock when the process dies, even by SIGKILL, so a crashed run never blocks the next one. Folders
    the lock created are removed again if the run wrote nothing into them (a run refused at its start
    leaves nothing behind).
    """
    created = [folder for folder in (lock.parent, *lock.parent.parents) if not folder.exists()]
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = lock.open("a+", encoding="utf-8")
    except OSError as err:
        raise error(f"cannot write {lock.parent} (for the {what} lock): {err}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise error(
                f"another {what} is writing {lock.parent} (held by {holder}; lock {lock}); "
                "wait for it to finish or write somewhere else"
            ) from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}: {' '.join(sys.argv)}\n")
        handle.flush()
        try:
            yield
        finally:
            if created and lock.parent.is_dir() and [child.name for child in lock.parent.iterdir()] == [lock.name]:
                lock.unlink()
                for folder in created:  # deepest first; stops at the first one the run wrote into
                    try:
                        folder.rmdir()
                    except OSError:
                        break
            fcntl.flock(handle, fcntl.LOCK_UN)
