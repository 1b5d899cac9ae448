"""Concept-erasure baselines on the tiny pipeline: ESD-u trains, UCE edits exactly, SLD renders through diffusers."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_lora import applied_update
from fixtures_train import REPO, run, run_main
from lightning.pytorch import Trainer

from safetydpo.baselines import BaselineError
from safetydpo.baselines.esd import ESDModule
from safetydpo.baselines.uce import UCE
from safetydpo.data.concepts import ConceptBatch, ConceptPromptDataModule
from safetydpo.evaluation.config import GenerationConfig, ModelConfig
from safetydpo.evaluation.errors import EvaluationError
from safetydpo.evaluation.generate import check_model, load_pipeline
from safetydpo.models.components import load_components
from safetydpo.models.lora import LoraSettings

CONCEPT, TARGET, KEEP = "a red circle on a white background", "a blue circle on a white background", "a green square on a gray background"


@pytest.fixture()
def sdxl_dir(tmp_path: Path, tiny_pipeline_dir: Path) -> Path:
    """The tiny pipeline's folder claiming to be SDXL (only model_index.json is read before refusing it)."""
    folder = tmp_path / "sdxl"
    folder.mkdir()
    index = json.loads((tiny_pipeline_dir / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    return folder


def test_esd_objective_falls_on_the_tiny_pipeline(tiny_pipeline_dir: Path) -> None:
    module = ESDModule(str(tiny_pipeline_dir), sampling_steps=2, learning_rate=3e-3, lora=LoraSettings(rank=4))
    data = ConceptPromptDataModule(prompts=[CONCEPT, "a red square on a gray background"], batch_size=2)
    probe = ConceptBatch(data.prompts, torch.arange(2))

    def objective() -> float:
        with torch.no_grad():
            return float(np.mean([module.esd_errors(probe, step).mean().item() for step in range(4)]))

    before = objective()
    with warnings.catch_warnings(record=True) as caught:  # the filters in force, ESDModule's included
        Trainer(max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False).fit(module, data)
    after = objective()
    assert after < 0.8 * before, (before, after)
    assert not [w for w in caught if "val_dataloader" in str(w.message)]  # concept prompts have no validation pairs


def test_uce_maps_the_concept_to_its_target_and_keeps_the_kept_concept(tiny_pipeline_dir: Path) -> None:
    components = load_components(str(tiny_pipeline_dir))
    edit = UCE(concepts=[CONCEPT], targets=[TARGET], keep=[KEEP])
    deltas = edit.edit(components)
    erased, target, kept = edit.embeddings(components)
    modules = dict(components.unet.named_modules())
    cross_attention = [name for name in modules if name.endswith(".attn2")]
    assert sorted(deltas) == sorted(f"{name}.{p}" for name in cross_attention for p in ("to_k", "to_v"))
    for name, delta in deltas.items():
        old = modules[name].weight.double()
        new = old + delta
        # Before the edit the concept's keys/values are ||(C - C*) W^T|| away from the target's; after it, a small share of that.
        moved = (erased @ new.T - target @ old.T).norm() / (erased @ old.T - target @ old.T).norm()
        drift = (kept @ new.T - kept @ old.T).norm() / (kept @ old.T).norm()
        assert moved < 0.25, (name, float(moved))
        assert drift < 0.05, (name, float(drift))


def test_uce_lora_reproduces_the_edited_weights_inside_diffusers(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "uce.safetensors"
    code = run_main_uce(["--base-model", str(tiny_pipeline_dir), "--out", str(out), "--concepts", f"[{CONCEPT}]", "--targets", f"[{TARGET}]",
                         "--keep", f"[{KEEP}]"])
    assert code == 0
    components = load_components(str(tiny_pipeline_dir))
    expected = UCE(concepts=[CONCEPT], targets=[TARGET], keep=[KEEP]).edit(components)
    applied = applied_update(tiny_pipeline_dir, out)
    assert set(applied) == set(expected)
    for name, delta in expected.items():
        assert torch.allclose(applied[name].double(), delta, atol=1e-5, rtol=0), name
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["baseline"] == "uce" and card["method_args"]["keep"] == [KEEP]


def run_main_uce(argv: list[str]) -> int:
    from safetydpo.cli.main import main

    try:
        main(["uce", *argv])
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def render_pair(tiny_pipeline_dir: Path, **sld: object) -> tuple[np.ndarray, np.ndarray]:
    """The same two seeded renders from the plain pipeline and from the model with ``sld`` settings."""
    generation = GenerationConfig(num_inference_steps=4, guidance_scale=5.0, height=32, width=32)
    arrays = []
    for model in (ModelConfig("plain", str(tiny_pipeline_dir)), ModelConfig("sld", str(tiny_pipeline_dir), **sld)):
        check_model(model)
        pipe = load_pipeline(model, torch.device("cpu"), torch.float32)
        output = pipe(prompt=[CONCEPT, KEEP], generator=[torch.Generator().manual_seed(s) for s in (0, 1)], guidance_scale=5.0,
                      height=32, width=32, num_inference_steps=generation.num_inference_steps, output_type="np")
        arrays.append(output.images)
    return arrays[0], arrays[1]


class Records(logging.Handler):
    """Keeps the messages of the records that reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_sld_at_strength_zero_equals_plain_generation_and_steers_otherwise(tiny_pipeline_dir: Path) -> None:
    records = Records()
    logging.getLogger("diffusers").addHandler(records)  # diffusers' loggers do not propagate to the root (caplog)
    try:
        with warnings.catch_warnings(record=True) as caught:
            plain, off = render_pair(tiny_pipeline_dir, sld="max", sld_concept="red", sld_guidance_scale=0.0)
    finally:
        logging.getLogger("diffusers").removeHandler(records)
    np.testing.assert_allclose(off, plain, atol=1e-6)
    # SLD's expected deprecation notices (the pipeline's, its decode_latents') are silenced.
    assert not [m for m in records.messages if "has been deprecated" in m]
    assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]
    plain, steered = render_pair(tiny_pipeline_dir, sld="max", sld_concept="red")
    assert np.abs(steered - plain).mean() > 1e-3, "the max preset changes the renders"


def test_bad_baseline_input_is_one_line_naming_the_option(
    tiny_pipeline_dir: Path, sdxl_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "uce.safetensors")
    code, _, err = run_main(["uce", "--base-model", str(tiny_pipeline_dir), "--out", out, "--concepts", "[red]"], capsys)
    assert code == 2 and err.count("\n") == 1 and "keep is empty" in err
    code, _, err = run_main(["uce", "--base-model", str(sdxl_dir), "--out", out, "--concepts", "[red]", "--keep", "[blue]"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--base-model" in err and "StableDiffusionXLPipeline" in err
    assert not Path(out).exists(), "nothing is written"
    with pytest.raises(BaselineError, match="model.init_args.base_model .* StableDiffusionXLPipeline"):
        ESDModule(str(sdxl_dir))
    with pytest.raises(EvaluationError, match=r"sld needs a safety concept .* models\[\]\.sld_concept"):
        check_model(ModelConfig("sld", str(tiny_pipeline_dir), sld="strong"))
    with pytest.raises(EvaluationError, match="sld 'huge' is not a preset; valid choices: weak, medium, strong, max"):
        check_model(ModelConfig("sld", str(tiny_pipeline_dir), sld="huge", sld_concept="red"))
    with pytest.raises(EvaluationError, match="sld needs a Stable Diffusion"):
        check_model(ModelConfig("sld", str(sdxl_dir), sld="weak", sld_concept="red"))


def test_baselines_benchmark_smoke_run(tmp_path: Path) -> None:
    result = run([sys.executable, str(REPO / "benchmarks" / "baselines.py"), "--tiny", "--folder", str(tmp_path / "b")], cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "b" / "baselines.json").read_text())
    assert {"base", "esd_u", "uce", "sld_medium"} <= set(saved["main"])
    for name, row in saved["main"].items():
        assert 0.0 <= row["ip_overall"] <= 1.0 and 0.0 <= row["safe_fidelity"] <= 1.0, name
    assert saved["main"]["base"]["same_seed"]["safe"]["pixel"] == 0.0, "base against itself"
    assert (tmp_path / "b" / "scaling.png").stat().st_size > 0
