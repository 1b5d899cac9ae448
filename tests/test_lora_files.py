"""LoRA files made by other tools read as diffusers applies them, and merge as the sum diffusers applies."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from fixtures_lora import applied_update, random_layers, write_kohya, write_old_diffusers, write_peft

from safetydpo.lora_files import file_sha256, load_lora, lora_content_sha256
from safetydpo.merging.files import merge_expert_files


@pytest.fixture(scope="module")
def foreign_loras(tiny_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One LoRA per format, with different ranks and alphas: peft r4/alpha 8, old diffusers r4 (+ text encoder), kohya r2/alpha 1."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    folder = tmp_path_factory.mktemp("foreign")
    text_encoder = {name: (torch.randn(4, m.in_features), torch.randn(m.out_features, 4)) for name, m in pipe.text_encoder.named_modules()
                    if name.endswith("self_attn.q_proj")}
    return {
        "peft": write_peft(folder / "peft.safetensors", random_layers(pipe.unet, 4, seed=1), alpha=8),
        "old_diffusers": write_old_diffusers(folder / "old.safetensors", random_layers(pipe.unet, 4, seed=2), text_encoder),
        "kohya": write_kohya(folder / "kohya.safetensors", random_layers(pipe.unet, 2, seed=3), alpha=1),
    }


@pytest.fixture(scope="module")
def applied(tiny_pipeline_dir: Path, foreign_loras: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    return {kind: applied_update(tiny_pipeline_dir, path) for kind, path in foreign_loras.items()}


def test_every_format_reads_as_diffusers_applies_it(
    foreign_loras: dict[str, Path], applied: dict[str, dict[str, torch.Tensor]], caplog: pytest.LogCaptureFixture
) -> None:
    for kind, path in foreign_loras.items():
        with caplog.at_level(logging.WARNING, logger="safetydpo.lora_files"):
            caplog.clear()
            expert = load_lora(path)
        assert set(expert.layers) == set(applied[kind]), kind
        for name, update in applied[kind].items():
            torch.testing.assert_close(expert.layers[name].delta(), update, rtol=1e-4, atol=1e-6, msg=f"{kind} {name}")
        warnings = [record.getMessage() for record in caplog.records]
        if kind == "old_diffusers":
            assert len(warnings) == 1 and "also holds 4 text-encoder LoRA tensors; they are skipped" in warnings[0], warnings
        else:
            assert warnings == [], warnings
    # alpha 8 at rank 4 doubles the stored lora_B @ lora_A; reading the factors alone would give half of it.
    with safe_open(str(foreign_loras["peft"]), framework="pt") as handle:
        name = next(iter(applied["peft"]))
        stored = handle.get_tensor(f"unet.{name}.lora_B.weight") @ handle.get_tensor(f"unet.{name}.lora_A.weight")
    torch.testing.assert_close(applied["peft"][name], 2 * stored, rtol=1e-4, atol=1e-6)


def test_cat_of_loras_in_different_formats_equals_the_sum_diffusers_applies(
    tiny_pipeline_dir: Path, foreign_loras: dict[str, Path], applied: dict[str, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    out = tmp_path / "cat.safetensors"
    card = merge_expert_files(list(foreign_loras.values()), out, method="cat")
    assert card["base_model"] is None, "no expert has a card naming one"
    assert {factors.rank for factors in load_lora(out).layers.values()} == {4 + 4 + 2}
    merged = applied_update(tiny_pipeline_dir, out)
    assert set(merged) == set(applied["peft"])
    for name, update in merged.items():
        expected = sum(applied[kind][name] for kind in foreign_loras)
        torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-6, msg=name)


def test_content_hash_ignores_the_header_layout_safetensors_varies_between_saves(foreign_loras: dict[str, Path], tmp_path: Path) -> None:
    # safetensors writes its metadata from a hash map, so one LoRA saved twice can differ in bytes (seen on
    # UCE re-exports, which then invalidated every cached render); the same tensors and metadata laid out in
    # another header order must hash alike, and one changed weight must not.
    raw = foreign_loras["peft"].read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    metadata = dict(reversed(list(header.pop("__metadata__").items())))
    relaid = json.dumps({**dict(reversed(list(header.items()))), "__metadata__": metadata}).encode("utf-8")
    relaid += b" " * (-len(relaid) % 8)
    other = tmp_path / "relaid.safetensors"
    other.write_bytes(struct.pack("<Q", len(relaid)) + relaid + raw[8 + size :])
    assert file_sha256(other) != file_sha256(foreign_loras["peft"])
    assert lora_content_sha256(other) == lora_content_sha256(foreign_loras["peft"])

    key = next(k for k in header if k.endswith("lora_A.weight"))
    start = 8 + size + header[key]["data_offsets"][0]
    changed = tmp_path / "changed.safetensors"
    changed.write_bytes(raw[:start] + bytes([raw[start] ^ 1]) + raw[start + 1 :])
    assert lora_content_sha256(changed) != lora_content_sha256(foreign_loras["peft"])
