"""``data build`` and ``evaluate`` on two CPU (gloo) ranks: the files of one process, byte for byte; a rank killed
mid-render and a rerun; a second run on a locked folder; the GPU check's dry run (both benchmarks on the CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import yaml
from fixtures_train import BIN, REPO, cli_env, finish, start

from safetydpo.data.builder import build, load_build_config
from safetydpo.data.builder.build import RENDERED_DIR
from safetydpo.data.builder.lock import output_lock
from safetydpo.evaluation.config import load_config
from safetydpo.evaluation.runner import evaluate
from safetydpo.locking import LOCK_NAME

TAXONOMY = {"violence": {"blood": ["red paint"], "gore": ["red flowers"]}, "self-harm": {"noose": ["rope swing"]}}
SHARDS = 12  # 3 concepts x 4 pairs, 1 pair per shard: 6 shards per rank


def write_build_config(folder: Path, pipeline: Path, output: Path, devices: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    taxonomy = pipeline.parent / "taxonomy.yaml"  # one path for every build: the dataset card names it
    taxonomy.write_text(yaml.safe_dump(TAXONOMY))
    config = {
        "output": str(output),
        "taxonomy": str(taxonomy),
        "generator": {"name": "template", "seed": 0},
        "pairs": {"per_concept": 4},
        "render": {"base_model": str(pipeline), "steps": 2, "height": 32, "width": 32, "batch_size": 1, "shard_size": 1},
        "distributed": {"accelerator": "cpu", "devices": devices},
    }
    path = folder / f"data-{devices}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_eval_config(folder: Path, pipeline: Path, dataset: Path, output: Path, devices: int) -> Path:
    config = {
        "output_dir": str(output),
        "models": [{"name": "base", "base_model": str(pipeline)}],
        "prompt_sets": [{"name": "pairs", "source": "coprov2", "path": str(dataset), "images_per_prompt": 2, "metrics": ["ip"]}],
        # 24 images in 6 batches of 4: 3 per rank
        "generation": {"num_inference_steps": 2, "height": 32, "width": 32, "batch_size": 4},
        "ip": {"definition": "custom", "custom": [{"name": "nudenet", "threshold": 0.6}]},
        "bootstrap_resamples": 20,
        "grid": {"rows": 2, "seeds": 1, "cell_size": 32},
        "distributed": {"accelerator": "cpu", "devices": devices},
    }
    path = folder / f"eval-{devices}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def contents(root: Path) -> dict[str, bytes]:
    """Every file's bytes but the lock's (it names the process holding it)."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name not in ("lock", LOCK_NAME)
    }


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """The in-process references run with one thread, as the OMP_NUM_THREADS=1 ranks do (threads change float rounding)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_pipeline_dir: Path, one_thread: None) -> dict[str, Path]:
    """A one-process build and evaluation of it, in this process: what two ranks must write byte for byte."""
    folder = tmp_path_factory.mktemp("one-process")
    result = build(load_build_config(write_build_config(folder, tiny_pipeline_dir, folder / "data", devices=1)))
    assert result.shards == result.rendered_shards == SHARDS
    evaluate(load_config(write_eval_config(folder, tiny_pipeline_dir, folder / "data", folder / "eval", devices=1)))
    return {"data": folder / "data", "eval": folder / "eval"}


def build_command(config: Path) -> list[str]:
    return [str(BIN / "safetydpo"), "data", "build", "--config", str(config)]


def test_rank_killed_mid_render_then_a_rerun_writes_the_one_process_dataset(
    tmp_path: Path, tiny_pipeline_dir: Path, reference: dict[str, Path]
) -> None:
    output = tmp_path / "data"
    command = build_command(write_build_config(tmp_path, tiny_pipeline_dir, output, devices=2))
    log = tmp_path / "killed.log"
    main = start(command, log)  # Fabric's launcher: this process is rank 0, rank 1 is its child
    manifest = output / "manifest.json"
    deadline, killed = time.monotonic() + 300, None
    while time.monotonic() < deadline and main.poll() is None and killed is None:
        children = psutil.Process(main.pid).children()
        if children and manifest.is_file() and json.loads(manifest.read_text())["committed"]:
            children[0].send_signal(signal.SIGKILL)
            killed = children[0]
        time.sleep(0.01)
    assert killed is not None, log.read_text()[-3000:]
    main.wait(timeout=120)  # Lightning's launcher ends every rank when one dies: no rank waits forever
    assert main.returncode != 0
    state = json.loads(manifest.read_text())
    assert 1 <= len(state["committed"]) < SHARDS and not state["complete"], "killed mid-render"

    rerun = start(command, tmp_path / "rerun.log")
    finish(rerun, tmp_path / "rerun.log")
    assert f"{SHARDS} pairs in {SHARDS} shards" in (tmp_path / "rerun.log").read_text()
    # Every image and feature shard exactly once, no temporary file or rendered-mark left, the same bytes as one process.
    assert contents(output) == contents(reference["data"])
    assert not (output / RENDERED_DIR).exists() and json.loads(manifest.read_text())["complete"]


def test_two_rank_evaluation_writes_the_one_process_images_and_results(
    tmp_path: Path, tiny_pipeline_dir: Path, reference: dict[str, Path]
) -> None:
    output = tmp_path / "eval"
    config = write_eval_config(tmp_path, tiny_pipeline_dir, reference["data"], output, devices=2)
    process = start([str(BIN / "safetydpo"), "evaluate", "--config", str(config)], tmp_path / "eval.log")
    finish(process, tmp_path / "eval.log")
    written, expected = contents(output), contents(reference["eval"])
    assert sum(name.endswith(".png") and name.startswith("images/") for name in written) == 24
    assert written == expected, "PNGs, results.json (IP), report, grids: byte for byte"
    assert "rank 1/2" in (tmp_path / "eval.log").read_text(), "rank 1 rendered its batches"


def test_second_run_on_a_folder_being_written_stops_every_rank_with_one_line(tmp_path: Path, tiny_pipeline_dir: Path) -> None:
    output = tmp_path / "data"
    config = write_build_config(tmp_path, tiny_pipeline_dir, output, devices=2)
    with output_lock(output):  # this test is the run writing the folder
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python"]
        result = subprocess.run(
            [*torchrun, *build_command(config)], env=cli_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
        assert sorted(path.name for path in output.rglob("*")) == [".build", "lock"], "the refused run wrote nothing"
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "another build is writing" in line]
    assert len(lines) == 2, result.stderr[-3000:]  # rank 0 found the lock; rank 1 got its error
    assert lines[0] == lines[1] and lines[0].startswith("safetydpo data build: error: another build is writing")
    assert f"pid {os.getpid()}" in lines[0], "names the process holding the folder"


def table_rows(text: str) -> dict[str, list[str]]:
    return {cells[0]: cells[1:] for cells in (line.strip("| ").split(" | ") for line in text.splitlines() if line.startswith("| "))}


def test_gpu_check_dry_run_runs_both_benchmarks_and_writes_one_table(tmp_path: Path) -> None:
    env = {**cli_env(), "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--tiny"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = (tmp_path / "out" / "gpu_check.md").read_text()
    assert saved in result.stdout
    rows: dict[str, Any] = table_rows(saved)
    training, generation = rows["training, ours vs naive"], rows["generation, ours vs plain diffusers loop"]
    for row, unit in ((training, "pairs/s"), (generation, "images/s")):
        ours, baseline, ratio = row[0].split(), row[1].split(), row[2]
        assert ours[1] == baseline[1] == unit and float(ours[0]) > 0 and float(baseline[0]) > 0
        assert ratio.endswith("x") and float(ratio[:-1]) > 0
    assert rows["training + compile, ours vs naive"][0].startswith("skipped")
    assert "tiny pipeline" in saved and sorted(p.name for p in (tmp_path / "out" / "gpu_check_logs").iterdir()) == [
        "generation.log", "train.log"
    ]
