"""``safetydpo attack``: attacks without the evaluation's renders, their replay by another config, bad input (issue 19)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from safetydpo.cli.attack import run
from safetydpo.toyworld.prompts import heldout_pairs

TOYWORLD = str(Path(__file__).resolve().parents[1] / "safetydpo" / "toyworld" / "assets" / "pipeline")
HARMFUL = ["red", "orange", "triangle", "cross", "striped", "checkered", "black", "navy"]


def write_config(folder: Path, output: str, **attack: object) -> Path:
    """A ToyWorld evaluation of one model on one held-out prompt of two categories, with one small MMA attack."""
    first = {pair["category"]: pair for pair in reversed(heldout_pairs())}
    prompts = folder / "heldout.jsonl"
    prompts.write_text("".join(json.dumps(first[c]) + "\n" for c in ("hot_colors", "dark_scenes")), encoding="utf-8")
    config = {
        "output_dir": str(folder / output),
        "models": [{"name": "base", "base_model": TOYWORLD}],
        "prompt_sets": [{"name": "unsafe", "source": "coprov2", "path": str(prompts), "metrics": ["ip"]}],
        "ip": {"definition": "custom", "custom": [{"name": "toyworld"}]},
        "attacks": [{"name": "mma", "args": {"banned_words": HARMFUL, "iterations": 2, "candidates": 8, "top_k": 8}, **attack}],
    }
    path = folder / f"{output}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_attack_writes_the_cache_and_no_image_and_another_config_replays_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(["--config", str(write_config(tmp_path, "first"))])
    printed = capsys.readouterr().out
    cache = tmp_path / "first" / "attacks" / "mma" / "unsafe.jsonl"
    lines = cache.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["prompt_index"] for line in lines] == [0, 1]
    assert all(json.loads(line)["objective"] > json.loads(line)["history"][0] for line in lines)  # GCG raised the similarity
    assert "mma/unsafe: 2 prompts attacked on 'base'" in printed and f"cached in {cache}" in printed
    assert not (tmp_path / "first" / "images").exists() and not (tmp_path / "first" / "results.json").exists()

    run(["--config", str(write_config(tmp_path, "first"))])  # a rerun reuses both lines
    assert cache.read_text(encoding="utf-8").splitlines() == lines and capsys.readouterr().out == printed

    run(["--config", str(write_config(tmp_path, "second")), "--replay", str(tmp_path / "first" / "attacks")])
    assert f"replayed from {cache}" in capsys.readouterr().out
    assert not (tmp_path / "second" / "attacks").exists()


@pytest.mark.parametrize(
    ("attack", "args", "message"),
    [
        ({}, ["--replay", "{tmp}/nowhere"], "attacks.mma: replay: no cache {tmp}/nowhere/mma/unsafe.jsonl; point replay at"),
        ({"name": "nope"}, [], "attacks.nope: unknown attack 'nope'; valid choices: mma, p4d, ring_a_bell, unlearndiffatk"),
        ({}, ["--only", "[p4d]"], "--only: no attack labelled p4d; valid choices: mma"),
        ({}, ["--target", "aligned"], "--target: 'aligned' is not one of the models: base"),
        ({"args": {"iterations": 0}}, [], "attacks.mma: attack 'mma': iterations must be >= 1, got 0"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], attack: dict, args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        run(["--config", str(write_config(tmp_path, "bad", **attack)), *[a.replace("{tmp}", str(tmp_path)) for a in args]])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and error.count("\n") == 1
    assert message.replace("{tmp}", str(tmp_path)) in error, error


def test_a_corrupt_cache_line_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "broken" / "attacks" / "mma" / "unsafe.jsonl"
    cache.parent.mkdir(parents=True)
    cache.write_text("{broken\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        run(["--config", str(write_config(tmp_path, "broken"))])
    error = capsys.readouterr().err
    assert f"attacks.mma: {cache}:1: not a JSON line" in error and error.count("\n") == 1
    assert cache.read_text(encoding="utf-8") == "{broken\n"  # the user's file is left as it was
