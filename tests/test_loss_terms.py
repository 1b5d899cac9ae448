"""Loss terms beyond per-pair errors: Min-SNR-γ DPO, Diffusion-KTO, and weighted lists of terms (the anchor term among them).

Expected values are worked out by hand in each test from the formulas in docs/losses.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from fixtures_train import run_main, write_config
from fixtures_train import tiny_config as base_config

from safetydpo.data import CoProV2DataModule
from safetydpo.lightning_cli import parse_fit_config
from safetydpo.losses import LOSSES, DenoisingErrors, build_loss, build_objective
from safetydpo.models import DPOExpertModule, LoraSettings


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def two_pairs(**schedule: object) -> DenoisingErrors:
    """Pair 1: e_w .30, e_l .50, ref_w .40, ref_l .45 (margin .15). Pair 2: e_w .20, e_l .30, ref_w .32, ref_l .27 (margin .15)."""
    return DenoisingErrors(
        torch.tensor([0.30, 0.20], requires_grad=True), torch.tensor([0.50, 0.30]), torch.tensor([0.40, 0.32]), torch.tensor([0.45, 0.27]),
        **schedule,  # type: ignore[arg-type]
    )


def test_min_snr_dpo_weights_each_pair_by_its_snr() -> None:
    loss = build_loss("min_snr_dpo", beta=0.2, gamma=5.0)
    snr = torch.tensor([2.0, 10.0])
    # epsilon: w = min(snr, 5) / snr = [1, 0.5]; reward = beta/2 * w * margin = 0.1 * w * 0.15
    eps = loss(two_pairs(snr=snr, prediction_type="epsilon"))
    assert eps.reward_margin.tolist() == pytest.approx([0.015, 0.0075], rel=1e-5)
    assert eps.loss.item() == pytest.approx((softplus(-0.015) + softplus(-0.0075)) / 2, rel=1e-6)
    # v-prediction: w = min(snr, 5) / (snr + 1) = [2/3, 5/11]
    v = loss(two_pairs(snr=snr, prediction_type="v_prediction"))
    assert v.reward_margin.tolist() == pytest.approx([0.015 * 2 / 3, 0.015 * 5 / 11], rel=1e-5)
    # Below gamma on an epsilon model the weight is 1: plain Diffusion-DPO.
    low = two_pairs(snr=torch.tensor([0.5, 4.0]), prediction_type="epsilon")
    assert loss(low).loss.item() == pytest.approx(build_loss("diffusion_dpo", beta=0.2)(low).loss.item(), rel=1e-6)


def test_min_snr_dpo_refuses_what_it_cannot_weight() -> None:
    loss = build_loss("min_snr_dpo")
    with pytest.raises(ValueError, match="min_snr_dpo needs the pairs' SNR"):
        loss(two_pairs())
    with pytest.raises(ValueError, match="min_snr_dpo weights epsilon or v_prediction errors, not flow_matching; use diffusion_dpo"):
        loss(two_pairs(snr=torch.tensor([1.0, 1.0]), prediction_type="flow_matching"))


def test_diffusion_kto_value_reference_point_and_gradient() -> None:
    errors = two_pairs()
    out = build_loss("diffusion_kto", beta=10.0, desirable_weight=1.0, undesirable_weight=2.0)(errors)
    # rewards r = ref - e: winners [.10, .12], losers [-.05, -.03]; Q = max(0, mean) = .14 / 4 = .035
    q = 0.035
    desirable = [1 - sigmoid(10 * (0.10 - q)), 1 - sigmoid(10 * (0.12 - q))]
    undesirable = [2 * (1 - sigmoid(10 * (q + 0.05))), 2 * (1 - sigmoid(10 * (q + 0.03)))]
    assert out.loss.item() == pytest.approx(sum(desirable + undesirable) / 4, rel=1e-6)
    assert out.reward_margin.tolist() == pytest.approx([1.5, 1.5], rel=1e-5), "beta * margin"
    out.loss.backward()
    # The reference point carries no gradient: d loss / d e_w1 = beta * s(1 - s) / 4 with s = sigmoid(10 * (.10 - Q)).
    s = sigmoid(10 * (0.10 - q))
    assert errors.policy_winner.grad[0].item() == pytest.approx(10 * s * (1 - s) / 4, rel=1e-5)
    # A batch whose policy is worse than the reference on average: Q clamps at 0.
    worse = DenoisingErrors(torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([0.4]), torch.tensor([0.4]))
    expected = ((1 - sigmoid(10 * -0.1)) + (1 - sigmoid(10 * 0.1))) / 2
    assert build_loss("diffusion_kto", beta=10.0)(worse).loss.item() == pytest.approx(expected, rel=1e-6)


def test_a_list_is_the_weighted_sum_of_its_terms() -> None:
    errors = DenoisingErrors(
        torch.tensor([0.30]), torch.tensor([0.50]), torch.tensor([0.40]), torch.tensor([0.45]), anchor_drift=torch.tensor([0.01, 0.03])
    )
    objective = build_objective([{"name": "diffusion_dpo", "beta": 0.1}, {"name": "ipo", "beta": 10, "tau": 0.5, "weight": 3}, {"name": "anchor", "weight": 100}])
    out = objective(errors)
    # dpo: softplus(-beta/2 * .15) = softplus(-.0075); ipo: (10/2 * .15 - 1)^2 = .0625, times 3; anchor: 100 * mean(.01, .03) = 2
    terms = {"diffusion_dpo": softplus(-0.0075), "ipo": 3 * 0.0625, "anchor": 2.0}
    assert {key: value.item() for key, value in out.terms.items()} == pytest.approx(terms, rel=1e-5)
    assert out.loss.item() == pytest.approx(sum(terms.values()), rel=1e-6)
    assert out.reward_margin.item() == pytest.approx(0.0075, rel=1e-5), "the first term that scores pairs gives the margin"
    assert objective.uses_reference and objective.uses_anchors
    assert objective.spec() == [
        {"name": "diffusion_dpo", "weight": 1.0, "beta": 0.1},
        {"name": "ipo", "weight": 3.0, "beta": 10, "tau": 0.5},
        {"name": "anchor", "weight": 100.0},
    ]
    assert build_objective("ipo").spec() == {"name": "ipo", "beta": 5000.0, "tau": 0.1}, "a single loss's card entry is unchanged"
    twice = build_objective(["diffusion_dpo", {"name": "diffusion_dpo", "beta": 1.0}])
    assert [term.key for term in twice.terms] == ["diffusion_dpo_1", "diffusion_dpo_2"]


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        ([{"name": "dpo_typo"}], "loss term 1 (dpo_typo): unknown loss 'dpo_typo'; valid choices: {names}"),
        ([{"name": "diffusion_dpo"}, {"name": "anchor", "weight": -1}], "loss term 2 (anchor): weight must be a finite number > 0"),
        ([{"name": "anchor", "weight": "heavy"}], "loss term 1 (anchor): weight must be a finite number > 0 (drop the term to turn it off), got 'heavy'"),
        ([{"name": "ipo", "wieght": 2}], "loss term 1 (ipo): loss 'ipo' got an unexpected keyword argument 'wieght'; valid arguments: beta, tau"),
        ("anchor", "loss has no term that scores pairs (terms: anchor); add one of "),
        ([], "loss is an empty list"),
    ],
)
def test_a_bad_term_is_one_line_naming_the_choices(loss: object, message: str) -> None:
    with pytest.raises((ValueError, TypeError)) as caught:
        build_objective(loss)  # type: ignore[arg-type]
    text = str(caught.value)
    assert message.format(names=", ".join(LOSSES.names())) in text and "\n" not in text


def test_anchor_weight_and_an_anchor_term_together_are_refused() -> None:
    with pytest.raises(ValueError, match=r"anchor_weight 5.0 and an anchor term in loss both set the anchor term's weight; keep one"):
        build_objective([{"name": "diffusion_dpo"}, {"name": "anchor", "weight": 5}], anchor_weight=5.0)


def test_listed_anchor_term_trains_exactly_as_anchor_weight(tiny_pipeline_dir: Path, synthetic_data_dir: Path) -> None:
    dm = CoProV2DataModule(str(synthetic_data_dir), categories=["violence"], resolution=32, batch_size=4, val_fraction=0.0, anchors=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    results = []
    for options in ({"loss": "diffusion_dpo", "anchor_weight": 30.0}, {"loss": [{"name": "diffusion_dpo"}, {"name": "anchor", "weight": 30}]}):
        torch.manual_seed(0)
        module = DPOExpertModule(str(tiny_pipeline_dir), lora=LoraSettings(rank=4), **options)
        for name, param in module.unet.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05)  # lora_B = 0 at init would make the drift zero
        output, errors = module.preference_step(batch, step=3)
        output.loss.backward()
        grads = [param.grad.clone() for param in module.parameters() if param.requires_grad]
        results.append((output, errors, grads, module.hparams["loss"]))
    (old, old_errors, old_grads, old_hparams), (new, _, new_grads, new_hparams) = results
    assert old_errors.anchor_drift.min() > 0
    assert torch.equal(old.loss, new.loss) and all(torch.equal(a, b) for a, b in zip(old_grads, new_grads))
    assert set(new.terms) == {"diffusion_dpo", "anchor"} and new.terms["anchor"].item() == pytest.approx(30 * old_errors.anchor_drift.mean().item(), rel=1e-6)
    assert old_hparams == {"class_path": "safetydpo.losses.diffusion_dpo.DiffusionDPOLoss", "init_args": {"beta": 5000.0}}
    assert new_hparams == [{"name": "diffusion_dpo", "weight": 1.0, "beta": 5000.0}, {"name": "anchor", "weight": 30.0}]
    assert build_objective(new_hparams).spec() == new_hparams, "the recorded value is one the argument takes back"


def test_a_loss_list_in_yaml_trains_through_safetydpo_fit(
    tiny_pipeline_dir: Path, synthetic_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = base_config(tmp_path, tiny_pipeline_dir, synthetic_data_dir)
    config["trainer"].update(max_steps=1, num_sanity_val_steps=0, limit_val_batches=0, logger=False)
    config["trainer"]["callbacks"] = config["trainer"]["callbacks"][:1]  # the LoRA export (and its card) only
    text = yaml.safe_dump(config).replace("loss: safety_dpo", "loss:\n    - {name: min_snr_dpo, beta: 1000}\n    - {name: anchor, weight: 10}")
    path = tmp_path / "expert.yaml"
    path.write_text(text)
    _, parsed = parse_fit_config(["--config", str(path)])
    assert parsed.model.init_args.loss == [{"name": "min_snr_dpo", "beta": 1000}, {"name": "anchor", "weight": 10}]
    assert parsed.data.init_args.anchors is True, "an anchor term in the list serves anchors"
    code, _, err = run_main(["fit", "--config", str(path)], capsys)
    assert code == 0, err[-3000:]
    card = json.loads((tmp_path / "run" / "experts" / "violence.json").read_text())
    assert card["loss"] == [{"name": "min_snr_dpo", "weight": 1.0, "beta": 1000, "gamma": 5.0}, {"name": "anchor", "weight": 10.0}]
    assert {"train/loss_min_snr_dpo", "train/loss_anchor", "train/anchor_drift", "train/reward_margin"} <= set(card["metrics"])
    # `safetydpo fit --model.help` documents the list form and lists every registered term class (generated).
    code, out, _ = run_main(["fit", "--model.help", "DPOExpertModule"], capsys)
    out = " ".join(out.split())
    assert code == 0 and "or a list of weighted terms" in out
    assert all(f"{cls.__module__}.{cls.__qualname__}" in out for cls in LOSSES.classes().values())
    # A bad term through the same command: one line, status 2, naming the valid names.
    write_config(path, {**config, "model": {**config["model"], "init_args": {**config["model"]["init_args"], "loss": [{"name": "anchr", "weight": 10}]}}})
    code, _, err = run_main(["fit", "--config", str(path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"loss term 1 (anchr): unknown loss 'anchr'; valid choices: {', '.join(LOSSES.names())}" in err
