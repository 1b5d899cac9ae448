"""Fingerprints and stage records: what lets a rerun skip every step whose config and inputs are unchanged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from safetydpo.io import write_json_atomic

RECORD_FORMAT = "safetydpo.stage/1"


def digest(value: Any) -> str:
    """SHA-256 of ``value`` as canonical JSON (sorted keys; paths and other objects as strings)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks (dataset tables can be large)."""
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def model_fingerprint(base_model: str) -> dict[str, Any]:
    """A local pipeline folder by its index file and each file's size; a hub id by its name.

    Sizes, not contents: hashing gigabytes of weights on every run would cost minutes, and a
    retrained model written over the same folder changes ``model_index.json`` or a size in practice.
    """
    folder = Path(base_model).expanduser()
    if not folder.is_dir():
        return {"hub_id": base_model}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    index = folder / "model_index.json"
    return {
        "folder": str(folder.resolve()),
        "model_index": file_digest(index) if index.is_file() else None,
        "sizes": {str(p.relative_to(folder)): p.stat().st_size for p in files},
    }


def record_path(output: Path) -> Path:
    """Where a step's record lives: beside its main output (``experts/hate.safetensors`` -> ``experts/hate.stage.json``)."""
    return output.with_name(output.name.split(".")[0] + ".stage.json")


def is_current(output: Path, step_hash: str, outputs: list[Path]) -> bool:
    """Whether the step that writes ``output`` finished with exactly this config and these inputs."""
    path = record_path(output)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return record.get("hash") == step_hash and all(p.exists() for p in outputs)


def write_record(output: Path, step: str, step_hash: str, fingerprint: dict[str, Any], seconds: float) -> None:
    """Mark the step finished, atomically, after all of its outputs are on disk."""
    write_json_atomic(
        record_path(output),
        {"format": RECORD_FORMAT, "step": step, "hash": step_hash, "seconds": round(seconds, 1), "fingerprint": fingerprint},
    )
