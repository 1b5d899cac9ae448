"""The evaluation YAML (``configs/eval.yaml``) as typed dataclasses, parsed by jsonargparse.

Each field's docstring is its documentation: ``safetydpo evaluate --help`` prints it with the
default, and ``docs/evaluation.md`` is checked against the fields by the tests. jsonargparse rejects
unknown keys and wrong types; :func:`check_config` adds what types cannot say (unique names, known
metrics). Every error is one line naming the file and the key.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError, ArgumentParser, set_parsing_settings
from jsonargparse.typing import register_type

from safetydpo.distributed import DistributedConfig
from safetydpo.evaluation.clip import ClipSpec
from safetydpo.evaluation.errors import EvaluationError
from safetydpo.evaluation.protocols import apply_protocol
from safetydpo.io import read_yaml
from safetydpo.sampling import SpeedConfig

METRICS: tuple[str, ...] = ("ip", "clipscore", "fid")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Arguments(dict[str, Any]):
    """Keyword arguments of a registered class (prompt source, classifier, feature extractor).

    The class's registry checks them and names the valid ones. jsonargparse only checks that they
    are a mapping: a value typed ``Any`` would be re-parsed (``"123"`` becomes ``123``) and a
    ``class_path`` inside it imported, which would let a shared YAML run code.
    """


def _not_a_mapping(value: Any) -> Arguments:
    raise ValueError(f"expected a mapping, got {value!r}")


# A mapping passes unchanged (jsonargparse empties a dict subclass it builds itself); anything else is refused.
register_type(Arguments, serializer=dict, deserializer=_not_a_mapping, type_check=lambda value, _: isinstance(value, dict))


@dataclass
class ModelConfig:
    """One entry of ``models``: a local diffusers pipeline folder, optionally with one LoRA loaded on top."""

    name: str
    """Names the model's output folders and report column (letters, digits, ``_.-``)."""
    base_model: str
    """A local diffusers pipeline folder (with ``model_index.json``), e.g. Stable Diffusion 1.5's."""
    lora: str | None = None
    """A LoRA file (an expert or a merge) loaded with ``load_lora_weights``; ``null``: the pipeline as it is."""
    sld: str | None = None
    """Safe Latent Diffusion guidance at inference with a preset of the SLD paper: ``weak``, ``medium``, ``strong``,
    ``max``; ``null``: off. Per model, so base and SLD render side by side (docs/baselines.md)."""
    sld_concept: str | None = None
    """The safety concept SLD steers away from (required unless the pipeline is a ``StableDiffusionPipelineSafe``)."""
    sld_guidance_scale: float | None = None
    """Overrides the preset's SLD guidance scale; ``0`` (or anything <= 1) turns the guidance off; ``null``: the preset's."""


@dataclass
class PromptSetConfig:
    """One entry of ``prompt_sets``: a prompt file read by a registered source, and the metrics computed on it."""

    name: str
    """Names the set's output folders and report section (letters, digits, ``_.-``)."""
    source: str
    """The registered prompt source that reads ``path``: ``i2p``, ``ud``, ``coprov2``, ``coco`` or a plugin's."""
    path: str
    """The local prompt file (or CoProV2 dataset folder)."""
    options: Arguments = field(default_factory=Arguments)
    """The source's options (e.g. i2p ``hard_only``); an unknown option is an error listing the valid ones."""
    categories: list[str] | None = None
    """Keep prompts in any of these categories (``self-harm`` = ``self_harm``); ``null``: all."""
    limit: int | None = None
    """Keep the first N prompts (after ``categories``); ``null``: all."""
    images_per_prompt: int = 1
    """Images rendered per prompt, seeds first, first+1, ... (the I2P convention is 10)."""
    metrics: list[str] = field(default_factory=lambda: ["ip"])
    """Metrics computed on the set: any of ``ip``, ``clipscore``, ``fid``."""
    fid_reference: str | None = None
    """Folder of real images (searched recursively) that FID compares with; required with ``fid``."""


@dataclass
class GenerationConfig:
    """Sampler settings shared by every model; per-prompt seeds/guidance from the prompt file take precedence."""

    num_inference_steps: int = 50
    """Sampler steps of the pipeline's own scheduler."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale, used when the prompt file gives none."""
    height: int | None = None
    """Image height in pixels; ``null``: the pipeline's default size."""
    width: int | None = None
    """Image width in pixels; ``null``: the pipeline's default size."""
    batch_size: int = 8
    """Images per pipeline call (prompts with equal settings are batched together)."""
    seed: int = 0
    """First seed of a prompt when the prompt file gives none; image k uses seed + k."""
    dtype: str = "auto"
    """Rendering precision: ``auto`` (float16 on CUDA, float32 on CPU), ``float32``, ``float16`` or ``bfloat16``."""
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    """Attention kernels, memory layout and ``torch.compile`` of the denoising loop (float rounding only; docs/performance.md)."""


@dataclass
class IPConfig:
    """Inappropriate probability: which classifiers flag an image, and where they find their weights."""

    definition: str = "sld"
    """``sld`` (Q16 OR NudeNet's five exposed classes), ``safetydpo`` (Q16 OR NudeNet genitalia) or ``custom``."""
    custom: list[Arguments] = field(default_factory=list)
    """With ``definition: custom``: the classifiers OR-ed, each ``{name: <registered classifier>, <its arguments>}``."""
    classifier_args: dict[str, Arguments] = field(default_factory=dict)
    """Per classifier name, what a preset leaves open (weights, devices), e.g. ``q16: {prompts: ..., clip: ...}``."""
    batch_size: int = 32
    """Images per classifier call."""


@dataclass
class FidConfig:
    """clean-fid between a prompt set's images and its ``fid_reference`` folder."""

    feature_extractor: str = "inception"
    """A registered feature extractor (or its class's dotted path): ``inception`` (the FID standard), ``clip``
    (FID-CLIP), ``toyworld`` or a plugin's."""
    inception_path: str | None = None
    """``inception-2015-12-05.pt`` (clean-fid's TorchScript Inception) or the folder holding it."""
    inception_sha256: str | None = None
    """SHA-256 the Inception file must have (``sha256sum`` of the file you downloaded); another file is refused
    before ``torch.jit.load`` runs it. ``null``: not checked (no upstream publishes one); results record the hash."""
    clip: ClipSpec = field(default_factory=ClipSpec)
    """The CLIP of ``feature_extractor: clip`` (embeddings are L2-normalised)."""
    extractor_args: Arguments = field(default_factory=Arguments)
    """Keyword arguments of an extractor other than ``inception`` and ``clip`` (e.g. ``toyworld``'s ``weights``)."""
    batch_size: int = 32
    """Images per feature batch of clean-fid's loader."""
    num_workers: int = 0
    """Worker processes of clean-fid's loader."""


@dataclass
class ClipScoreConfig:
    """CLIPScore, ``max(100 · cos(image, prompt), 0)`` per image."""

    clip: ClipSpec = field(default_factory=ClipSpec)
    """The CLIP that embeds images and prompts."""
    clamp: bool = True
    """``max(100 · cos, 0)`` as torchmetrics' CLIPScore; ``false``: the raw ``100 · cos`` (the SafetyDPO release)."""
    batch_size: int = 32
    """Images per forward pass."""


@dataclass
class GridConfig:
    """PNG grids: the first ``rows`` prompts of each set, ``seeds`` images each, models side by side."""

    rows: int = 6
    """Prompts per grid (the first N of the set)."""
    seeds: int = 2
    """Images (seeds) per prompt in the grid."""
    cell_size: int = 192
    """Pixels per grid cell."""


@dataclass
class AttackConfig:
    """One entry of ``attacks``: a registered attack turns prompts of prompt sets into adversarial prompts, which every
    model then renders (docs/attacks.md)."""

    name: str
    """The registered attack: ``ring_a_bell``, ``mma``, ``p4d``, ``unlearndiffatk`` or a plugin's."""
    label: str | None = None
    """Names the attack's cache, image folders and report rows (letters, digits, ``_.-``); ``null``: ``name``."""
    args: Arguments = field(default_factory=Arguments)
    """The attack's arguments (budget, seed); an unknown one is an error listing the valid ones."""
    prompt_sets: list[str] | None = None
    """The prompt sets attacked (each needs metric ``ip``); ``null``: every set with ``ip``."""
    target: str | None = None
    """The model attacked (white-box attacks differentiate through it); ``null``: the first model that is not the baseline."""
    prompts_per_category: int | None = None
    """Attack only the first N prompts of each category (so every category is measured); ``null``: no such cap."""
    limit: int | None = None
    """Attack only the first N prompts (after ``prompts_per_category``); ``null``: all."""
    images_per_prompt: int | None = None
    """Images rendered per adversarial prompt (same seeds as the clean prompt's first ones); ``null``: the set's."""
    replay: str | None = None
    """Another evaluation's cache folder (``OUTPUT_DIR/attacks/LABEL``) whose adversarial prompts are rendered instead of
    attacking (a transfer attack); ``null``: attack here, caching in ``OUTPUT_DIR/attacks/LABEL``."""

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass
class EvalConfig:
    """A whole evaluation: every model rendered on every prompt set, then IP, CLIPScore and FID."""

    models: list[ModelConfig] = field(default_factory=list)
    """The models compared, each ``{name, base_model, lora}``; at least one."""
    prompt_sets: list[PromptSetConfig] = field(default_factory=list)
    """The prompt sets rendered by every model; at least one."""
    output_dir: str = "runs/eval"
    """Where results.json, report.md, grids/ and the image cache are written (relative to the working directory)."""
    baseline: str | None = None
    """The model name that differences (Δ) are computed against; ``null``: the first model."""
    device: str | None = None
    """Device for rendering, CLIPScore and FID (``cuda``, ``cpu``, ...); ``null``: CUDA when available (with ``distributed``
    ranks: each rank's own device)."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Ranks that share the rendering (docs/cluster.md); rank 0 scores and writes the results."""
    bootstrap_resamples: int = 2000
    """Percentile-bootstrap resamples per 95% interval."""
    protocol: str | None = None
    """A published protocol that fixes the IP definition and CLIPScore settings: ``safetydpo_release``, ``sld``, ``mace``,
    ``unlearndiffatk``; ``null``: each section as configured (docs/evaluation.md says which is comparable to which table)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """How images are rendered."""
    ip: IPConfig = field(default_factory=IPConfig)
    """The IP definition and its classifiers."""
    fid: FidConfig = field(default_factory=FidConfig)
    """FID settings."""
    clipscore: ClipScoreConfig = field(default_factory=ClipScoreConfig)
    """CLIPScore settings."""
    grid: GridConfig = field(default_factory=GridConfig)
    """The comparison grids."""
    attacks: list[AttackConfig] = field(default_factory=list)
    """Red-teaming attacks whose adversarial prompts every model renders; IP under each beside clean IP (docs/attacks.md)."""

    @property
    def baseline_name(self) -> str:
        return self.baseline or self.models[0].name


def add_config_arguments(parser: ArgumentParser, cls: type = EvalConfig, nested_key: str | None = None) -> ArgumentParser:
    """Add the keys of the dataclass ``cls`` to ``parser``, each documented by its field's docstring and default."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser.add_class_arguments(cls, nested_key, fail_untyped=True)
    return parser


@functools.cache
def _section_parser(cls: type) -> ArgumentParser:
    return add_config_arguments(ArgumentParser(exit_on_error=False), cls)


def _entry_class(hint: Any) -> type | None:
    """``ModelConfig`` for ``list[ModelConfig]``: lists whose entries are sections of their own."""
    entry = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
    return typing.cast(type, entry) if dataclasses.is_dataclass(entry) else None


def entries_help(cls: type = EvalConfig) -> str:
    """The keys of list entries (``models[].lora``), which a parser's ``--help`` only names by the entry's type."""
    lists = {name: entry for name, hint in typing.get_type_hints(cls).items() if (entry := _entry_class(hint))}
    parsers = [
        add_config_arguments(ArgumentParser(usage=argparse.SUPPRESS, add_help=False), entry, f"{name}[]")
        for name, entry in lists.items()
    ]
    return "\n".join(parser.format_help() for parser in parsers)


def _type_name(hint: Any) -> str:
    """``int | null``, ``list[str]``, ``dict[str, mapping]``: a type hint as a YAML writer reads it."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in args)
    if hint is type(None):
        return "null"
    if hint is Arguments or dataclasses.is_dataclass(hint):
        return "mapping"
    name = getattr(typing.get_origin(hint) or hint, "__name__", str(hint))
    return f"{name}[{', '.join(_type_name(arg) for arg in args)}]" if args else name


def _condense(message: str, cls: type, data: Mapping[str, Any], prefix: str) -> str:
    """jsonargparse's (often multi-line) error about one section as one line: the key, what is wrong, the valid keys."""
    scope = f" in {prefix.rstrip('.')}" if prefix else ""
    if match := re.search(r"Option '([^']+)' is not accepted", message):
        return f"unknown key '{prefix}{match.group(1)}'; valid keys{scope}: {', '.join(f.name for f in dataclasses.fields(cls))}"
    if match := re.search(r"the following arguments are required: (.+)", message):
        return f"missing key(s) {', '.join(prefix + key.strip() for key in match.group(1).split(','))}"
    if (match := re.search(r'Parser key "([^"]+)"', message)) and match.group(1) in data:
        key = match.group(1)
        return f"'{prefix}{key}' must be {_type_name(typing.get_type_hints(cls)[key])}, got {data[key]!r}"
    return f"{prefix}{' '.join(message.split())}"


def _parse(cls: type, data: Any, prefix: str, source: str) -> Any:
    """``data`` as an instance of the dataclass ``cls``, section by section and list entry by list entry.

    Parsing nested dataclasses (``fid.clip``) and list entries (``models.1``) separately makes every
    error name its exact key, and lets a wrong section (``generation: 3``) fail instead of reading as defaults.
    """
    if not isinstance(data, Mapping):
        where = f"'{prefix.rstrip('.')}'" if prefix else "the top level"
        raise EvaluationError(f"{source}: {where} must be a mapping of keys, got {data!r}")
    rest = copy.deepcopy(dict(data))  # jsonargparse rewrites what it is given
    parts: dict[str, Any] = {}
    for name, hint in typing.get_type_hints(cls).items():
        entry = _entry_class(hint)
        if name in rest and dataclasses.is_dataclass(hint):
            parts[name] = _parse(typing.cast(type, hint), rest.pop(name), f"{prefix}{name}.", source)
        elif name in rest and entry is not None and isinstance(rest[name], list):
            parts[name] = [_parse(entry, item, f"{prefix}{name}.{i}.", source) for i, item in enumerate(rest.pop(name))]
    parser = _section_parser(cls)
    try:
        built = parser.instantiate(parser.parse_object(rest))
    except ArgumentError as err:
        raise EvaluationError(f"{source}: {_condense(str(err), cls, rest, prefix)}") from None
    return cls(**{f.name: built[f.name] for f in dataclasses.fields(cls) if f.name not in parts}, **parts)


def config_from_dict(data: Any, source: str | Path) -> EvalConfig:
    """Check an in-memory evaluation config (a file's content plus programmatic changes); errors name ``source``."""
    config = _parse(EvalConfig, data, "", str(source))
    try:
        apply_protocol(config, data)
        check_config(config)
    except EvaluationError as err:
        raise EvaluationError(f"{source}: {err}") from None
    return config


def set_key(data: Any, key: str, value: Any, change: str) -> None:
    """Set the dotted ``key`` of ``data`` (list entries by index: ``models.1.lora``); ``change`` names it in errors."""
    *parents, leaf = key.split(".")
    node: Any = data
    for depth, part in enumerate([*parents, leaf]):
        where = ".".join(parents[:depth]) or "the top level"
        if isinstance(node, list) and not (part.isdigit() and int(part) < len(node)):
            raise EvaluationError(f"{change}: {where} is a list of {len(node)}; '{part}' is not one of its indices")
        if not isinstance(node, (dict, list)):
            raise EvaluationError(f"{change}: {where} is {node!r}, not a mapping or a list")
        index: Any = int(part) if isinstance(node, list) else part
        if depth == len(parents):
            node[index] = value
            return
        if isinstance(node, dict) and node.get(part) is None:
            node[part] = {}
        node = node[index]


def apply_overrides(data: Any, overrides: Sequence[str]) -> Any:
    """A copy of ``data`` with ``key=value`` overrides: dotted keys, list entries by index (``models.1.lora=x``), YAML values."""
    result = copy.deepcopy(data)
    for override in overrides:
        key, equals, text = override.partition("=")
        if not equals:
            raise EvaluationError(f"override '{override}' is not key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise EvaluationError(f"override '{override}': the value is not valid YAML: {' '.join(str(err).split())}") from None
        set_key(result, key, value, f"override '{override}'")
    return result


def load_config(path: str | Path, overrides: Sequence[str] = (), options: Mapping[str, Any] | None = None) -> EvalConfig:
    """Read ``path``, set ``options`` (typed values by dotted key: the command line's ``--key value``), apply
    ``key=value`` overrides, check it. Relative paths in it are relative to the working directory."""
    data = read_yaml(path, "config file", EvaluationError)
    for key, value in (options or {}).items():
        set_key(data, key, value, f"--{key}")
    return config_from_dict(apply_overrides(data, overrides), path)


def check_config(config: EvalConfig) -> None:
    """Fail before any rendering on names, metrics and settings that cannot work."""
    _check_names("models", [model.name for model in config.models])
    _check_names("prompt_sets", [prompt_set.name for prompt_set in config.prompt_sets])
    if config.baseline is not None and config.baseline not in [model.name for model in config.models]:
        raise EvaluationError(
            f"baseline '{config.baseline}' is not one of the models: {', '.join(m.name for m in config.models)}"
        )
    for prompt_set in config.prompt_sets:
        owner = f"prompt_sets.{prompt_set.name}"
        unknown = [metric for metric in prompt_set.metrics if metric not in METRICS]
        if unknown or not prompt_set.metrics:
            raise EvaluationError(f"{owner}.metrics: unknown metric {unknown or '[]'}; valid choices: {', '.join(METRICS)}")
        if "fid" in prompt_set.metrics and not prompt_set.fid_reference:
            raise EvaluationError(f"{owner}: metric fid needs fid_reference (a folder of real images)")
        if prompt_set.images_per_prompt < 1:
            raise EvaluationError(f"{owner}.images_per_prompt must be >= 1, got {prompt_set.images_per_prompt}")
    check_attacks(config)
    config.distributed.check("distributed", EvaluationError)
    config.generation.speed.check("generation.speed", EvaluationError)
    if config.distributed.world_size > 1 and config.device is not None:
        raise EvaluationError("device must be null with distributed ranks (each renders on its own device); set distributed.accelerator")
    for key, value in (
        ("generation.batch_size", config.generation.batch_size),
        ("ip.batch_size", config.ip.batch_size),
        ("grid.rows", config.grid.rows),
    ):
        if value < 1:
            raise EvaluationError(f"{key} must be >= 1, got {value}")


def _check_names(key: str, names: list[str]) -> None:
    if not names:
        raise EvaluationError(f"{key} is empty")
    bad = [name for name in names if not _NAME.match(name)]
    if bad:
        raise EvaluationError(f"{key}: name '{bad[0]}' must be letters, digits, '_', '.', '-' (it names output folders)")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise EvaluationError(f"{key}: name '{duplicates[0]}' is used twice")


def check_attacks(config: EvalConfig) -> None:
    """Each attack names a known attack with valid arguments, prompt sets with IP, a model, and positive counts."""
    from safetydpo.attacks import ATTACKS, AttackError  # imported here: loading attacks pulls in the model stack

    if config.attacks:
        _check_names("attacks", [attack.key for attack in config.attacks])
    models = [model.name for model in config.models]
    with_ip = [s.name for s in config.prompt_sets if "ip" in s.metrics]
    for attack in config.attacks:
        owner = f"attacks.{attack.key}"
        try:
            ATTACKS.build(attack.name, **attack.args)
        except (AttackError, ValueError, TypeError) as err:
            raise EvaluationError(f"{owner}: {err}") from None
        for name in attack.prompt_sets or []:
            if name not in with_ip:
                raise EvaluationError(f"{owner}.prompt_sets: '{name}' is not a prompt set with metric ip; valid choices: {', '.join(with_ip) or 'none'}")
        if attack.prompt_sets == [] or not with_ip:
            raise EvaluationError(f"{owner}.prompt_sets: no prompt set to attack; name sets with metric ip ({', '.join(with_ip) or 'none'})")
        if attack.target is not None and attack.target not in models:
            raise EvaluationError(f"{owner}.target: '{attack.target}' is not one of the models: {', '.join(models)}")
        for key in ("prompts_per_category", "limit", "images_per_prompt"):
            if getattr(attack, key) is not None and getattr(attack, key) < 1:
                raise EvaluationError(f"{owner}.{key} must be >= 1 or null, got {getattr(attack, key)}")


def attack_target(config: EvalConfig, attack: AttackConfig) -> str:
    """The model ``attack`` runs against: its ``target``, else the first model that is not the baseline (else the only one)."""
    others = [model.name for model in config.models if model.name != config.baseline_name]
    return attack.target or (others[0] if others else config.baseline_name)


def attacked_sets(config: EvalConfig, attack: AttackConfig) -> list[str]:
    """The prompt sets ``attack`` attacks: those it names, else every set with metric ip."""
    return list(attack.prompt_sets) if attack.prompt_sets is not None else [s.name for s in config.prompt_sets if "ip" in s.metrics]
