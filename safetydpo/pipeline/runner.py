"""Runs planned steps in order, skipping those whose record matches, with one progress line per stage and step.

A step's record is written only after its outputs are on disk, so a run killed anywhere resumes at
the first unfinished step; a failing step leaves every earlier step's outputs and records intact.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
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


def _run_steps(todo: list[Step], echo: Callable[[str], None]) -> None:
    """Run a stage's steps that are not up to date, up to ``workers`` at once, recording each as it finishes.

    After a failure no further step starts; the running ones finish and keep their records, then the
    first failure is raised, so a rerun resumes with only the failed and unstarted steps.
    """
    pending = []
    for step in todo:
        if is_current(step.output, step.hash, step.outputs):
            echo(f"[pipeline] {step.name}: up to date, skipped")
        else:
            pending.append(step)
    workers = min((step.workers for step in pending), default=1)
    if workers == 1:  # in this thread: Lightning installs signal handlers, which only the main thread may
        for step in pending:
            _finish(step, _timed(step), echo)
        return
    failure: PipelineError | None = None
    queue = iter(pending)
    with ThreadPoolExecutor(workers) as pool:
        running = {pool.submit(_timed, step): step for step in itertools.islice(queue, workers)}
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                step = running.pop(future)
                try:
                    _finish(step, future.result(), echo)
                except PipelineError as err:
                    failure = failure or err
                    continue
                if failure is None:
                    for following in itertools.islice(queue, 1):
                        running[pool.submit(_timed, following)] = following
    if failure is not None:
        raise failure


def _timed(step: Step) -> float:
    """Run the step's action; its seconds, or its error named by step."""
    start = time.perf_counter()
    try:
        step.action()
    except (ValueError, OSError, FloatingPointError) as err:  # the project's errors are ValueErrors
        raise PipelineError(f"{step.name} failed (earlier steps' outputs are kept; rerun to resume): {err}") from err
    return time.perf_counter() - start


def _finish(step: Step, seconds: float, echo: Callable[[str], None]) -> None:
    write_record(step.output, step.name, step.hash, step.fingerprint, seconds)
    echo(f"[pipeline] {step.name}: done in {elapsed(seconds)}")


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
            _run_steps(todo, echo)
            echo(f"[pipeline] stage {stage}: finished in {elapsed(time.perf_counter() - stage_start)}")
    return steps
