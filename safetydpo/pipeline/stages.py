"""The pipeline's stages as planned steps: each with its resolved config, inputs, outputs and equivalent command.

Planning resolves and checks every stage's config (the experts' through the same LightningCLI
parser as ``safetydpo fit``) before anything runs, so a typo in the last stage costs nothing. A
step's hash covers its resolved config and the hashes of the steps it reads from, so changing the
data config reruns everything after it, while changing only the evaluation reruns only evaluation.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace

from safetydpo.callbacks import LoraExport
from safetydpo.data.builder import BuildError, build
from safetydpo.data.builder.config import build_config_from_dict
from safetydpo.data.builder.importer import import_table
from safetydpo.data.coprov2 import DatasetError, find_metadata
from safetydpo.devices import resolve_device
from safetydpo.distributed import DistributedConfig
from safetydpo.evaluation.config import EvalConfig, config_from_dict
from safetydpo.evaluation.errors import EvaluationError
from safetydpo.evaluation.runner import evaluate
from safetydpo.io import read_yaml
from safetydpo.lightning_cli import parse_fit_config, run_fit
from safetydpo.merging import MERGES
from safetydpo.merging.files import merge_expert_files
from safetydpo.models.inputs import base_model_inputs
from safetydpo.pipeline.children import run_child
from safetydpo.pipeline.config import PipelineConfig
from safetydpo.pipeline.extensions import ASSETS, REPORT_SECTIONS
from safetydpo.pipeline.records import digest, file_digest, model_fingerprint
from safetydpo.pipeline.report import ALIGNED, BASE, write_report


class PipelineError(ValueError):
    """A pipeline that cannot run as configured; the message names the key or file and the fix."""


@dataclass
class Step:
    """One unit of work a rerun can skip: a dataset, one expert, the merge, the evaluation or the report."""

    stage: str
    name: str
    command: str
    output: Path
    """The main output; the step's record is written beside it."""
    outputs: list[Path]
    """Everything that must exist for the step to count as done."""
    fingerprint: dict[str, Any]
    action: Callable[[], None]
    needs: list[Path] = field(default_factory=list)
    """Files earlier steps write that this one reads (checked when earlier stages are not run)."""
    resolved: tuple[Path, str] | None = None
    """The step's resolved config file and its YAML text, which ``command`` runs; written when a run starts."""
    workers: int = 1
    """How many of its stage's steps may run at once (their actions then run in threads, each starting a process)."""

    @property
    def hash(self) -> str:
        return digest(self.fingerprint)


def deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied: mappings merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _substitute(value: Any, old: str, new: str) -> Any:
    """``value`` with ``old`` replaced by ``new`` in every string it holds."""
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, dict):
        return {key: _substitute(item, old, new) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute(item, old, new) for item in value]
    return value


def _yaml_file(path: str, key: str) -> dict[str, Any]:
    data = read_yaml(path, f"{key} file", PipelineError)
    if not isinstance(data, dict):
        raise PipelineError(f"{key} file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def condense_parse_error(message: str) -> str:
    """jsonargparse's nested multi-line error as one line: the key path, the problem, and the valid options."""
    keys: list[str] = []
    class_path = None
    detail = message.strip().splitlines()[0] if message.strip() else message
    for raw in message.splitlines():
        line = raw.strip().lstrip("- ").strip()
        if match := re.match(r'Parser key "([^"]+)"', line):
            keys.append(match.group(1))
        elif match := re.match(r"Problem with given class_path '([^']+)'", line):
            class_path = match.group(1)
            keys.append("init_args")
        elif line and not line.startswith(("Does not validate", "Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>")):
            detail = line
            break
    where = ".".join(keys[:-1] if keys and keys[-1] == "init_args" and "is not accepted" not in detail else keys)
    valid = ""
    if class_path and "is not accepted" in detail:
        module, _, name = class_path.rpartition(".")
        try:
            parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
            valid = "; valid keys: " + ", ".join(p for p in parameters if p not in ("self", "args", "kwargs"))
        except (ImportError, AttributeError, ValueError):
            pass
    return (f"{where}: {detail}" if where else detail) + valid


class Planner:
    """Turns a PipelineConfig into checked steps, in run order."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.root = Path(config.output)
        base = Path(config.base_model).expanduser()
        if (base.exists() or config.base_model.startswith((".", "/", "~"))) and not (base / "model_index.json").is_file():
            raise PipelineError(f"base_model '{config.base_model}' is not a diffusers pipeline folder (no model_index.json)")
        self.base = model_fingerprint(config.base_model)

    def plan(self) -> list[Step]:
        data_steps, data_dir, data_hash = self.data()
        experts = [self.expert(category, data_dir, data_hash, data_steps) for category in self._categories()]
        steps = [*data_steps, *experts, self.merge(experts, data_dir, data_hash)]
        if self.config.evaluate.config is not None:
            evaluation, eval_config = self.evaluate(steps[-1])
            steps += [evaluation, self.report(evaluation, eval_config)]
        return steps

    # ------------------------------------------------------------------ data
    def data(self) -> tuple[list[Step], Path, str]:
        """The steps that make the dataset, its folder, and the hash experts and Co-Merge depend on."""
        spec = self.config.data
        if spec.path is not None:
            if spec.build is not None or spec.table is not None:
                raise PipelineError("data: set 'path' (an existing dataset) or 'build'/'table' (make one), not both")
            folder = Path(spec.path)
            try:
                table = find_metadata(folder, None)
            except DatasetError as err:
                raise PipelineError(f"data.path: {err}") from None
            return [], folder, digest({"dataset": file_digest(table)})
        if spec.build is None and spec.table is None:
            raise PipelineError("data: set one of 'build' (a build config), 'table' (a pair table to import) or 'path' (a dataset folder)")
        steps = []
        if spec.table is not None:
            steps.append(self._import(self.root / ("imported" if spec.build else "data")))
            if spec.build is None:
                if spec.table.images is None:
                    raise PipelineError("data.table.images is needed without data.build: the imported table's own images are trained on")
                return steps, self.root / "data", steps[0].hash
        steps.append(self._build(steps[0] if steps else None))
        return steps, self.root / "data", steps[-1].hash

    def _import(self, out: Path) -> Step:
        table = self.config.data.table
        assert table is not None
        source = Path(table.path)
        if not source.is_file():
            raise PipelineError(f"data.table.path: table {source} not found")
        for key, value in (("images", table.images), ("taxonomy", table.taxonomy)):
            if value is not None and not Path(value).exists():
                raise PipelineError(f"data.table.{key}: {value} not found")
        command = ["safetydpo", "data", "import", str(source), "--out", str(out), "--layout", table.layout]
        command += [part for key in ("images", "taxonomy") if getattr(table, key) for part in (f"--{key}", str(getattr(table, key)))]
        command += [part for ours, theirs in table.columns.items() for part in ("--column", f"{ours}={theirs}")]
        outputs = [out / "pairs.parquet"] + ([out / "metadata.parquet"] if table.images else [])

        def action() -> None:
            import_table(source, out, layout=table.layout, images=Path(table.images) if table.images else None,
                         taxonomy=Path(table.taxonomy) if table.taxonomy else None, columns=dict(table.columns))

        fingerprint = {"table": file_digest(source), "settings": {**vars(table), "path": None}}
        if table.taxonomy:
            fingerprint["taxonomy"] = file_digest(Path(table.taxonomy))
        return Step("data", "data/import", shlex.join(command), out, outputs, fingerprint, action)

    def _build(self, imported: Step | None) -> Step:
        spec = self.config.data
        assert spec.build is not None
        out = self.root / "data"
        data = deep_merge(_yaml_file(spec.build, "data.build"), spec.overrides)
        data["output"] = str(out)
        data["render"] = {**(data.get("render") or {}), "base_model": self.config.base_model}
        if imported is not None:
            data["pairs_from"] = str(imported.outputs[0])
        try:
            config = build_config_from_dict(data, spec.build)
        except BuildError as err:
            raise PipelineError(str(err)) from None
        resolved = self.root / "configs" / "data.yaml"
        _refuse_ranks(config.distributed, "data.build", "build under torchrun or srun with `safetydpo data build --config "
                      f"{spec.build}` and give the pipeline its output as data.path")
        fingerprint = {"build": config.fingerprint(), "base_model": self.base, "imported": imported.hash if imported else None}
        if config.taxonomy:
            fingerprint["taxonomy"] = file_digest(Path(config.taxonomy)) if Path(config.taxonomy).is_file() else config.taxonomy

        return Step("data", "data", f"safetydpo data build --config {resolved}", out, [out / "metadata.parquet"], fingerprint,
                    lambda: build(config), needs=list(imported.outputs[:1]) if imported else [], resolved=(resolved, _yaml(data)))

    # ------------------------------------------------------------------ experts
    def _categories(self) -> list[str]:
        spec = self.config.experts
        if not spec.config:
            raise PipelineError("experts.config is empty: list the fit config files every expert stacks (e.g. configs/expert.yaml)")
        if not spec.categories:
            raise PipelineError("experts.categories is empty: name the categories to train one expert each for")
        if spec.parallel < 1:
            raise PipelineError(f"experts.parallel must be >= 1 (1 trains the experts one after another), got {spec.parallel}")
        unknown = sorted(set(spec.per_category) - set(spec.categories))
        if unknown:
            raise PipelineError(f"experts.per_category: '{unknown[0]}' is not one of experts.categories: {', '.join(spec.categories)}")
        return list(spec.categories)

    def expert(self, category: str, data_dir: Path, data_hash: str, data_steps: list[Step]) -> Step:
        """One ``safetydpo fit`` run: the stacked configs, the overrides, then what the pipeline owns."""
        spec = self.config.experts
        out = self.root / "experts" / f"{category}.safetensors"
        owned = {
            "trainer": {"default_root_dir": str(self.root / "experts" / category)},
            "model": {"init_args": {"base_model": self.config.base_model, "category": category}},
            "data": {"init_args": {"data_dir": str(data_dir)}},
        }
        layers = [json.dumps(layer) for layer in (spec.overrides, spec.per_category.get(category, {}), owned) if layer]
        args = [part for path in spec.config for part in ("--config", path)] + [part for layer in layers for part in ("--config", layer)]
        try:
            parser, namespace = parse_fit_config(args)
        except Exception as err:  # jsonargparse raises ArgumentError, and a bad file can make it raise others
            raise PipelineError(f"experts.config {' + '.join(spec.config)} ({category}): {condense_parse_error(str(err))}") from None
        _set_export_path(namespace, out)
        resolved_text = parser.dump(namespace)
        resolved = self.root / "configs" / "experts" / f"{category}.yaml"

        command = f"safetydpo fit --config {resolved}"
        fingerprint = {"fit_config": resolved_text, "data": data_hash, "base_model": self.base}
        needs = [p for step in data_steps[-1:] for p in step.outputs]
        if spec.parallel == 1:
            action = partial(run_fit, ["--config", str(resolved)])
        else:
            threads = max(1, torch.get_num_threads() // spec.parallel)
            action = partial(run_child, ["fit", "--config", str(resolved)], f"experts/{category}", threads)
        return Step("experts", f"experts/{category}", command, out, [out, out.with_suffix(".json")], fingerprint,
                    action, needs, (resolved, resolved_text), workers=spec.parallel)

    # ------------------------------------------------------------------ merge
    def merge(self, experts: list[Step], data_dir: Path, data_hash: str) -> Step:
        spec = self.config.merge
        try:
            method = MERGES.build(spec.method)
        except (ValueError, TypeError) as err:  # unknown name, unknown argument
            raise PipelineError(f"merge.method: {err}") from None
        out = self.root / "merged.safetensors"
        paths = [step.output for step in experts]
        method_name, method_args = _method_parts(spec.method)
        command = ["safetydpo", "merge", "--experts", *map(str, paths), "--out", str(out), "--method", method_name,
                   "--args", json.dumps(method_args), "--base-model", self.config.base_model]
        if method.needs_activations:
            command += ["--data", str(data_dir), "--num-batches", str(spec.num_batches), "--batch-size", str(spec.batch_size),
                        "--resolution", str(spec.resolution), "--seed", str(spec.seed)]
        fingerprint = {"merge": vars(spec), "experts": [step.hash for step in experts], "base_model": self.base,
                       "data": data_hash if method.needs_activations else None}

        def action() -> None:
            unet = inputs = None
            if method.needs_activations:
                device = resolve_device(spec.device, "merge.device", PipelineError)
                unet, inputs = base_model_inputs(
                    self.config.base_model, data_dir, spec.num_batches, spec.batch_size, spec.resolution, spec.seed, device
                )
            merge_expert_files(paths, out, method=spec.method, unet=unet, inputs=inputs, base_model=self.config.base_model)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

        return Step("merge", "merge", shlex.join(command), out, [out, out.with_suffix(".json")], fingerprint, action, needs=paths)

    # ------------------------------------------------------------------ evaluate and report
    def evaluate(self, merged: Step) -> tuple[Step, EvalConfig]:
        spec = self.config.evaluate
        assert spec.config is not None
        assets_dir = self.root / "assets"
        data = _substitute(deep_merge(_yaml_file(spec.config, "evaluate.config"), spec.overrides), "{assets}", str(assets_dir))
        clash = [m.get("name") for m in spec.models if m.get("name") in (BASE, ALIGNED)]
        if clash:
            raise PipelineError(f"evaluate.models: the name '{clash[0]}' is the pipeline's own; rename that model")
        data["models"] = [{"name": BASE, "base_model": self.config.base_model},
                          {"name": ALIGNED, "base_model": self.config.base_model, "lora": str(merged.output)}, *spec.models]
        data["baseline"] = BASE
        data["output_dir"] = str(self.root / "eval")
        if spec.images_per_prompt is not None:
            data["prompt_sets"] = [{**s, "images_per_prompt": spec.images_per_prompt} for s in data.get("prompt_sets") or []]
        try:
            writers = [ASSETS.build(asset) for asset in spec.assets]
        except (ValueError, TypeError) as err:  # unknown name, unknown argument
            raise PipelineError(f"evaluate.assets: {err}") from None
        try:
            config = config_from_dict(data, spec.config)
        except EvaluationError as err:
            raise PipelineError(str(err)) from None
        resolved = self.root / "configs" / "eval.yaml"
        _refuse_ranks(config.distributed, "evaluate.config", "evaluate under torchrun or srun with `safetydpo evaluate --config "
                      f"{spec.config}` (models: the base, and the base with {merged.output})")

        def action() -> None:
            for writer in writers:
                writer.write(assets_dir)
            evaluate(config)

        fingerprint = {"evaluation": data, "aligned": merged.hash, "base_model": self.base,
                       "assets": [{"name": w.registry_name, **w.fingerprint()} for w in writers]}
        out = self.root / "eval"
        outputs = [out / "results.json", out / "report.md"]
        step = Step("evaluate", "evaluate", f"safetydpo evaluate --config {resolved}", out, outputs, fingerprint, action, [merged.output],
                    (resolved, _yaml(data)))
        return step, config

    def report(self, evaluation: Step, eval_config: EvalConfig) -> Step:
        spec = self.config.report
        try:
            sections = [REPORT_SECTIONS.build(section) for section in spec.sections]
        except (ValueError, TypeError) as err:  # unknown name, unknown argument
            raise PipelineError(f"report.sections: {err}") from None
        ip_sets = [s.name for s in eval_config.prompt_sets if "ip" in s.metrics]
        ip_set = spec.ip_set or (ip_sets[0] if ip_sets else None)
        if ip_set not in ip_sets:
            raise PipelineError(f"report.ip_set: '{ip_set}' is not a prompt set with metric ip; valid choices: {', '.join(ip_sets) or 'none'}")
        out = self.root / "report.md"

        def action() -> None:
            write_report(self.root, eval_config, ip_set, sections, self.config.base_model)

        fingerprint = {"evaluation": evaluation.hash, "ip_set": ip_set, "sections": [{"name": s.registry_name, **vars(s)} for s in sections]}
        return Step("report", "report", "(written by the pipeline from eval/results.json)", out, [out, self.root / "report.json"],
                    fingerprint, action, evaluation.outputs[:1])


def _refuse_ranks(distributed: DistributedConfig, key: str, instead: str) -> None:
    """Several ranks cannot start inside ``safetydpo run``: Fabric would start the whole pipeline once per rank."""
    if distributed.world_size > 1:
        raise PipelineError(
            f"{key}: distributed asks for {distributed.world_size} ranks, but `safetydpo run` runs every stage in one process; "
            f"remove distributed there, or {instead}"
        )


def _method_parts(spec: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A merge spec as (name, arguments), the way ``safetydpo merge --method NAME --args JSON`` takes it."""
    if isinstance(spec, str):
        return spec, {}
    if "class_path" in spec:
        return str(spec["class_path"]), dict(spec.get("init_args") or {})
    return str(spec["name"]), {k: v for k, v in spec.items() if k != "name"}


def _set_export_path(namespace: Namespace, path: Path) -> None:
    """Point every ``LoraExport`` callback at the pipeline's expert file, adding one if the stack has none."""
    callbacks = namespace.trainer.callbacks or []
    exports = [cb for cb in callbacks if _is_lora_export(cb.class_path)]
    if not exports:
        callbacks.append(Namespace(class_path=f"{LoraExport.__module__}.LoraExport", init_args=Namespace(output_path=str(path))))
    for callback in exports:
        callback.init_args.output_path = str(path)
    namespace.trainer.callbacks = callbacks


def _is_lora_export(class_path: str) -> bool:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name) is LoraExport
    except (ImportError, AttributeError):
        return False
