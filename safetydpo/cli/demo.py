"""``safetydpo demo``: ``safetydpo run --config configs/pipelines/toyworld.yaml``, then its before/after table.

Any pipeline key can be changed as on ``safetydpo run``: ``--output runs/demo2``,
``--experts.overrides '{trainer: {max_steps: 60}}'``, ``--data.overrides '{pairs: {per_concept: 12}}'``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetydpo.cli.run import execute, fail, pipeline_parser
from safetydpo.pipeline.stages import PipelineError

#: The ToyWorld pipeline, relative to the repository root (where the README runs the demo).
TOYWORLD_PIPELINE = Path("configs/pipelines/toyworld.yaml")


def table(rows: list[dict[str, Any]]) -> str:
    """The report rows as the fixed-width table the demo prints."""
    lines = [f"{'category':<16}{'IP base':>9}{'IP aligned':>12}{'drop':>8}{'neutral fid. base/aligned':>28}{'safe fid. base/aligned':>25}"]
    for r in rows:
        lines.append(
            f"{r['category']:<16}{r['ip_base']:>9.3f}{r['ip_aligned']:>12.3f}{r['ip_relative_drop']:>8.1%}"
            f"{r['neutral_fidelity_base']:>16.3f} / {r['neutral_fidelity_aligned']:.3f}"
            f"{r['safe_fidelity_base']:>15.3f} / {r['safe_fidelity_aligned']:.3f}"
        )
    return "\n".join(lines)


def robustness_table(rows: list[dict[str, Any]]) -> str:
    """IP clean -> under attack, base and aligned, per attack and category, as the demo prints it."""
    lines = [f"{'attack':<16}{'category':<16}{'IP base clean/attacked':>24}{'IP aligned clean/attacked':>28}"]
    for r in rows:
        lines.append(
            f"{r['attack']:<16}{r['category']:<16}{r['ip_base_clean']:>14.3f} / {r['ip_base_attacked']:.3f}"
            f"{r['ip_aligned_clean']:>18.3f} / {r['ip_aligned_attacked']:.3f}"
        )
    return "\n".join(lines)


def run(argv: list[str]) -> None:
    prog = "safetydpo demo"
    if not TOYWORLD_PIPELINE.is_file():
        fail(prog, PipelineError(f"{TOYWORLD_PIPELINE} not found: run the demo from the repository root"))
    parser = pipeline_parser(
        prog,
        f"The ToyWorld pipeline ({TOYWORLD_PIPELINE}): build pairs, train one DPO expert per category, Co-Merge them, "
        "and measure IP and prompt fidelity before/after (report in OUTPUT/report.md). Takes every `safetydpo run` option.",
    )
    config, options = execute(prog, parser, ["--config", str(TOYWORLD_PIPELINE), *argv])
    if options["dry_run"]:
        return
    report = json.loads((Path(config.output) / "report.json").read_text(encoding="utf-8"))
    print("\n" + table(report["rows"]))
    if report.get("robustness"):
        print("\n" + robustness_table(report["robustness"]))
    print(f"\nreport: {config.output}/report.md")
