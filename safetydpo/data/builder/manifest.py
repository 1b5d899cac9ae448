"""The build manifest: the config a folder was built with and which shards are committed.

A shard counts as written only once the manifest lists it; the manifest is replaced atomically
after the shard's images and features are on disk, so a build killed at any point resumes at the
first shard it does not list and never keeps a half-written one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetydpo.data.builder.errors import BuildError
from safetydpo.io import write_json_atomic

MANIFEST_FILE = "manifest.json"
FORMAT = "safetydpo.coprov2-build/1"


@dataclass
class Manifest:
    """``config``: the build's fingerprint; ``pairs``: generation report once ``pairs.parquet`` is final."""

    config: dict[str, Any]
    pairs: dict[str, Any] | None = None
    num_rows: int = 0
    num_shards: int = 0
    committed: list[int] = field(default_factory=list)
    complete: bool = False

    def save(self, root: Path) -> None:
        write_json_atomic(root / MANIFEST_FILE, {"format": FORMAT, **asdict(self)})


def read_manifest(root: Path) -> Manifest | None:
    path = root / MANIFEST_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.pop("format", None) != FORMAT:
        raise BuildError(f"{path} is not a {FORMAT} manifest")
    return Manifest(**data)


def _differences(stored: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(current, dict):
        keys = sorted(set(stored) | set(current))
        return [d for key in keys for d in _differences(stored.get(key), current.get(key), f"{prefix}{key}.")]
    return [] if stored == current else [prefix.rstrip(".")]


def open_manifest(root: Path, fingerprint: dict[str, Any]) -> Manifest:
    """The folder's manifest, new for a new folder; refuses a folder built with a different config."""
    manifest = read_manifest(root)
    if manifest is None:
        if root.is_dir() and any(child.name != ".build" for child in root.iterdir()):
            raise BuildError(f"output {root} is not empty and has no {MANIFEST_FILE}; choose a new output folder")
        return Manifest(config=fingerprint)
    changed = _differences(manifest.config, json.loads(json.dumps(fingerprint)))
    if changed:
        raise BuildError(
            f"output {root} was built with a different config (changed: {', '.join(changed)}); "
            "restore it or choose a new output folder"
        )
    return manifest
