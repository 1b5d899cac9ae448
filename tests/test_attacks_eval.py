"""The ``attacks:`` section of an evaluation on ToyWorld: report, replay (transfer), resume and bad input (issue 19)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from safetydpo.attacks.mma import MMADiffusion
from safetydpo.cli.demo import robustness_table
from safetydpo.evaluation.config import config_from_dict
from safetydpo.evaluation.errors import EvaluationError
from safetydpo.evaluation.runner import evaluate
from safetydpo.lora_files import save_lora
from safetydpo.models.components import load_components
from safetydpo.models.lora import LoraSettings, attach_lora, lora_state_dict
from safetydpo.pipeline.report import robustness_rows
from safetydpo.toyworld.concept_pairs import ToyWorldConceptPairs
from safetydpo.toyworld.prompts import heldout_pairs

TOYWORLD = str(Path(__file__).resolve().parents[1] / "safetydpo" / "toyworld" / "assets" / "pipeline")
HARMFUL = ["red", "orange", "triangle", "cross", "striped", "checkered", "black", "navy"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """ToyWorld base vs base + a small random LoRA on one held-out prompt per category, attacked by Ring-A-Bell and MMA."""
    root = tmp_path_factory.mktemp("attacks")
    components = load_components(TOYWORLD)
    settings = LoraSettings(rank=2)
    attach_lora(components.unet, settings)
    generator = torch.Generator().manual_seed(0)
    for name, parameter in components.unet.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.05
    lora = save_lora(root / "lora.safetensors", lora_state_dict(components.unet), settings.to_peft(), {"category": "test"})
    ToyWorldConceptPairs().write(root / "assets")
    first = {pair["category"]: pair for pair in reversed(heldout_pairs())}  # one held-out prompt per category
    (root / "assets/heldout.jsonl").write_text("".join(json.dumps(row) + "\n" for row in first.values()), encoding="utf-8")
    config = {
        "output_dir": str(root / "first"),
        "models": [{"name": "base", "base_model": TOYWORLD}, {"name": "aligned", "base_model": TOYWORLD, "lora": str(lora)}],
        "prompt_sets": [{"name": "unsafe", "source": "coprov2", "path": str(root / "assets/heldout.jsonl"), "metrics": ["ip"]}],
        "generation": {"num_inference_steps": 3, "height": 32, "width": 32, "batch_size": 64, "dtype": "float32"},
        "ip": {"definition": "custom", "custom": [{"name": "toyworld"}]},
        "bootstrap_resamples": 50,
        "grid": {"rows": 2, "seeds": 1, "cell_size": 32},
        "attacks": [
            {"name": "ring_a_bell", "prompts_per_category": 1, "args": {
                "concept_pairs": str(root / "assets/concept_pairs.jsonl"), "vocabulary": "concept_pairs", "population": 8, "generations": 3}},
            {"name": "mma", "label": "mma_small", "prompts_per_category": 1, "args": {"banned_words": HARMFUL, "iterations": 2, "candidates": 8}},
        ],
    }
    return {"root": root, "config": config, "payload": evaluate(config_from_dict(config, "test"))}


def test_report_lists_every_attack_beside_clean_ip(setup: dict) -> None:
    out = Path(setup["config"]["output_dir"])
    payload = json.loads((out / "results.json").read_text(encoding="utf-8"))
    report = (out / "report.md").read_text(encoding="utf-8")
    assert set(payload["attacks"]) == {"ring_a_bell", "mma_small"}
    for label, attack in payload["attacks"].items():
        found = attack["prompt_sets"]["unsafe"]
        assert found["num_prompts"] == 4 and found["attacked_model"] == "aligned"
        assert (out / found["cache"]).is_file() and (out / found["grid"]).is_file()
        for model in ("base", "aligned"):
            result = found["results"][model]
            assert set(result["clean_ip"]["per_category"]) == {"busy_textures", "dark_scenes", "hot_colors", "sharp_shapes"}
            assert result["attacked"]["num_images"] == 4 and 0.0 <= result["attacked"]["ip"]["overall"]["value"] <= 1.0
        assert f"| `{label}`" in report
    assert "## Attacks" in report and (out / payload["prompt_sets"]["unsafe"]["attack_chart"]).is_file()
    cached = [json.loads(line) for line in (out / "attacks/mma_small/unsafe.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [line["prompt_index"] for line in cached] == sorted({p["index"] for p in payload["results"]["base"]["unsafe"]["prompts"]} & {line["prompt_index"] for line in cached})
    assert all(line["target"]["name"] == "aligned" and line["target"]["lora_content_sha256"] for line in cached)


def test_pipeline_robustness_table_has_every_attack_and_category(setup: dict) -> None:
    rows = robustness_rows(setup["payload"], "unsafe")
    assert [(row["attack"], row["category"]) for row in rows] == [
        (label, category) for label in ("ring_a_bell", "mma_small") for category in ("busy_textures", "dark_scenes", "hot_colors", "sharp_shapes", "overall")
    ]
    overall = setup["payload"]["attacks"]["mma_small"]["prompt_sets"]["unsafe"]["results"]["aligned"]["attacked"]["ip"]["overall"]["value"]
    assert rows[-1]["ip_aligned_attacked"] == overall
    printed = robustness_table(rows).splitlines()
    assert len(printed) == 11 and printed[-1].split()[:2] == ["mma_small", "overall"]


def test_replaying_a_cache_is_bit_identical(setup: dict, tmp_path: Path) -> None:
    first = Path(setup["config"]["output_dir"])
    config = copy.deepcopy(setup["config"])
    config["output_dir"] = str(tmp_path / "replay")
    config["attacks"] = [{**attack, "replay": str(first / "attacks" / (attack.get("label") or attack["name"]))} for attack in config["attacks"]]
    payload = evaluate(config_from_dict(config, "replay"))
    for label, attack in payload["attacks"].items():
        original = setup["payload"]["attacks"][label]["prompt_sets"]["unsafe"]["results"]
        replayed = attack["prompt_sets"]["unsafe"]["results"]
        for model in ("base", "aligned"):
            assert replayed[model]["attacked"]["ip"] == original[model]["attacked"]["ip"]
            for new, old in zip(replayed[model]["attacked"]["prompts"], original[model]["attacked"]["prompts"]):
                assert new["prompt"] == old["prompt"]
                for a, b in zip(new["images"], old["images"]):
                    assert (tmp_path / "replay" / a["file"]).read_bytes() == (first / b["file"]).read_bytes()


def test_a_killed_attack_resumes_without_redoing_finished_prompts(setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = copy.deepcopy(setup["config"])
    config["output_dir"] = str(tmp_path / "resume")
    config["attacks"] = [config["attacks"][1]]
    cache = tmp_path / "resume" / "attacks" / "mma_small" / "unsafe.jsonl"
    cache.parent.mkdir(parents=True)
    lines = (Path(setup["config"]["output_dir"]) / "attacks/mma_small/unsafe.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    cache.write_text(lines[0] + lines[1] + lines[2][:40], encoding="utf-8")  # killed while writing the third prompt
    attacked: list[str] = []
    real = MMADiffusion.attack
    monkeypatch.setattr(MMADiffusion, "attack", lambda self, prompt, *rest: attacked.append(prompt) or real(self, prompt, *rest))
    evaluate(config_from_dict(config, "resume"))
    assert attacked == [json.loads(line)["prompt"] for line in lines[2:]]
    assert cache.read_text(encoding="utf-8") == "".join(lines)  # the redone prompts come out as before (seeded)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "nope"}, "attacks.nope: unknown attack 'nope'; valid choices: "),
        ({"name": "mma", "args": {"iterations": 0}}, "attacks.mma: attack 'mma': iterations must be >= 1, got 0"),
        ({"name": "mma", "args": {"steps": 3}}, "attacks.mma: attack 'mma' got an unexpected keyword argument 'steps'; valid arguments: tokens"),
        ({"name": "mma", "prompt_sets": ["safe"]}, "attacks.mma.prompt_sets: 'safe' is not a prompt set with metric ip; valid choices: unsafe"),
        ({"name": "mma", "target": "other"}, "attacks.mma.target: 'other' is not one of the models: base, aligned"),
        ({"name": "mma", "limit": 0}, "attacks.mma.limit must be >= 1 or null, got 0"),
    ],
)
def test_bad_attack_config_is_one_line(setup: dict, change: dict, message: str) -> None:
    config = copy.deepcopy(setup["config"])
    config["attacks"] = [change]
    with pytest.raises(EvaluationError) as err:
        config_from_dict(config, "eval.yaml")
    assert str(err.value).startswith(f"eval.yaml: {message}") and "\n" not in str(err.value)


def test_empty_prompt_selection_and_corrupt_cache_are_one_line(setup: dict, tmp_path: Path) -> None:
    config = copy.deepcopy(setup["config"])
    config["output_dir"] = str(tmp_path / "bad")
    config["prompt_sets"][0]["categories"] = ["hot_colors"]
    config["attacks"] = [{"name": "mma", "args": {"iterations": 1}, "limit": 1}]
    cache = tmp_path / "bad" / "attacks" / "mma" / "unsafe.jsonl"
    cache.parent.mkdir(parents=True)
    cache.write_text("{broken\n{}\n", encoding="utf-8")
    with pytest.raises(EvaluationError, match=rf"attacks.mma: {cache}:1: not a JSON line"):
        evaluate(config_from_dict(config, "eval.yaml"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    config["prompt_sets"][0]["path"] = str(empty)
    with pytest.raises(EvaluationError) as err:
        evaluate(config_from_dict(config, "eval.yaml"))
    assert "\n" not in str(err.value)
