"""The dataset card (README.md) that makes a build folder a Hugging Face ``datasets`` repository."""

from __future__ import annotations

from pathlib import Path

import yaml

from safetydpo.data.builder.config import BuildConfig
from safetydpo.data.builder.manifest import Manifest
from safetydpo.data.coprov2 import METADATA_FILE, PAIRS_FILE
from safetydpo.io import atomic_file

CARD_FILE = "README.md"


def write_card(root: Path, config: BuildConfig, manifest: Manifest) -> None:
    """``load_dataset(root)`` reads ``metadata.parquet`` (config ``default``) or ``pairs.parquet`` (config ``pairs``)."""
    header = {
        "configs": [
            {"config_name": "default", "data_files": [{"split": "train", "path": METADATA_FILE}]},
            {"config_name": "pairs", "data_files": [{"split": "train", "path": PAIRS_FILE}]},
        ],
        "tags": ["safety", "preference", "text-to-image", "coprov2"],
    }
    render = config.render
    generator = config.generator.get("name", "template")
    source = f"the pair table {config.pairs_from}" if config.pairs_from else f"taxonomy {config.taxonomy} (generator {generator})"
    body = (
        "# CoProV2-format preference pairs\n\n"
        f"Built by `safetydpo data build`: {manifest.num_rows} pairs from {source}, rendered by `{render.base_model}` "
        f"({render.steps} steps, guidance {render.guidance_scale}, seed {render.seed}).\n\n"
        "Each row holds an unsafe prompt, its minimally different safe prompt, both renders (same seed and "
        "settings) and a `features` shard with the final latents and the unsafe prompt's text embeddings. "
        "Train with `safetydpo.data.CoProV2DataModule(data_dir=<this folder>)`; see `manifest.json` for the "
        "full build config and the generation report.\n"
    )
    with atomic_file(root / CARD_FILE) as tmp:
        tmp.write_text(f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n\n{body}", encoding="utf-8")
