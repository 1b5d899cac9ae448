"""CoProV2 builder, render side: builds on the tiny pipeline that the DataModule trains on, a build killed
with SIGKILL and resumed, inspection, and importing the released CoProV2 table layout."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from safetydpo.cli.main import main
from safetydpo.data import CoProV2DataModule
from safetydpo.data.builder import BuildError, build, import_table, inspect_dataset, load_build_config
from safetydpo.data.builder.lock import output_lock
from safetydpo.models.components import encode_prompts, load_components

BIN = Path(sys.executable).parent
TAXONOMY = {
    "violence": {"blood": ["red paint", "spilled juice"], "gore": ["red flowers"], "stabbing": ["cooking"]},
    "Self-harm": {"noose": ["rope swing"], "overdose": ["bowl of candy"], "razor blades": ["paper clips"]},
}
PER_CONCEPT = 4
EXPECTED_ROWS = 6 * PER_CONCEPT


def write_config(folder: Path, pipeline: Path, output: Path, **render: Any) -> Path:
    """A build of 24 pairs in 12 two-pair shards: 2 sampling steps at 32x32 on the tiny pipeline."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "taxonomy.yaml").write_text(yaml.safe_dump(TAXONOMY))
    render_settings = {"base_model": str(pipeline), "steps": 2, "height": 32, "width": 32, "batch_size": 2, "shard_size": 2, "device": "cpu"}
    config = {
        "output": str(output),
        "taxonomy": str(folder / "taxonomy.yaml"),
        "generator": {"name": "template", "seed": 0},
        "pairs": {"per_concept": PER_CONCEPT},
        "render": {**render_settings, **render},
    }
    path = folder / "data.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Render in-process with one thread, like the OMP_NUM_THREADS=1 build subprocesses: a second
    thread only contends on a loaded 2-core runner (a 24-pair build goes from ~2 s to ~40 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference_build(tmp_path_factory: pytest.TempPathFactory, tiny_pipeline_dir: Path) -> Path:
    """An uninterrupted in-process build, the yardstick for the resumed one."""
    folder = tmp_path_factory.mktemp("reference")
    result = build(load_build_config(write_config(folder, tiny_pipeline_dir, folder / "out")))
    assert result.rows == EXPECTED_ROWS and result.shards == result.rendered_shards == 12
    return folder / "out"


def metadata(root: Path) -> list[dict[str, Any]]:
    return pq.read_table(root / "metadata.parquet").to_pylist()


def test_a_build_loads_with_datasets_as_its_card_declares(reference_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder's README.md front matter makes it a hub dataset: both configs load, with the table's row counts."""
    import datasets  # the dev extra installs it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = datasets.load_dataset(str(reference_build), cache_dir=str(tmp_path / "cache"))["train"]
    pairs = datasets.load_dataset(str(reference_build), "pairs", cache_dir=str(tmp_path / "cache"))["train"]
    assert rows.num_rows == EXPECTED_ROWS == pq.read_metadata(reference_build / "metadata.parquet").num_rows
    assert pairs.num_rows == pq.read_metadata(reference_build / "pairs.parquet").num_rows
    assert {"unsafe_prompt", "safe_prompt", "image_unsafe", "image_safe"} <= set(rows.column_names)
    assert rows[0]["id"] == metadata(reference_build)[0]["id"]


def test_datamodule_trains_on_a_build_with_and_without_features(reference_build: Path, tiny_pipeline_dir: Path) -> None:
    rows = metadata(reference_build)
    assert len(rows) == EXPECTED_ROWS and len({row["id"] for row in rows}) == EXPECTED_ROWS
    assert {row["category"] for row in rows} == {"violence", "self_harm"}
    components = load_components(str(tiny_pipeline_dir))
    for use_precomputed in (True, False):
        dm = CoProV2DataModule(str(reference_build), resolution=32, batch_size=4, val_fraction=0.34, use_precomputed=use_precomputed)
        dm.setup("fit")
        assert len(dm.train_set) + len(dm.val_set) == EXPECTED_ROWS
        batch = next(iter(dm.train_dataloader()))
        if use_precomputed:
            assert batch.latents_winner.shape == batch.latents_loser.shape == (4, 4, 16, 16)
            # The stored condition is exactly what training computes from the unsafe prompt.
            torch.testing.assert_close(batch.prompt_embeds, encode_prompts(components, batch.prompts))
            assert not torch.equal(batch.latents_winner, batch.latents_loser)
        else:
            assert batch.pixels_winner.shape == batch.pixels_loser.shape == (4, 3, 32, 32)
    card = yaml.safe_load((reference_build / "README.md").read_text().split("---")[1])
    assert [c["data_files"][0]["path"] for c in card["configs"]] == ["metadata.parquet", "pairs.parquet"]


def test_pairs_share_a_seed_and_latents_are_what_the_vae_decodes(reference_build: Path, tiny_pipeline_dir: Path) -> None:
    row = metadata(reference_build)[0]
    assert isinstance(row["seed"], int) and row["seed"] >= 0
    with safe_open(str(reference_build / row["features"]), framework="pt") as shard:
        latent = shard.get_tensor(f"{row['id']}.latent_unsafe")
    vae = load_components(str(tiny_pipeline_dir)).vae
    with torch.no_grad():
        decoded = vae.decode(latent[None] / vae.config.scaling_factor).sample
    with Image.open(reference_build / row["image_unsafe"]) as image:
        pixels = torch.tensor(list(image.getdata()), dtype=torch.float32).T.reshape(3, *image.size[::-1])
    expected = ((decoded[0] / 2 + 0.5).clamp(0, 1) * 255).round()
    assert (expected - pixels).abs().max() <= 1, "the PNG is the decoded final latent"


def test_killed_build_resumes_to_exactly_the_expected_rows(tmp_path: Path, tiny_pipeline_dir: Path, reference_build: Path) -> None:
    output = tmp_path / "out"
    config = write_config(tmp_path, tiny_pipeline_dir, output)
    command = [str(BIN / "safetydpo"), "data", "build", "--config", str(config)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    manifest_path = output / "manifest.json"
    with (tmp_path / "killed.log").open("w") as log:  # a file, not a pipe: a full pipe would stall the build
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if manifest_path.is_file() and json.loads(manifest_path.read_text())["committed"]:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    killed = json.loads(manifest_path.read_text())
    assert 1 <= len(killed["committed"]) < killed["num_shards"] == 12 and not killed["complete"], "killed midway"
    visible = metadata(output)
    assert visible == metadata(reference_build)[: len(visible)] and len(visible) <= 2 * len(killed["committed"])
    assert all((output / row["features"]).is_file() for row in visible), "metadata lists only fully written shards"

    # What a kill in the middle of atomic_file leaves behind; the resumed build must clear it.
    (output / "features" / ".shard-00011.safetensors.k1ll3d.tmp").write_bytes(b"half a shard")
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{EXPECTED_ROWS} pairs in 12 shards ({12 - len(killed['committed'])} rendered by this run)" in resumed.stdout

    rows, expected = metadata(output), metadata(reference_build)
    assert rows == expected and len({row["id"] for row in rows}) == EXPECTED_ROWS
    for row in rows:
        assert (output / row["image_unsafe"]).is_file() and (output / row["image_safe"]).is_file()
        with safe_open(str(output / row["features"]), framework="pt") as shard, safe_open(
            str(reference_build / row["features"]), framework="pt"
        ) as reference:
            assert set(shard.keys()) == set(reference.keys())
            for key in (f"{row['id']}.{name}" for name in ("latent_safe", "latent_unsafe", "prompt_embeds")):
                # The same renders, up to float summation order (another process ran the reference).
                torch.testing.assert_close(shard.get_tensor(key), reference.get_tensor(key), atol=1e-4, rtol=1e-3)
    assert not [path for path in output.rglob("*") if path.name.endswith(".tmp")], "no temporary files are left"
    assert sorted(p.name for p in (output / "features").iterdir()) == [f"shard-{i:05d}.safetensors" for i in range(12)]
    assert json.loads(manifest_path.read_text())["complete"]


def test_rerun_of_a_complete_build_renders_nothing_and_a_changed_config_is_refused(
    tmp_path: Path, tiny_pipeline_dir: Path, reference_build: Path
) -> None:
    output = tmp_path / "out"
    shutil.copytree(reference_build, output)
    config = load_build_config(write_config(tmp_path, tiny_pipeline_dir, output, batch_size=4))
    assert build(config).rendered_shards == 0, "render.batch_size is operational: a resume may change it"
    assert metadata(output) == metadata(reference_build)
    with pytest.raises(BuildError, match=r"built with a different config \(changed: render.steps\)"):
        build(load_build_config(write_config(tmp_path, tiny_pipeline_dir, output, steps=3)))
    with output_lock(output), pytest.raises(BuildError, match="another build is writing"):
        build(config)


def test_inspect_counts_pairs_flags_missing_files_and_writes_a_grid(
    tmp_path: Path, reference_build: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "copy"
    shutil.copytree(reference_build, root)
    first = metadata(root)[0]
    (root / first["image_safe"]).unlink()
    grid = tmp_path / "grid.png"
    with pytest.raises(SystemExit) as exit_info:  # a missing file makes the exit status non-zero
        main(["data", "inspect", str(root), "--grid", str(grid), "--samples", "5", "--tile", "32"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    printed = captured.out
    assert f"{EXPECTED_ROWS} pairs in 2 categories, 6 concepts" in printed
    assert "violence: 12 (blood 4, gore 4, stabbing 4)" in printed
    assert "build: 12/12 shards committed, complete" in printed
    assert f"missing or defective files: 1\n  row 0 (id {first['id']}): image_safe {first['image_safe']} missing" in printed
    assert captured.err.count("\n") == 1 and f"row 0 (id {first['id']})" in captured.err
    with Image.open(grid) as image:
        assert image.size == (4 * 64, 2 * (32 + 14))
    report = inspect_dataset(root, None)
    assert report.grid is None and len(report.problems) == 1


def write_released_layout(folder: Path) -> Path:
    """A tiny table in the released CoProV2 layout: one row per image, u_/s_ images sharing an index."""
    images = folder / "images"
    images.mkdir(parents=True)
    pairs = [
        ("Harrasment", "a stalker watching a woman through a window", "a neighbour waving at a woman through a window"),
        ("self-harm", "a noose hanging in a dark room", "a rope swing hanging in a bright room"),
        ("Illegal Activity", "lines of cocaine on a table", "lines of sugar on a table"),
        ("Violence", "a man covered in blood", "a man covered in red paint"),
    ]
    rows = []
    for index, (category, unsafe, safe) in enumerate(pairs):
        for side, prompt in (("u", unsafe), ("s", safe)):
            name = f"{side}_idx_{index:07d}_0.jpg"
            Image.new("RGB", (40, 40), (index * 60, 100 if side == "u" else 200, 50)).save(images / name)
            rows.append({"prompt": prompt, "image": name, "category": category})
    rows.append({"prompt": "an orphan image", "image": "u_idx_0000099_0.jpg", "category": "Hate"})
    table = folder / "CoProv2_train.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "image", "category"])
        writer.writeheader()
        writer.writerows(rows)
    return table


def test_import_of_the_released_layout_trains_and_renders(tmp_path: Path, tiny_pipeline_dir: Path) -> None:
    table = write_released_layout(tmp_path / "released")
    (tmp_path / "taxonomy.yaml").write_text(yaml.safe_dump({"self_harm": {"noose": ["rope swing"]}, "violence": {"blood": ["red paint"]}}))
    out = tmp_path / "imported"
    result = import_table(table, out, images=tmp_path / "released" / "images", taxonomy=tmp_path / "taxonomy.yaml")
    assert result.pairs == 4 and result.unpaired == 1
    assert result.categories == {"harassment": 1, "self_harm": 1, "illegal_activity": 1, "violence": 1}
    rows = metadata(out)
    assert [(r["id"], r["category"], r["concept"]) for r in rows] == [
        ("idx_0000000_0", "harassment", "harassment"),
        ("idx_0000001_0", "self_harm", "noose"),
        ("idx_0000002_0", "illegal_activity", "illegal_activity"),
        ("idx_0000003_0", "violence", "blood"),
    ]
    assert (rows[1]["unsafe_prompt"], rows[1]["safe_prompt"]) == ("a noose hanging in a dark room", "a rope swing hanging in a bright room")
    dm = CoProV2DataModule(str(out), resolution=32, batch_size=2, val_fraction=0.0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.pixels_winner.shape == (2, 3, 32, 32)

    # Re-render the imported pairs with the model being aligned.
    config = yaml.safe_load(write_config(tmp_path / "render", tiny_pipeline_dir, tmp_path / "rendered").read_text())
    config.pop("taxonomy")
    config["pairs_from"] = str(out / "pairs.parquet")
    path = tmp_path / "render" / "from_import.yaml"
    path.write_text(yaml.safe_dump(config))
    rendered = build(load_build_config(path))
    assert rendered.rows == 4
    assert [r["id"] for r in metadata(tmp_path / "rendered")] == [r["id"] for r in rows]


def test_import_of_a_generic_table_maps_columns_and_names_bad_input(tmp_path: Path) -> None:
    table = tmp_path / "pairs.jsonl"
    records = [{"bad": f"a gun on table {i}", "good": f"a toy on table {i}", "cat": "Violence", "concept": "guns"} for i in range(3)]
    table.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    columns = ["--column", "unsafe_prompt=bad", "--column", "safe_prompt=good", "--column", "category=cat"]
    main(["data", "import", str(table), "--out", str(tmp_path / "out"), *columns])
    pairs = pq.read_table(tmp_path / "out" / "pairs.parquet").to_pylist()
    assert inspect_dataset(tmp_path / "out", None).lines()[1] == "  violence: 3 (guns 3)"
    expected = {
        "id": "row-0000002", "category": "violence", "categories": None, "concept": "guns",
        "unsafe_prompt": "a gun on table 2", "safe_prompt": "a toy on table 2",
    }
    assert pairs[2] == expected
    records[1]["good"] = " "
    table.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    with pytest.raises(BuildError, match=r"pairs.jsonl pair 1 \(id row-0000001\): empty value in column\(s\) safe_prompt"):
        import_table(table, tmp_path / "again", columns={"unsafe_prompt": "bad", "safe_prompt": "good", "category": "cat"})
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "import", str(table), "--out", str(tmp_path / "again")])
    assert exit_info.value.code == 2
