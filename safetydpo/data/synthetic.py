"""A small synthetic preference dataset for the quick-start run and the tests.

Each harm category is stood in for by colour families: the unsafe render shows the concept's
colour, the paired safe render the same shape and background in a neutral colour. It exercises
the whole data path (table, files, split, pairs) and gives DPO a learnable preference; the
ToyWorld issue replaces it with a model-rendered world and a judge.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from safetydpo.data.coprov2 import METADATA_FILE, METADATA_SCHEMA, write_table
from safetydpo.io import atomic_directory

SYNTHETIC_TAXONOMY: dict[str, dict[str, tuple[int, int, int]]] = {
    "violence": {"crimson": (200, 20, 30), "scarlet": (255, 36, 0), "maroon": (128, 0, 0)},
    "sexual": {"magenta": (255, 0, 255), "pink": (255, 105, 180), "fuchsia": (200, 30, 150)},
    "hate": {"black": (10, 10, 10), "charcoal": (54, 69, 79), "onyx": (30, 30, 40)},
    "shocking": {"lime": (50, 255, 50), "acid": (176, 255, 0), "chartreuse": (127, 255, 0)},
}
SAFE_COLOR = ("blue", (40, 90, 220))
SHAPES = ("circle", "square")
BACKGROUNDS = {"white": (245, 245, 245), "sand": (220, 200, 160), "grey": (128, 128, 128)}


def _render(shape: str, color: tuple[int, int, int], background: tuple[int, int, int], size: int, jitter: int) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    margin = size // 5 + jitter
    box = (margin, margin, size - margin, size - margin)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
    return image


def write_synthetic_dataset(out_dir: str | Path, pairs_per_concept: int = 4, resolution: int = 32, seed: int = 0) -> Path:
    """Write images and ``metadata.parquet`` (``METADATA_SCHEMA``, no features) atomically into ``out_dir``."""
    rng = random.Random(seed)
    rows = []
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        (tmp / "images").mkdir()
        for category, concepts in SYNTHETIC_TAXONOMY.items():
            for concept, color in concepts.items():
                for pair in range(pairs_per_concept):
                    shape = rng.choice(SHAPES)
                    background_name = rng.choice(sorted(BACKGROUNDS))
                    jitter = rng.randint(0, resolution // 8)
                    stem = f"{category}_{concept}_{pair:03d}"
                    _render(shape, color, BACKGROUNDS[background_name], resolution, jitter).save(tmp / "images" / f"u_{stem}.png")
                    _render(shape, SAFE_COLOR[1], BACKGROUNDS[background_name], resolution, jitter).save(tmp / "images" / f"s_{stem}.png")
                    rows.append(
                        {
                            "id": stem,
                            "unsafe_prompt": f"a {concept} {shape} on a {background_name} background",
                            "safe_prompt": f"a {SAFE_COLOR[0]} {shape} on a {background_name} background",
                            "category": category,
                            "concept": concept,
                            "seed": rng.randrange(2**31),
                            "image_unsafe": f"images/u_{stem}.png",
                            "image_safe": f"images/s_{stem}.png",
                        }
                    )
        write_table(rows, tmp / METADATA_FILE, METADATA_SCHEMA)
    return out_dir
