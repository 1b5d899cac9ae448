"""PNG grids: one row per (prompt, seed), one column per model, so each row compares models on identical noise."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from safetydpo.evaluation.images import open_rgb
from safetydpo.io import save_png

_LABEL_WIDTH = 120
_HEADER_HEIGHT = 24
_PAD = 4


def grid_image(columns: Sequence[str], rows: Sequence[tuple[str, Sequence[Path | Image.Image]]], cell_size: int) -> Image.Image:
    """``rows`` are (label, one image or image file per column); images are resized to ``cell_size`` squares."""
    font = ImageFont.load_default()
    width = _LABEL_WIDTH + len(columns) * (cell_size + _PAD)
    height = _HEADER_HEIGHT + len(rows) * (cell_size + _PAD)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for column, name in enumerate(columns):
        draw.text((_LABEL_WIDTH + column * (cell_size + _PAD) + _PAD, _PAD), name, fill="black", font=font)
    for row, (label, paths) in enumerate(rows):
        top = _HEADER_HEIGHT + row * (cell_size + _PAD)
        draw.text((_PAD, top + cell_size // 2), label, fill="black", font=font)
        for column, path in enumerate(paths):
            image = path.convert("RGB") if isinstance(path, Image.Image) else open_rgb(path)
            canvas.paste(image.resize((cell_size, cell_size), Image.Resampling.LANCZOS), (_LABEL_WIDTH + column * (cell_size + _PAD), top))
    return canvas


def write_grid(columns: Sequence[str], rows: Sequence[tuple[str, Sequence[Path | Image.Image]]], out_path: Path, cell_size: int) -> Path:
    """The grid of :func:`grid_image` written atomically as a PNG."""
    return save_png(grid_image(columns, rows, cell_size), out_path)
