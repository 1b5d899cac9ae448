"""safetydpo.io: PNG writes overlapped with the next batch's work, and their failures surfacing."""

from __future__ import annotations

import threading
from functools import partial
from pathlib import Path

import pytest
from PIL import Image

from safetydpo.io import OverlappedWrites, save_png


def test_overlapped_writes_finish_on_exit_and_a_failure_stops_the_next_batch(tmp_path: Path) -> None:
    release = threading.Event()
    image = Image.new("RGB", (4, 4), (200, 10, 10))

    def slow_png(path: Path) -> Path:
        release.wait(timeout=10)
        return save_png(image, path)

    with OverlappedWrites() as writes:
        writes.submit_batch([partial(slow_png, tmp_path / f"{i}.png") for i in range(3)])
        assert not any((tmp_path / f"{i}.png").exists() for i in range(3))  # the caller goes on while the batch writes
        release.set()
    assert [Image.open(tmp_path / f"{i}.png").getpixel((0, 0)) for i in range(3)] == [(200, 10, 10)] * 3

    def full_disk() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"), OverlappedWrites() as writes:
        writes.submit_batch([full_disk])
        writes.submit_batch([partial(save_png, image, tmp_path / "after.png")])  # waits for the failed batch first
    assert not (tmp_path / "after.png").exists()
