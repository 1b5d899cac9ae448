"""Runs planned steps in order, skipping those whose record matches, with one progress line per stage and step.

A step's record is written only after its outputs are on disk, so a run killed anywhere resumes at
the first unfinished step; a failing step leaves every earlier step's outputs and records intact.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from safetydpo.data.builder.lock import output_lock
from safetydpo.io import atomic_file
from safetydpo.pipeline.config import STAGES, PipelineConfig
from safetydpo.pipeline.records import is_current, write_record
from safetydpo.pipeline.stages import PipelineError, Planner, Step
from safetydpo.progress import elapsed


def selected_stages(start: str | None, only: str | None) -> list[str]:
    """The stages to run: all, from ``start`` on, or ``only`` one."""
    for key, value in (("--from", start), ("--only", only)):
        if value is not None and value not in STAGES:
            raise PipelineError(f"{key} '{value}' is not a stage; valid choices: {', '.join(STAGES)}")
    if start and only:
        raise PipelineError("use --from or --only, not both")
    if only:
        return [only]
    return list(STAGES[STAGES.index(start):]) if start else list(STAGES)


def _check_needs(steps: list[Step], chosen: list[Step]) -> None:
    """Inputs that stages left out of this run must have made already."""
    made_here = {path for step in chosen for path in step.outputs}
    makers = {path: step for step in steps for path in step.outputs}
    for step in chosen:
        for path in step.needs:
            if path not in made_here and not path.exists():
                maker = makers.get(path)
                by = f" (made by stage {maker.stage})" if maker else ""
                raise PipelineError(f"stage {step.stage} needs {path}{by}, which does not exist yet; run that stage first")


def run_pipeline(
    config: PipelineConfig,
    start: str | None = None,
    only: str | None = None,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> list[Step]:
    """Plan every stage (checking all configs first), then run the selected ones; returns the planned steps."""
    stages = selected_stages(start, only)
    steps = Planner(config).plan()
    chosen = [step for step in steps if step.stage in stages]
    _check_needs(steps, chosen)
    root = Path(config.output)
    if dry_run:
        for stage in stages:
            echo(f"stage {stage}")
            for step in (s for s in chosen if s.stage == stage):
                state = "up to date" if is_current(step.output, step.hash, step.outputs) else "to run"
                echo(f"  {step.name}: {state}")
                echo(f"    command: {step.command}")
                echo(f"    writes:  {', '.join(str(p) for p in step.outputs)}")
        return steps
    with output_lock(root):
        for step in steps:  # every stage's, so a stage run by hand (e.g. an expert under srun) has its file
            if step.resolved is not None:
                path, text = step.resolved
                with atomic_file(path) as tmp:
                    tmp.write_text(text, encoding="utf-8")
        for stage in stages:
            todo = [s for s in chosen if s.stage == stage]
            if not todo:
                echo(f"[pipeline] stage {stage}: not configured")
                continue
            echo(f"[pipeline] stage {stage}: start ({len(todo)} step{'s' if len(todo) > 1 else ''})")
            stage_start = time.perf_counter()
            for step in todo:
                if is_current(step.output, step.hash, step.outputs):
                    echo(f"[pipeline] {step.name}: up to date, skipped")
                    continue
                step_start = time.perf_counter()
                try:
                    step.action()
                except (ValueError, OSError, FloatingPointError) as err:  # the project's errors are ValueErrors
                    raise PipelineError(f"{step.name} failed (earlier steps' outputs are kept; rerun to resume): {err}") from err
                seconds = time.perf_counter() - step_start
                write_record(step.output, step.name, step.hash, step.fingerprint, seconds)
                echo(f"[pipeline] {step.name}: done in {elapsed(seconds)}")
            echo(f"[pipeline] stage {stage}: finished in {elapsed(time.perf_counter() - stage_start)}")
    return steps
