"""The benchmarks run end to end: train_throughput (tiny anywhere, SD 1.5 size on a GPU), merge_ablation (small ToyWorld)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
from fixtures_train import REPO, run

SCRIPT = REPO / "benchmarks" / "train_throughput.py"


def benchmark(tmp_path: Path, *args: str) -> dict[str, str]:
    """Run the benchmark; return its table rows and ratio lines by name."""
    result = run([sys.executable, str(SCRIPT), *args], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {cells[0]: cells[1:] for cells in (line.strip("| ").split(" | ") for line in result.stdout.splitlines() if line.startswith("| ")) if cells}
    ratios = dict(re.findall(r"^ours/naive (pairs/s|peak memory): (\S+)", result.stdout, re.MULTILINE))
    return {"ours": rows["ours"], "naive": rows["naive"], **ratios}


def speed_ratio(text: str) -> float:
    assert text.endswith("x"), text
    return float(text[:-1])


def test_tiny_benchmark_reports_both_steps_and_their_ratio(tmp_path: Path) -> None:
    report = benchmark(tmp_path, "--tiny", "--steps", "2", "--warmup", "1", "--batch-size", "2", "--device", "cpu")
    for step in ("ours", "naive"):
        pairs_per_second, memory = report[step]
        assert math.isfinite(float(pairs_per_second)) and float(pairs_per_second) > 0
        assert memory == "n/a (CPU: not measured)"
    assert math.isfinite(speed_ratio(report["pairs/s"])) and speed_ratio(report["pairs/s"]) > 0
    assert report["peak memory"] == "n/a"


@pytest.mark.gpu
def test_sd15_benchmark_on_gpu(tmp_path: Path) -> None:
    report = benchmark(tmp_path, "--steps", "3", "--warmup", "2", "--batch-size", "4", "--device", "cuda")
    assert speed_ratio(report["pairs/s"]) > 0
    assert 0 < speed_ratio(report["peak memory"]) < 1, "one bf16 UNet uses less memory than two fp32 ones"


@pytest.mark.slow
def test_merge_ablation_prints_ip_per_category_for_each_method(tmp_path: Path) -> None:
    small = ["--all-single-steps", "20", "--variables.sampling_steps", "8", "--evaluate.images_per_prompt", "1",
             "--data.overrides", "{render: {steps: 8}, pairs: {per_concept: 6}}",
             "--experts.overrides", "{trainer: {max_steps: 10}, data: {init_args: {batch_size: 8}}}",
             "--merge.num_batches", "1", "--merge.batch_size", "8",
             "--evaluate.overrides", "{generation: {num_inference_steps: '${variables.sampling_steps}'}, attacks: []}",
             "--evaluate.assets", "[{name: toyworld_heldout, seed: 0, reference_renders: 1}]"]
    result = run([sys.executable, str(REPO / "benchmarks" / "merge_ablation.py"), "--output", str(tmp_path / "demo"),
                  "--methods", "comerge", "linear", *small], cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    table = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in result.stdout.splitlines()
             if line.split() and line.split()[0] in {"base", "comerge", "linear", "all_single"}}
    assert set(table) == {"base", "comerge", "linear", "all_single"}
    assert all(len(values) == 8 for values in table.values()), "4 categories, overall, two fidelities, FID"
    assert min(table["base"][:5]) > 0.9, "held-out unsafe prompts show their concept on the base model"
    assert all(0.0 <= v <= 1.0 for values in table.values() for v in values[:7])
    saved = json.loads((tmp_path / "demo" / "ablation" / "merge_ablation.json").read_text())
    assert set(saved["rows"]) == {"comerge", "linear", "all_single"}
