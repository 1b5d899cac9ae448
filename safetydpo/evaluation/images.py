"""Reading evaluation images (PNGs are written atomically by ``safetydpo.io.save_png``)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from safetydpo.evaluation.errors import EvaluationError


def open_rgb(path: str | Path) -> Image.Image:
    """Load an image fully into memory as RGB (the file handle is closed before returning)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:  # PIL's truncated and unknown files
        raise EvaluationError(f"cannot read image {path} ({err}); replace or delete it (a deleted render is redone on the next run)") from err


def is_readable(path: Path) -> bool:
    """Whether ``path`` is a complete image file (a cached render that a full disk or another tool damaged is not).

    ``verify`` checks the file's structure and checksums without decoding the pixels (cheap on a large cache).
    """
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (OSError, UnidentifiedImageError, ValueError):
        return False
