"""``safetydpo data build``: taxonomy -> prompt pairs -> paired renders -> a CoProV2 dataset folder."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import typing
from functools import partial
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from safetydpo.data.builder.card import write_card
from safetydpo.data.builder.config import BuildConfig
from safetydpo.data.builder.errors import BuildError
from safetydpo.data.builder.generators import PairGenerator, build_generator
from safetydpo.data.builder.lock import output_lock
from safetydpo.data.builder.manifest import MANIFEST_FILE, Manifest, open_manifest
from safetydpo.data.builder.pair_table import read_pair_table
from safetydpo.data.builder.pairs import generate_pairs
from safetydpo.data.builder.render import PairRenderer
from safetydpo.data.builder.taxonomy_file import load_taxonomy
from safetydpo.data.builder.validation import PairValidator
from safetydpo.data.coprov2 import (
    FEATURES_COLUMN,
    METADATA_FILE,
    METADATA_SCHEMA,
    PAIR_COLUMNS,
    PAIR_SCHEMA,
    PAIRS_FILE,
    feature_name,
    image_paths,
    read_table,
    shard_path,
    write_table,
)
from safetydpo.distributed import Ranks, launch
from safetydpo.io import OverlappedWrites, atomic_file, save_png
from safetydpo.seeding import derive_seed
from safetydpo.progress import progress_bar


#: Marks of shards rendered but not yet in the manifest: any rank writes one, rank 0 alone commits it.
RENDERED_DIR = ".build/rendered"


@dataclass
class BuildResult:
    """What a finished build holds and what generation rejected on the way."""

    output: Path
    rows: int
    shards: int
    rendered_shards: int
    generation: dict[str, Any]


def _pair_rows(config: BuildConfig, root: Path, manifest: Manifest, generator: PairGenerator | None) -> list[dict[str, Any]]:
    """The pair table: read back when final, else imported or generated, and made final."""
    if manifest.pairs is not None:
        return read_table(root / PAIRS_FILE, PAIR_COLUMNS, error=BuildError)
    if config.pairs_from is not None:
        rows = read_pair_table(Path(config.pairs_from))
        report: dict[str, Any] = {"source": config.pairs_from, "accepted": len(rows)}
    elif config.taxonomy is not None and generator is not None:
        settings = config.pairs
        rows, report = generate_pairs(
            root,
            load_taxonomy(config.taxonomy),
            generator,
            PairValidator(min_similarity=settings.min_similarity, max_words=settings.max_words),
            per_concept=settings.per_concept,
            attempts_per_pair=settings.attempts_per_pair,
            batch_size=settings.batch_size,
        )
    else:  # only a BuildConfig made in code can get here; load_build_config checks this
        raise BuildError("set exactly one of 'taxonomy' (generate pairs) and 'pairs_from' (an imported pairs table)")
    if not rows:
        raise BuildError(
            f"the generator produced no valid pair from {report['candidates']} candidates (rejected: {report['rejected']}); "
            "change the generator or pairs settings and build into a new folder"
        )
    write_table(rows, root / PAIRS_FILE, PAIR_SCHEMA)
    manifest.pairs = report
    manifest.num_rows = len(rows)
    manifest.num_shards = -(-len(rows) // config.render.shard_size)
    manifest.save(root)
    return rows


def _metadata_row(pair: dict[str, Any], shard: int, base_seed: int) -> dict[str, Any]:
    image_unsafe, image_safe = image_paths(pair["category"], pair["id"])
    seed = derive_seed(base_seed, pair["id"])
    return {**pair, "seed": seed, "image_unsafe": image_unsafe, "image_safe": image_safe, FEATURES_COLUMN: shard_path(shard)}


def _shards(pairs: list[dict[str, Any]], config: BuildConfig) -> list[list[dict[str, Any]]]:
    """Metadata rows grouped by features shard: pair ``i`` goes to shard ``i // shard_size``."""
    size, seed = config.render.shard_size, config.render.seed
    return [[_metadata_row(pair, start // size, seed) for pair in pairs[start : start + size]] for start in range(0, len(pairs), size)]


def _render_shard(renderer: PairRenderer, root: Path, rows: list[dict[str, Any]], batch_size: int, progress: Any) -> None:
    """Write the shard's PNGs (encoded while the next batch renders), then its features file; each file appears atomically."""
    tensors = {}
    with OverlappedWrites() as writes:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            rendered = renderer.render([r["unsafe_prompt"] for r in batch], [r["safe_prompt"] for r in batch], [r["seed"] for r in batch])
            writes.submit_batch([
                partial(save_png, image, root / relative)
                for i, row in enumerate(batch)
                for image, relative in ((rendered.unsafe_images[i], row["image_unsafe"]), (rendered.safe_images[i], row["image_safe"]))
            ])
            for i, row in enumerate(batch):
                tensors[feature_name(row["id"], "latent_unsafe")] = rendered.unsafe_latents[i].contiguous()
                tensors[feature_name(row["id"], "latent_safe")] = rendered.safe_latents[i].contiguous()
                tensors[feature_name(row["id"], "prompt_embeds")] = rendered.unsafe_embeds[i].contiguous()
                if rendered.unsafe_pooled is not None:
                    tensors[feature_name(row["id"], "pooled_prompt_embeds")] = rendered.unsafe_pooled[i].contiguous()
            progress.update(len(batch))
    with atomic_file(root / rows[0][FEATURES_COLUMN]) as tmp:
        save_file(tensors, str(tmp))


def _write_metadata(root: Path, shards: list[list[dict[str, Any]]], committed: list[int]) -> None:
    """metadata.parquet = the committed shards' rows, in shard order (rewritten whole, atomically)."""
    write_table([row for shard in sorted(committed) for row in shards[shard]], root / METADATA_FILE, METADATA_SCHEMA)


def remove_stale_temp_files(root: Path) -> int:
    """Delete ``.name.*.tmp`` files that a killed process left behind (``atomic_file`` names); returns how many."""
    stale = [path for path in root.rglob(".*.tmp") if path.is_file()] if root.is_dir() else []
    for path in stale:
        path.unlink()
    return len(stale)


def _fingerprint(config: BuildConfig) -> dict[str, Any]:
    """The config by content: a moved taxonomy or pairs table still resumes, an edited one is refused."""
    data = config.fingerprint()
    if config.taxonomy is not None:
        data["taxonomy"] = {f"{c.category}/{c.name}": list(c.substitutes) for c in load_taxonomy(config.taxonomy)}
    if config.pairs_from is not None:
        table = Path(config.pairs_from)
        if not table.is_file():
            raise BuildError(f"pairs_from table {table} not found")
        data["pairs_from"] = {"sha256": hashlib.sha256(table.read_bytes()).hexdigest()}
    return data


def build(config: BuildConfig) -> BuildResult:
    """Build (or resume building) the dataset ``config`` describes; safe to kill and rerun at any point.

    A build that fails before its manifest exists (a missing API key or pairs table) removes the
    folder it created, so a failed first run leaves nothing behind. With ``distributed`` devices x
    nodes > 1 every rank renders its share of the shards still to do (see :func:`_build`).
    """
    ranks = launch(config.distributed, "distributed", BuildError)
    root = Path(config.output)
    created = not root.exists()
    try:
        return _build(config, root, ranks)
    except BaseException:
        if ranks.is_zero and created and not (root / MANIFEST_FILE).is_file():
            shutil.rmtree(root, ignore_errors=True)
        raise


def _build(config: BuildConfig, root: Path, ranks: Ranks) -> BuildResult:
    """Rank 0 holds the lock and makes the pair table final; rank ``r`` of ``w`` renders shards ``r, r + w, ...`` of
    those not committed yet, then rank 0 commits what is left and finishes the folder.

    Shards and their batches are the same whatever the number of ranks, so the files are the same as a
    one-process build's; a shard is committed once its rank has marked it rendered (after its files).
    """
    with ranks.held_by_zero(lambda: output_lock(root)):
        manifest, pairs = typing.cast(tuple[Manifest, list[dict[str, Any]]], ranks.share(ranks.on_zero(lambda: _prepare(config, root))))
        shards = _shards(pairs, config)
        pending = [shard for shard in range(len(shards)) if shard not in manifest.committed]
        mine = pending[ranks.rank :: ranks.world_size]
        ranks.on_all(lambda: _render_shards(config, root, ranks, manifest, shards, mine))
        ranks.on_zero(lambda: _finish(config, root, manifest, shards))
    return BuildResult(output=root, rows=len(pairs), shards=len(shards), rendered_shards=len(pending), generation=manifest.pairs or {})


def _prepare(config: BuildConfig, root: Path) -> tuple[Manifest, list[dict[str, Any]]]:
    """Rank 0, before any rank writes: clear a killed run's temporary files, commit the shards it finished, read or
    make the pair table."""
    remove_stale_temp_files(root)
    manifest = open_manifest(root, _fingerprint(config))
    # Built before anything is written, so a missing model or API key leaves no half-started folder.
    generator = build_generator(config.generator) if manifest.pairs is None and config.taxonomy is not None else None
    manifest.save(root)  # ties the generator checkpoints written from here on to this config
    pairs = _pair_rows(config, root, manifest, generator)
    _commit_rendered(root, manifest, _shards(pairs, config))
    return manifest, pairs


def _render_shards(config: BuildConfig, root: Path, ranks: Ranks, manifest: Manifest, shards: list[list[dict[str, Any]]], mine: list[int]) -> None:
    """Render this rank's shards; each is marked rendered once its files are on disk (rank 0 commits the marks)."""
    if not mine:
        return
    render = config.render if ranks.device is None else dataclasses.replace(config.render, device=str(ranks.device))
    renderer = PairRenderer(render)
    description = "render" if ranks.world_size == 1 else f"render rank {ranks.rank}/{ranks.world_size}"
    with progress_bar(total=sum(len(shards[shard]) for shard in mine), desc=description, unit="pair") as progress:
        for shard in mine:
            _render_shard(renderer, root, shards[shard], config.render.batch_size, progress)
            with atomic_file(root / RENDERED_DIR / f"{shard:05d}") as tmp:
                tmp.write_text(f"{len(shards[shard])} rows\n", encoding="utf-8")
            if ranks.is_zero:
                _commit_rendered(root, manifest, shards)


def _commit_rendered(root: Path, manifest: Manifest, shards: list[list[dict[str, Any]]]) -> None:
    """Rank 0: add the shards marked rendered to the manifest (the commit point), rewrite the metadata, drop the marks."""
    folder = root / RENDERED_DIR
    marks = sorted(path for path in folder.iterdir() if path.name.isdigit()) if folder.is_dir() else []
    manifest.committed = sorted(set(manifest.committed) | {int(mark.name) for mark in marks})
    manifest.save(root)
    _write_metadata(root, shards, manifest.committed)
    for mark in marks:
        mark.unlink()


def _finish(config: BuildConfig, root: Path, manifest: Manifest, shards: list[list[dict[str, Any]]]) -> None:
    """Rank 0, after every rank has rendered: commit the last marks, write the card, mark the folder complete."""
    _commit_rendered(root, manifest, shards)
    if (root / RENDERED_DIR).is_dir():
        (root / RENDERED_DIR).rmdir()
    write_card(root, config, manifest)
    manifest.complete = True
    manifest.save(root)
