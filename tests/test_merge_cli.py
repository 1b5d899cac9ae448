"""``safetydpo merge`` on bad input: exit code 2, one stderr line naming the culprit, nothing written; warnings are one line each."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from fixtures_lora import random_layers, write_old_diffusers, write_peft
from fixtures_train import run_main
from safetensors.torch import save_file

from safetydpo.lora_files import EXPERT_FORMAT, card_path


def with_card(path: Path, base_model: str, category: str) -> Path:
    card_path(path).write_text(json.dumps({"format": EXPERT_FORMAT, "base_model": base_model, "category": category}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def experts(tiny_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good experts with cards (rank 4, rank 4, rank 2) and the tiny model they were 'trained' on."""
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    folder = tmp_path_factory.mktemp("merge_cli")
    files = {}
    for name, rank, seed, base in (("a", 4, 1, str(tiny_pipeline_dir)), ("b", 4, 2, str(tiny_pipeline_dir)),
                                   ("r2", 2, 3, str(tiny_pipeline_dir)), ("other_base", 4, 4, "other/model")):
        files[name] = with_card(write_peft(folder / f"{name}.safetensors", random_layers(unet, rank, seed), alpha=rank), base, name)
    files["broken_card"] = write_peft(folder / "broken_card.safetensors", random_layers(unet, 4, 5), alpha=4)
    card_path(files["broken_card"]).write_text("{broken", encoding="utf-8")
    return files


def tensors_file(folder: Path, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    save_file(tensors, str(folder / name), metadata=metadata)
    return str(folder / name)


def one_layer(rank: int = 4, down_rank: int | None = None) -> dict[str, torch.Tensor]:
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    return {f"{name}.lora_A.weight": torch.randn(down_rank or rank, 32), f"{name}.lora_B.weight": torch.randn(32, rank)}


# Each case: (id, argv after "merge" given the experts and a scratch folder, pattern the one stderr line must match).
Case = tuple[str, Callable[[dict[str, Path], Path], list[str]], str]
GOOD = ["--method", "cat", "--out"]


def _junk(folder: Path) -> str:
    (folder / "junk.safetensors").write_bytes(b"\x00" * 16)
    return str(folder / "junk.safetensors")


def _folder(folder: Path) -> str:
    (folder / "dir.safetensors").mkdir()
    return str(folder / "dir.safetensors")


def _out(folder: Path) -> str:
    return str(folder / "merged.safetensors")


def _experts(e: dict[str, Path], *names: str) -> list[str]:
    return ["--experts", *(str(e[n]) for n in names)]


def _file(name: str, tensors: Callable[[], dict[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> Callable[[dict[str, Path], Path], list[str]]:
    return lambda e, f: ["--experts", str(e["a"]), tensors_file(f, name, tensors(), metadata), *GOOD, _out(f)]


CASES: list[Case] = [
    ("missing_expert", lambda e, f: ["--experts", str(e["a"]), str(f / "missing.safetensors"), *GOOD, _out(f)], r"LoRA file .*missing.safetensors not found"),
    ("junk_bytes", lambda e, f: ["--experts", str(e["a"]), _junk(f), *GOOD, _out(f)], r"junk.safetensors is not a readable safetensors LoRA file"),
    ("foreign_keys", _file("x.safetensors", lambda: {"x": torch.zeros(2)}), r"x.safetensors is not a UNet LoRA .*unexpected keys such as \['x'\]"),
    ("nan_expert", _file("nan.safetensors", lambda: {k: torch.full_like(v, float("nan")) for k, v in one_layer().items()}),
     r"nan.safetensors: tensor .*lora_A.weight holds NaN or infinite values"),
    ("int32_expert", _file("int.safetensors", lambda: {k: v.to(torch.int32) for k, v in one_layer().items()}), r"int.safetensors: tensor .* has dtype int32"),
    ("unpaired", _file("half.safetensors", lambda: dict(list(one_layer().items())[:1])), r"half.safetensors .*lora_A/lora_B \(down/up\) keys do not pair up"),
    ("shapes_do_not_multiply", _file("shape.safetensors", lambda: one_layer(rank=3, down_rank=4)), r"shape.safetensors: layer .* shapes \(4, 32\)/\(32, 3\), which do not multiply"),
    ("text_encoder_only", _file("te.safetensors", lambda: {"text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 32),
                                                            "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 4)}),
     r"te.safetensors holds only text-encoder LoRA; merging needs UNet LoRA layers"),
    ("dora", _file("dora.safetensors", lambda: {**one_layer(), "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector": torch.ones(32)}),
     r"dora.safetensors is a DoRA adapter"),
    ("metadata_not_json", _file("meta.safetensors", one_layer, {"lora_adapter_metadata": "{oops"}), r"meta.safetensors: its lora_adapter_metadata is not a peft LoraConfig"),
    ("metadata_rank_differs", _file("r8.safetensors", one_layer, {"lora_adapter_metadata": json.dumps({"unet.r": 8, "unet.lora_alpha": 8})}),
     r"r8.safetensors: layer .* has rank 4 but its metadata says r=8"),
    ("alpha_and_metadata", _file("both.safetensors", lambda: {**one_layer(), "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.alpha": torch.tensor(2.0)},
                                 {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 4})}), r"both.safetensors has both .alpha keys and lora_adapter_metadata"),
    ("different_layers", _file("one.safetensors", one_layer), r"one.safetensors adapts different layers than .*a.safetensors"),
    ("other_model", lambda e, f: ["--experts", tensors_file(f, "p.safetensors", one_layer()), tensors_file(f, "q.safetensors", {
        k.replace("32", "64"): torch.randn(4, 64) if "lora_A" in k else torch.randn(32, 4) for k, v in one_layer().items()}), *GOOD, _out(f)],
     r"q.safetensors layer .* updates a weight of shape \(32, 64\), .*p.safetensors one of \(32, 32\); the experts belong to different models"),
    ("comerge_ranks", lambda e, f: [*_experts(e, "a", "r2"), "--method", "comerge", "--data", str(f), "--out", _out(f)],
     r"r2.safetensors layer .* has rank 2, .*a.safetensors rank 4; Co-Merge needs equal ranks"),
    ("different_base_models", lambda e, f: [*_experts(e, "a", "other_base"), *GOOD, _out(f)],
     r"other_base.safetensors was trained on base model other/model, .*a.safetensors on "),
    ("base_model_not_the_experts", lambda e, f: [*_experts(e, "a", "b"), "--base-model", "other/model", *GOOD, _out(f)],
     r"base model other/model is not the one the experts were trained on \(.*, from .*a.json\)"),
    ("out_is_an_expert", lambda e, f: [*_experts(e, "a", "b"), *GOOD, str(e["b"])], r"output .*b.safetensors is also an expert; writing it would overwrite that expert"),
    ("out_not_safetensors", lambda e, f: [*_experts(e, "a", "b"), *GOOD, str(f / "merged.bin")], r"merged LoRA file name must end in .safetensors, got .*merged.bin"),
    ("out_is_a_folder", lambda e, f: [*_experts(e, "a", "b"), *GOOD, _folder(f)], r"output .*dir.safetensors is a folder"),
    ("unknown_method", lambda e, f: [*_experts(e, "a", "b"), "--method", "nope", "--out", _out(f)], r"unknown merge method 'nope'; valid choices: cat, comerge, comerge_weight"),
    ("unknown_argument", lambda e, f: [*_experts(e, "a", "b"), "--method", "svd", "--args", '{"bogus": 1}', "--out", _out(f)],
     r"merge method 'svd' got an unexpected keyword argument 'bogus'; valid arguments: weights, rank"),
    ("ties_rank_0", lambda e, f: [*_experts(e, "a", "b"), "--method", "ties", "--args", '{"rank": 0}', "--out", _out(f)], r"ties rank must be an integer >= 1, got 0"),
    ("dare_density_2", lambda e, f: [*_experts(e, "a", "b"), "--method", "dare", "--args", '{"density": 2.0}', "--out", _out(f)],
     r"dare density must be a number in \(0, 1\], got 2.0"),
    ("svd_rank_text", lambda e, f: [*_experts(e, "a", "b"), "--method", "svd", "--args", '{"rank": "four"}', "--out", _out(f)], r"svd rank must be an integer >= 1, got 'four'"),
    ("sign_method", lambda e, f: [*_experts(e, "a", "b"), "--method", "ties", "--args", '{"majority_sign_method": "vote"}', "--out", _out(f)],
     r"ties majority_sign_method must be 'total' or 'frequency', got 'vote'"),
    ("weights_count", lambda e, f: [*_experts(e, "a", "b"), "--method", "cat", "--args", '{"weights": [1, 2, 3]}', "--out", _out(f)], r"3 merge weights given for 2 experts"),
    ("weights_text", lambda e, f: [*_experts(e, "a", "b"), "--method", "linear", "--args", '{"weights": [1, "x"]}', "--out", _out(f)],
     r"merge weights must be a list of numbers, one per expert, got \[1, 'x'\]"),
    ("args_with_spec", lambda e, f: [*_experts(e, "a", "b"), "--method", '{"name": "svd"}', "--args", '{"rank": 2}', "--out", _out(f)],
     r"--args goes with a method name"),
    ("comerge_without_data", lambda e, f: [*_experts(e, "a", "b"), "--method", "comerge", "--out", _out(f)], r"comerge needs the base model .* and --data DATASET_DIR"),
    ("comerge_data_missing", lambda e, f: [*_experts(e, "a", "b"), "--method", "comerge_weight", "--data", str(f / "nodata"), "--out", _out(f)],
     r"--data .*nodata is not a dataset folder"),
    ("comerge_bad_device", lambda e, f: [*_experts(e, "a", "b"), "--data", str(f), "--device", "gpu0", "--out", _out(f)], r"--device 'gpu0' is not a torch device"),
    ("num_batches_0", lambda e, f: [*_experts(e, "a", "b"), "--num-batches", "0", *GOOD, _out(f)], r"--num-batches must be >= 1, got 0"),
    ("resolution_30", lambda e, f: [*_experts(e, "a", "b"), "--resolution", "30", *GOOD, _out(f)], r"--resolution must be a positive multiple of 8"),
    ("unknown_option", lambda e, f: [*_experts(e, "a", "b"), *GOOD, _out(f), "--bogus", "1"], r"unrecognized arguments: --bogus 1"),
    ("no_experts", lambda e, f: ["--out", _out(f)], r"the following arguments are required: experts"),
    ("config_missing", lambda e, f: ["--config", str(f / "none.yaml"), *_experts(e, "a"), *GOOD, _out(f)], r"none.yaml"),
    ("card_not_json", lambda e, f: [*_experts(e, "a", "broken_card"), *GOOD, _out(f)], r"broken_card.json is not readable JSON"),
]


@pytest.mark.parametrize(("make_argv", "message"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_merge_input_is_one_line_exit_2(
    experts: dict[str, Path], tmp_path: Path, make_argv: Callable[[dict[str, Path], Path], list[str]], message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = {path: path.read_bytes() for path in experts.values()}
    code, _, stderr = run_main(["merge", *make_argv(experts, tmp_path)], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("safetydpo merge: error: ") and re.search(message, stderr), stderr
    assert not (tmp_path / "merged.safetensors").exists() and not list(tmp_path.glob(".*.tmp"))
    assert {path: path.read_bytes() for path in experts.values()} == before, "no expert file is touched"


def test_foreign_files_merge_with_one_warning_line_each(
    tiny_pipeline_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A card-less LoRA (base model unchecked) with text-encoder LoRA beside the UNet's: exit 0, one warning line for each.

    The warnings are log records (a terminal gets each as one stderr line); pytest's log capture holds them here.
    """
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    old = write_old_diffusers(tmp_path / "old.safetensors", random_layers(unet, 4, 1),
                              {"encoder.layers.0.self_attn.q_proj": (torch.randn(4, 32), torch.randn(32, 4))})
    peft = write_peft(tmp_path / "peft.safetensors", random_layers(unet, 2, 2), alpha=4)
    out = tmp_path / "merged.safetensors"
    with caplog.at_level(logging.WARNING, logger="safetydpo"):
        code, stdout, stderr = run_main(["merge", "--experts", str(old), str(peft), "--method", "svd", "--out", str(out)], capsys)
    assert code == 0 and stderr == "", stderr
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2 and all("\n" not in line for line in lines), lines
    assert re.fullmatch(r"warning: .*old.safetensors also holds 2 text-encoder LoRA tensors; they are skipped .*", lines[0]), lines
    assert re.fullmatch(r"warning: no model card names the base model of .*old.safetensors, .*peft.safetensors; it is not checked .*", lines[1]), lines
    assert json.loads(card_path(out).read_text())["base_model"] is None and stdout.startswith(f"wrote {out} (svd)")
