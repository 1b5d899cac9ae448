"""One build or import per output folder: a second concurrent one would delete the first one's temporary files."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetydpo.data.builder.errors import BuildError
from safetydpo.locking import output_lock as hold_lock


@contextmanager
def output_lock(root: Path, what: str = "build") -> Iterator[None]:
    """Hold ``root/.build/lock`` (see :func:`safetydpo.locking.output_lock`); a held lock is a :class:`BuildError`."""
    with hold_lock(root / ".build" / "lock", what, BuildError):
        yield
