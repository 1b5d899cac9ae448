"""Atomic file writes: a crash mid-write never leaves a half-written checkpoint, LoRA or dataset."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from PIL import Image


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600, and so do writers that replace ``tmp`` with their own temporary file
        # (safetensors' save_file): give the file the umask's permissions, so a cluster group can read it.
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_current_umask())
    try:
        yield tmp
        if path.exists():
            backup = path.with_name(f".{path.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(path, backup)
            os.replace(tmp, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` as PNG through a temporary file renamed into place."""
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


class OverlappedWrites:
    """Writes one batch of files on a background thread while the caller computes the next batch.

    PNG encoding (zlib) runs outside the GIL, so it overlaps denoising. At most one batch is in flight:
    a failed write (a full disk) stops the run one batch later, and leaving the block waits for every write.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1)
        self._pending: list[Future[object]] = []

    def submit_batch(self, writes: list[Callable[[], object]]) -> None:
        """Wait for the previous batch's writes (raising their error), then start these."""
        self.wait()
        self._pending = [self._pool.submit(write) for write in writes]

    def wait(self) -> None:
        """Block until every submitted write is done; the first failure is raised."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def __enter__(self) -> OverlappedWrites:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)


def check_writable(directory: Path) -> None:
    """Fail before training, not after hours of it, when an output folder cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OSError(f"output directory {directory} is not writable: {err}") from err


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON through :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def read_yaml(path: str | Path, what: str, error: type[ValueError] = ValueError) -> Any:
    """Parse a YAML file, raising ``error`` with a one-line message that names ``what`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise error(f"{what} {path} is not valid YAML: {' '.join(str(err).split())}") from None
