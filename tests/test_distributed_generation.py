"""``data build`` and ``evaluate`` on two CPU (gloo) ranks: the files of one process, byte for byte; a rank killed
mid-render and a rerun; failures and a locked folder reach every rank; the GPU check's dry run (both benchmarks)."""

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

import pytest
import torch
import yaml
from fixtures_train import BIN, REPO, cli_env, finish, start

from safetydpo.data.builder import build, load_build_config
from safetydpo.data.builder.build import RENDERED_DIR
from safetydpo.evaluation.config import load_config
from safetydpo.evaluation.runner import evaluate
from safetydpo.locking import LOCK_NAME, output_lock

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


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux ``/proc``): the ranks Fabric's launcher started."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, ...
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


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
        ranks = children(main.pid)
        if ranks and manifest.is_file() and json.loads(manifest.read_text())["committed"]:
            os.kill(ranks[0], signal.SIGKILL)
            killed = ranks[0]
        time.sleep(0.01)
    assert killed is not None, log.read_text()[-3000:]
    main.wait(timeout=120)  # Lightning's launcher ends every rank when one dies: no rank waits forever
    assert main.returncode != 0
    state = json.loads(manifest.read_text())
    assert 1 <= len(state["committed"]) < SHARDS and not state["complete"], "killed mid-render"

    # The rerun may use another number of ranks (here: this process alone); it renders what was not committed.
    rerun = build(load_build_config(write_build_config(tmp_path, tiny_pipeline_dir, output, devices=1)))
    assert rerun.rendered_shards == SHARDS - len(state["committed"])
    # Every image and feature shard exactly once, no temporary file or rendered-mark left, the same bytes as one process.
    assert contents(output) == contents(reference["data"])
    assert not (output / RENDERED_DIR).exists() and json.loads(manifest.read_text())["complete"]


def test_two_rank_evaluation_writes_the_one_process_images_and_results(
    tmp_path: Path, tiny_pipeline_dir: Path, reference: dict[str, Path]
) -> None:
    output = tmp_path / "eval"
    config = write_eval_config(tmp_path, tiny_pipeline_dir, reference["data"], output, devices=2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python"]
    process = start([*torchrun, str(BIN / "safetydpo"), "evaluate", "--config", str(config)], tmp_path / "eval.log")
    finish(process, tmp_path / "eval.log")
    written, expected = contents(output), contents(reference["eval"])
    assert sum(name.endswith(".png") and name.startswith("images/") for name in written) == 24
    assert written == expected, "PNGs, results.json (IP), report, grids: byte for byte"
    assert "rank 1/2" in (tmp_path / "eval.log").read_text(), "rank 1 rendered its batches"


def test_a_failure_on_one_rank_is_the_same_error_on_every_rank(tmp_path: Path) -> None:
    """Ranks' helpers on a real gloo group: no rank is left waiting in a collective for a rank that stopped."""
    from fixtures_ranks import rank_worker
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    locked = tmp_path / "being-written"
    with output_lock(locked / LOCK_NAME, "build"):  # this test is the run writing the folder
        torch.multiprocessing.spawn(rank_worker, args=(find_free_network_port(), str(tmp_path), str(locked)), nprocs=2, join=True)
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    refusal = seen[0]["lock"]
    assert refusal.startswith(f"another build is writing {locked} (held by pid {os.getpid()}") and "\n" not in refusal
    for rank, view in enumerate(seen):
        assert (view["rank"], view["world_size"]) == (rank, 2)
        assert view["on_all"] == "rank 1 could not render shard 3", "rank 0 learns of rank 1's failure"
        assert view["on_zero"] == "output was built with a different config", "rank 1 learns of rank 0's failure"
        assert view["share"] == {"pending": [1, 3]}
        assert view["on_all_ok"] == rank * 10, "without a failure every rank gets its own result"
        assert view["lock"] == refusal, "rank 0 found the folder locked; rank 1 stops with its one line"


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


@pytest.mark.gpu
def test_sd15_generation_benchmark_on_gpu(tmp_path: Path) -> None:
    command = [sys.executable, str(REPO / "benchmarks" / "generation_throughput.py"), "--device", "cuda", "--batch-size", "2",
               "--batches", "1", "--steps", "4", "--channels-last"]
    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table_rows(result.stdout)
    assert float(rows["ours"][0]) > 0 and float(rows["plain"][0]) > 0, "random SD 1.5 weights render valid images in bf16"
