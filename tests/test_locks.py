"""One writer per output: fit, evaluate, merge and import refuse at once, in one line, an output another run holds."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures_train import cli_env, run_main, tiny_config, write_config

from safetydpo.data.builder import BuildError, import_table
from safetydpo.data.builder.lock import output_lock as build_lock
from safetydpo.evaluation.config import config_from_dict
from safetydpo.evaluation.errors import EvaluationError
from safetydpo.evaluation.runner import evaluate
from safetydpo.locking import LOCK_NAME, LockHeldError, output_lock
from safetydpo.lora_files import save_lora
from safetydpo.models.lora import LoraSettings

HOLDER = "pid {pid}: {argv}".format(pid=os.getpid(), argv=" ".join(sys.argv))


def test_a_held_lock_names_its_holder_and_a_killed_holder_frees_it(tmp_path: Path) -> None:
    lock = tmp_path / "out" / LOCK_NAME
    code = f"from pathlib import Path; from safetydpo.locking import output_lock\nwith output_lock(Path({str(lock)!r}), 'fit'):\n    print('held', flush=True); input()"
    holder = subprocess.Popen([sys.executable, "-c", code], env=cli_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(LockHeldError, match=rf"another fit is writing {re.escape(str(lock.parent))} \(held by pid {holder.pid}: -c; lock "):
            with output_lock(lock, "fit"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with output_lock(lock, "fit"):  # the OS dropped the killed holder's lock
        assert lock.read_text() == f"{HOLDER}\n"


def test_a_second_fit_into_a_held_folder_fails_at_once(
    tiny_pipeline_dir: Path, synthetic_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config(tmp_path, tiny_pipeline_dir, synthetic_data_dir)
    config["trainer"]["max_steps"] = 1
    path = write_config(tmp_path / "expert.yaml", config)
    checkpoints = Path(config["trainer"]["callbacks"][1]["init_args"]["dirpath"])
    start = time.perf_counter()
    with output_lock(checkpoints / LOCK_NAME, "fit"):
        code, _, stderr = run_main(["fit", "--config", str(path)], capsys)
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if "error" in line]
    assert line == (f"safetydpo fit: error: another fit is writing {checkpoints} (held by {HOLDER}; lock {checkpoints / LOCK_NAME}); "
                    "wait for it to finish or write somewhere else")
    assert time.perf_counter() - start < 60 and not list(checkpoints.glob("*.ckpt"))
    assert not (tmp_path / "run" / "experts").exists(), "no expert was exported"


def test_evaluate_refuses_a_held_output_dir(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    config = config_from_dict({
        "output_dir": str(out), "device": "cpu", "models": [{"name": "base", "base_model": str(tiny_pipeline_dir)}],
        "prompt_sets": [{"name": "p", "source": "i2p", "path": str(tmp_path / "p.csv"), "metrics": ["clipscore"]}],
    }, "eval.yaml")
    with output_lock(out / LOCK_NAME, "evaluation"):
        with pytest.raises(EvaluationError, match=rf"another evaluation is writing {re.escape(str(out))} \(held by pid {os.getpid()}"):
            evaluate(config)
        assert sorted(path.name for path in out.iterdir()) == [LOCK_NAME], "nothing was rendered or written"
    assert not out.exists(), "the folder the lock created goes with it"


def test_merge_refuses_an_output_another_merge_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = LoraSettings(rank=2, target_modules=["to_q"])
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    experts = []
    for seed, category in enumerate(("hate", "violence")):
        generator = torch.Generator().manual_seed(seed)
        weights = {f"{layer}.lora_A.weight": torch.randn(2, 8, generator=generator), f"{layer}.lora_B.weight": torch.randn(8, 2, generator=generator)}
        experts.append(str(save_lora(tmp_path / f"{category}.safetensors", weights, settings.to_peft(), {"category": category})))
    out = tmp_path / "merged" / "merged.safetensors"
    lock = out.parent / ".merged.safetensors.lock"
    with output_lock(lock, "merge"):
        code, _, stderr = run_main(["merge", "--experts", *experts, "--method", "linear", "--out", str(out)], capsys)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert f"safetydpo merge: error: another merge is writing {out.parent} (held by pid {os.getpid()}" in stderr
    assert not out.exists()
    code, stdout, stderr = run_main(["merge", "--experts", *experts, "--method", "linear", "--out", str(out)], capsys)
    assert code == 0 and out.is_file(), stderr


def test_import_refuses_a_folder_a_build_holds(tmp_path: Path) -> None:
    table = tmp_path / "pairs.csv"
    table.write_text("category,unsafe_prompt,safe_prompt\nviolence,a bloody knife,a clean knife\n", encoding="utf-8")
    out = tmp_path / "data"
    with build_lock(out), pytest.raises(BuildError, match=rf"another import is writing {re.escape(str(out / '.build'))} \(held by pid {os.getpid()}"):
        import_table(table, out)
    assert not (out / "pairs.parquet").exists()
    assert import_table(table, out).pairs == 1
