"""The pipeline YAML (``configs/pipelines/*.yaml``), parsed by jsonargparse like every other command.

Each field's docstring is its documentation: ``safetydpo run --help`` prints it, and
``docs/pipeline.md`` is checked against it by the tests. Values are parsed in jsonargparse's
``omegaconf+`` mode, so ``${variables.NAME}`` anywhere in the file is resolved after the command
line is applied: ``--variables.expert_steps 60`` changes every place that refers to it.

Paths: config files a pipeline names (``experts.config``, ``data.build``, ``evaluate.config``) are
relative to the pipeline file; every other path (``output``, ``base_model``, data paths inside the
stacked configs) is relative to the working directory, as in all of the project's configs.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ImportConfig:
    """A pair table made elsewhere (e.g. the released CoProV2 CSV), converted by ``safetydpo data import``."""

    path: str
    """The table file (CSV, JSONL or Parquet)."""
    layout: str = "auto"
    """``coprov2`` (a row per image, ``u_``/``s_`` pairs), ``pairs`` (a row per pair) or ``auto``."""
    images: str | None = None
    """Folder the table's image paths are relative to; with it the released renders are trained on directly."""
    taxonomy: str | None = None
    """Taxonomy file; assigns each pair the taxonomy concept its unsafe prompt names."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column renames, ours to theirs (``unsafe_prompt: prompt_unsafe``), for the ``pairs`` layout."""


@dataclass
class DataStage:
    """Where the CoProV2 pairs come from: built (and rendered by the base model), imported, or an existing folder."""

    build: str | None = None
    """Build config (``safetydpo data build`` format). The pipeline sets its ``output`` and ``render.base_model``;
    with ``table`` also set, its ``pairs_from`` is the imported pair table (the pairs are re-rendered)."""
    table: ImportConfig | None = None
    """A pair table to import; without ``build`` its own images are trained on (needs ``table.images``)."""
    path: str | None = None
    """An existing CoProV2-format dataset folder, used as it is (no data is made)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Nested keys merged into the build config, e.g. ``{pairs: {per_concept: 48}}``."""


@dataclass
class ExpertsStage:
    """One safety expert per category, each a ``safetydpo fit`` run over the same stacked configs."""

    config: list[str] = field(default_factory=list)
    """LightningCLI config files stacked left to right for every expert (``safetydpo fit --config A --config B``)."""
    categories: list[str] = field(default_factory=list)
    """One expert per category; each run gets ``model.init_args.category`` (the data filter follows it)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Nested fit-config keys for every expert, stacked last: ``{trainer: {max_steps: 400}}``."""
    per_category: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Nested fit-config keys for one category's expert only: ``{sexual: {trainer: {max_steps: 4000}}}``."""
    parallel: int = 1
    """Experts trained at once, each in a ``safetydpo fit`` process of its own with an equal share of this process's
    CPU threads (``OMP_NUM_THREADS``); 1 = one after another in this process. For CPU training: small models gain
    more from processes than from threads (2 on 2 cores, docs/performance.md); on GPUs every process shares the
    same devices, so keep 1 unless the experts fit on one device together."""


@dataclass
class MergeStage:
    """How the experts become one LoRA (``safetydpo merge``)."""

    method: str | dict[str, Any] = "comerge"
    """A registered merge name, or ``{class_path: NAME, init_args: {...}}`` (e.g. Co-Merge's ``rank``)."""
    num_batches: int = 8
    """Batches of pairs (all categories) the activation statistics of Co-Merge run over."""
    batch_size: int = 4
    """Pairs per activation batch."""
    resolution: int = 512
    """Image size the activation batches are encoded at (ignored with precomputed latents)."""
    seed: int = 0
    """Seed of the activation batches' order, noise and timesteps."""
    device: str | None = None
    """``cpu``, ``cuda``, ``cuda:1`` ...; ``null`` = cuda when available."""


@dataclass
class EvaluateStage:
    """Base model vs the merged LoRA (``safetydpo evaluate``)."""

    config: str | None = None
    """Evaluation config (``safetydpo evaluate`` format); ``null`` = no evaluate and report stages. The pipeline
    sets its ``output_dir`` and replaces its ``models`` with ``base`` (the base model, the baseline), ``aligned``
    (the base with the merged LoRA) and ``models`` below. ``{assets}`` in its strings is OUTPUT/assets."""
    models: list[dict[str, Any]] = field(default_factory=list)
    """More models to compare, after base and aligned: ``{name, base_model, lora}`` (e.g. a released safe checkpoint)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Nested keys merged into the evaluation config, e.g. ``{generation: {num_inference_steps: 20}}``."""
    images_per_prompt: int | None = None
    """Images per prompt for every prompt set (a quicker or larger run); ``null`` = each set's own."""
    assets: list[dict[str, Any]] = field(default_factory=list)
    """Registered asset writers run first (``{name: NAME, ...}``), writing files the config names as ``{assets}/...``."""


@dataclass
class ReportStage:
    """The pipeline's report: IP per category, base vs aligned, plus registered sections."""

    ip_set: str | None = None
    """The prompt set whose per-category IP forms the report's table; ``null`` = the first one with metric ``ip``."""
    sections: list[dict[str, Any]] = field(default_factory=list)
    """Registered report sections (``{name: NAME, ...}``) that add columns and text, e.g. ``toyworld_fidelity``."""


@dataclass
class PipelineConfig:
    """The whole method as one run: data -> experts -> merge -> evaluate -> report."""

    base_model: str
    """The model being aligned: a diffusers pipeline folder (``model_index.json``) or a cached hub id. Every
    stage uses it: it renders the pairs, is the experts' frozen base and reference, and is evaluated."""
    output: str = "runs/pipeline"
    """Folder for every stage's outputs and the records that let a rerun skip finished stages."""
    variables: dict[str, Any] = field(default_factory=dict)
    """Free values the rest of the file refers to as ``${variables.NAME}``; set with ``--variables.NAME``."""
    data: DataStage = field(default_factory=DataStage)
    """The ``data`` stage."""
    experts: ExpertsStage = field(default_factory=ExpertsStage)
    """The ``experts`` stage."""
    merge: MergeStage = field(default_factory=MergeStage)
    """The ``merge`` stage."""
    evaluate: EvaluateStage = field(default_factory=EvaluateStage)
    """The ``evaluate`` stage."""
    report: ReportStage = field(default_factory=ReportStage)
    """The ``report`` stage."""


#: The stages, in the order they run.
STAGES: tuple[str, ...] = ("data", "experts", "merge", "evaluate", "report")


def _section(hint: Any) -> type | None:
    """The dataclass a field holds (``ImportConfig | None`` included), or ``None`` for a plain value."""
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return typing.cast(type, candidate)
    return None


def unknown_key(data: dict[str, Any], cls: type = PipelineConfig, prefix: str = "") -> str | None:
    """The first key of ``data`` no field of ``cls`` (or of its sections) takes, with the valid choices.

    jsonargparse accepts an unknown key whose value is an empty mapping (``stages: {data: {}}``)
    without a word, and names no file; this check covers every pipeline file the same way.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in data.items():
        if key not in names:
            where = f" of {prefix.rstrip('.')}" if prefix else ""
            return f"unknown key '{prefix}{key}'; valid keys{where}: {', '.join(names)}"
        section = _section(hints[key])
        if section is not None and isinstance(value, dict):
            found = unknown_key(value, section, f"{prefix}{key}.")
            if found:
                return found
    return None


def from_dict(data: dict[str, Any], cls: type = PipelineConfig) -> Any:
    """``cls`` built from parsed values; free-form mappings (overrides) stay plain data, never objects."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            section, value = _section(hints[f.name]), data[f.name]
            values[f.name] = from_dict(value, section) if section is not None and isinstance(value, dict) else value
    return cls(**values)
