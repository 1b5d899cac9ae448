"""FID through clean-fid with custom extractors and CLIPScore's math on a tiny open_clip model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from fixtures_eval import TinyFeatures, save_tiny_open_clip, write_images

from safetydpo.evaluation.clip import ClipSpec, load_clip
from safetydpo.evaluation.clipscore import clip_scores
from safetydpo.evaluation.config import FidConfig, load_config
from safetydpo.evaluation.errors import EvaluationError
from safetydpo.evaluation.fid import FEATURE_EXTRACTORS, ClipFeatures, FidScorer, build_extractor, image_files
from safetydpo.evaluation.images import open_rgb
from safetydpo.evaluation.runner import evaluate
from safetydpo.toyworld.judge import DEFAULT_JUDGE, JudgeFeatures

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fid")
    return {
        "real": write_images(root / "real", 24, seed=0),
        "resample": write_images(root / "resample", 24, seed=1),
        "shifted": write_images(root / "shifted", 24, seed=0, shift=40),
    }


@pytest.fixture(scope="module")
def open_clip_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_open_clip(tmp_path_factory.mktemp("open_clip"))


def test_fid_of_a_folder_with_itself_is_zero_and_grows_with_a_shift(folders: dict[str, Path]) -> None:
    scorer = FidScorer(TinyFeatures(), CPU, batch_size=8)
    itself = scorer.folders(folders["real"], folders["real"])
    same_distribution = scorer.folders(folders["resample"], folders["real"])
    shifted = scorer.folders(folders["shifted"], folders["real"])
    assert abs(itself) < 1e-9
    assert shifted > 10 * same_distribution > 0


def test_fid_clip_extractor_runs_through_clean_fid(folders: dict[str, Path], open_clip_model: str) -> None:
    scorer = FidScorer(ClipFeatures(load_clip(ClipSpec(model=open_clip_model), CPU)), CPU, batch_size=8)
    assert abs(scorer.folders(folders["real"], folders["real"])) < 1e-6
    assert scorer.folders(folders["shifted"], folders["real"]) > 1e-4


def test_registered_extractor_by_name_or_dotted_path_with_its_arguments() -> None:
    assert {"inception", "clip", "toyworld"} <= set(FEATURE_EXTRACTORS.names())
    for name in ("toyworld", "safetydpo.toyworld.judge.JudgeFeatures"):
        extractor = build_extractor(FidConfig(feature_extractor=name, extractor_args={"weights": str(DEFAULT_JUDGE)}), CPU)
        assert isinstance(extractor, JudgeFeatures) and not extractor.training
        assert extractor(torch.zeros(2, 3, 299, 299)).shape == (2, 256)
    with pytest.raises(EvaluationError, match="fid.extractor_args: .* 'toyworld' got an unexpected keyword argument 'dim'; valid arguments: weights"):
        build_extractor(FidConfig(feature_extractor="toyworld", extractor_args={"dim": 4}), CPU)
    with pytest.raises(EvaluationError, match="extractor_args only apply to a custom extractor"):
        build_extractor(FidConfig(feature_extractor="clip", extractor_args={"dim": 4}), CPU)


def test_config_naming_an_unregistered_extractor_is_refused_without_importing_or_running_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_pipeline_dir: Path
) -> None:
    """A shared YAML names a class to build; a dotted path outside the registry must not reach importlib."""
    (tmp_path / "planted.py").write_text("import pathlib\npathlib.Path(__file__).with_name('ran').touch()\nclass Extractor: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls: list[str] = []
    monkeypatch.setattr(os, "system", calls.append)
    (tmp_path / "coco.csv").write_text("prompt,evaluation_seed\na red square,1\n", encoding="utf-8")
    for name in ("os.system", "planted.Extractor"):
        config = {
            "output_dir": str(tmp_path / "out"),
            "models": [{"name": "base", "base_model": str(tiny_pipeline_dir)}],
            "prompt_sets": [
                {"name": "coco", "source": "coco", "path": str(tmp_path / "coco.csv"), "metrics": ["fid"],
                 "fid_reference": str(write_images(tmp_path / "reference", 2))}
            ],
            "fid": {"feature_extractor": name},
        }
        (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        with pytest.raises(EvaluationError) as error:
            evaluate(load_config(tmp_path / "eval.yaml"))
        valid = ", ".join(FEATURE_EXTRACTORS.names())
        assert str(error.value) == f"fid.feature_extractor: unknown FID feature extractor '{name}'; valid choices: {valid}"
    assert calls == [] and "planted" not in sys.modules and not (tmp_path / "ran").exists()
    assert not (tmp_path / "out").exists()


def test_missing_inception_weights_say_how_to_provide_them(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match="needs fid.inception_path: download https://.*inception-2015-12-05.pt once"):
        build_extractor(FidConfig(), CPU)
    with pytest.raises(EvaluationError, match=f"Inception weights not found at {tmp_path}/inception-2015-12-05.pt"):
        build_extractor(FidConfig(inception_path=str(tmp_path)), CPU)
    with pytest.raises(EvaluationError, match="loads a file named inception-2015-12-05.pt"):
        build_extractor(FidConfig(inception_path=str(tmp_path / "inception.pth")), CPU)


class _InceptionLayers(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)).repeat(1, 683)[:, :2048]


class _InceptionFile(torch.nn.Module):
    """A TorchScript file with the layout of clean-fid's Inception (``.layers``, 2048 features); the real one is 100 MB."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _InceptionLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


def test_inception_extractor_loads_the_local_torchscript_file(tmp_path: Path, folders: dict[str, Path]) -> None:
    torch.jit.script(_InceptionFile()).save(str(tmp_path / "inception-2015-12-05.pt"))
    for path in (tmp_path, tmp_path / "inception-2015-12-05.pt"):
        extractor = build_extractor(FidConfig(inception_path=str(path)), CPU)
        assert extractor(torch.full((2, 3, 299, 299), 192.0)).shape == (2, 2048)
    features = FidScorer(extractor, CPU, batch_size=8).features(image_files(folders["real"]), "test")
    assert features.shape == (24, 2048) and features.std(axis=0).min() > 0


def test_fid_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match="does not exist"):
        image_files(tmp_path / "absent")
    write_images(tmp_path / "one", 1)
    with pytest.raises(EvaluationError, match="holds 1 image\\(s\\); FID needs at least 2"):
        image_files(tmp_path / "one")


def test_clipscore_is_100_times_the_clamped_cosine(folders: dict[str, Path], open_clip_model: str) -> None:
    # Every image against every prompt, so the random model yields both positive and clamped (negative) cosines.
    images_4, prompts_4 = [Path(p) for p in image_files(folders["real"])[:4]], ["a cat", "a dog", "a red square", "noise"]
    paths = [path for path in images_4 for _ in prompts_4]
    prompts = prompts_4 * len(images_4)
    scores = clip_scores(load_clip(ClipSpec(model=open_clip_model), CPU), paths, prompts, batch_size=3, description="test")
    model, _, preprocess = open_clip.create_model_and_transforms(open_clip_model)
    tokenizer = open_clip.get_tokenizer(open_clip_model)
    with torch.no_grad():
        images = torch.nn.functional.normalize(model.encode_image(torch.stack([preprocess(open_rgb(p)) for p in paths])), dim=-1)
        texts = torch.nn.functional.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    cosines = (images * texts).sum(-1)
    assert (cosines > 0).any() and (cosines < 0).any()
    assert scores == pytest.approx((100 * cosines).clamp(min=0).tolist(), abs=1e-4)
