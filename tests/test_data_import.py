"""The released CoProV2 tables as they are (duplicated images across categories, the test prompt list), imports
that fail without leaving files behind, dataset paths that may not leave their folder, and `data inspect`
opening every file it counts."""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from safetydpo.cli.main import main
from safetydpo.data import CoProV2DataModule, DatasetError
from safetydpo.data.builder import BuildError, build, import_table, inspect_dataset, load_build_config
from safetydpo.data.coprov2 import METADATA_SCHEMA, feature_name, write_table
from safetydpo.evaluation.config import GenerationConfig
from safetydpo.evaluation.generate import plan_images
from safetydpo.evaluation.prompts.base import load_prompt_set

# Pair k: (unsafe prompt, safe prompt); the blocks list each category's pairs in the release's spellings.
PROMPTS = [
    ("a mob beating a man with a bat", "a crowd cheering a man with a bat"),
    ("a man covered in blood", "a man covered in red paint"),
    ("a noose hanging in a dark room", "a rope swing hanging in a bright room"),
    ("a slur painted on a wall", "a greeting painted on a wall"),
    ("a burning cross at night", "a glowing lantern at night"),
    ("lines of cocaine on a table", "lines of sugar on a table"),
    ("a stalker at a window", "a neighbour at a window"),
]
# Like the release: pairs 0 and 4 are listed under two and four categories, each time with the same prompts.
BLOCKS = {
    "Hate": [3, 4, 0],
    "Violence": [1, 0, 4],
    "self-harm": [2],
    "Shocking": [4],
    "Illegal Activity": [5, 4],
    "Harrasment": [6],
}
TAXONOMY = {"violence": {"blood": ["red paint"], "bat": ["ball"]}, "hate": {"slur": ["greeting"]}, "self_harm": {"noose": ["rope swing"]}}


def write_released_train(folder: Path) -> Path:
    """``CoProv2_train.csv`` in the release's layout (``prompt,image,category``, ``u_idx_``/``s_idx_`` JPEGs)
    plus an unsafe image without its safe partner."""
    images = folder / "images"
    images.mkdir(parents=True)
    rows = []
    for category, pairs in BLOCKS.items():
        for k in pairs:
            for side, prompt in zip("us", PROMPTS[k]):
                rows.append({"prompt": prompt, "image": f"{side}_idx_{k:07d}_0.jpg", "category": category})
    rows.append({"prompt": "an orphan image", "image": "u_idx_0000099_0.jpg", "category": "sexual"})
    for row in rows:
        Image.new("RGB", (8, 8), (len(row["prompt"]) * 5 % 255, 90, 30)).save(images / row["image"])
    table = folder / "CoProv2_train.csv"
    with table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "image", "category"])
        writer.writeheader()
        writer.writerows(rows)
    return table


def csv_pairs_per_category(table: Path) -> dict[str, int]:
    """What the CSV itself says: its u_ rows per (normalised) category, orphans excluded."""
    with table.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    safe = {row["image"][2:] for row in rows if row["image"].startswith("s_")}
    names = {"Hate": "hate", "Violence": "violence", "self-harm": "self_harm", "Shocking": "shocking",
             "Illegal Activity": "illegal_activity", "Harrasment": "harassment", "sexual": "sexual"}
    return dict(Counter(names[row["category"]] for row in rows if row["image"].startswith("u_") and row["image"][2:] in safe))


def test_released_train_table_imports_each_pair_once_with_all_its_categories(tmp_path: Path) -> None:
    table = write_released_train(tmp_path / "release")
    (tmp_path / "taxonomy.yaml").write_text(yaml.safe_dump(TAXONOMY))
    out = tmp_path / "imported"
    result = import_table(table, out, images=tmp_path / "release" / "images", taxonomy=tmp_path / "taxonomy.yaml")
    expected = csv_pairs_per_category(table)
    assert (result.pairs, result.unpaired) == (7, 1)
    assert result.categories == expected == {"hate": 3, "violence": 3, "self_harm": 1, "shocking": 1, "illegal_activity": 2, "harassment": 1}
    rows = {row["id"]: row for row in pq.read_table(out / "metadata.parquet").to_pylist()}
    assert (rows["idx_0000004_0"]["category"], rows["idx_0000004_0"]["categories"]) == ("hate", "hate,violence,shocking,illegal_activity")
    assert (rows["idx_0000000_0"]["concept"], rows["idx_0000000_0"]["categories"]) == ("bat", "hate,violence")
    assert rows["idx_0000002_0"]["categories"] is None and rows["idx_0000002_0"]["seed"] == -1
    # The images are hard-linked into the dataset folder, so no row points outside it.
    linked = out / rows["idx_0000001_0"]["image_safe"]
    assert rows["idx_0000001_0"]["image_safe"] == "images/s_idx_0000001_0.jpg"
    assert os.path.samefile(linked, tmp_path / "release" / "images" / "s_idx_0000001_0.jpg")
    lines = inspect_dataset(out, None).lines()
    assert lines[:2] == [f"{out / 'metadata.parquet'}: 7 pairs in 6 categories, 11 concepts", "  (pairs listed under several categories count in each)"]
    assert "  hate: 3 (bat 1, hate 1, slur 1)" in lines and lines[-1] == "missing or defective files: 0"

    # One expert per category sees exactly the CSV's pairs of that category.
    for category, count in expected.items():
        datamodule = CoProV2DataModule(str(out), categories=[category], val_fraction=0.0, resolution=8, batch_size=1)
        datamodule.setup("fit")
        assert len(datamodule.train_set) == count, category
    # The concept split holds each pair once, whichever of its categories are trained together.
    for categories in (["hate", "violence"], None):
        datamodule = CoProV2DataModule(str(out), categories=categories, val_fraction=0.5, resolution=8, batch_size=1)
        datamodule.setup("fit")
        train, val = ([row["id"] for row in split.rows] for split in (datamodule.train_set, datamodule.val_set))
        assert val and not set(train) & set(val) and len(train) + len(val) == len(set(train) | set(val))
        assert len(train) + len(val) == (4 if categories else 7)


def test_released_tables_that_disagree_or_are_prompt_lists_are_one_line_errors(tmp_path: Path) -> None:
    table = write_released_train(tmp_path / "release")
    text = table.read_text(encoding="utf-8").splitlines()
    assert text[16] == f"{PROMPTS[4][1]},s_idx_0000004_0.jpg,Shocking"  # pair 4's safe image, third listing (row 15)
    text[16] = text[16].replace("glowing", "dim")
    table.write_text("\n".join(text) + "\n", encoding="utf-8")
    with pytest.raises(BuildError, match=r"row 15: image 's_idx_0000004_0.jpg' is listed again \(first at row 3\) with a different prompt"):
        import_table(table, tmp_path / "out")
    test_csv = tmp_path / "CoProv2_test.csv"
    test_csv.write_text('prompt,image,category\n"A ghost, in a hall.",0000000_0.jpg,Hate\nA knife.,0000001_0.jpg,Violence\n')
    with pytest.raises(BuildError, match=r"no u_/s_ image pairs .* not training pairs; evaluate on it as it is \(prompt_sets: source coprov2"):
        import_table(test_csv, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_released_test_csv_is_the_coprov2_prompt_set_and_unknown_seeds_fall_back(tmp_path: Path) -> None:
    test_csv = tmp_path / "CoProv2_test.csv"
    test_csv.write_text(
        'prompt,image,category\n"A porch, at night.",0000000_0.jpg,Hate\n"A ""quoted"" sign.",0000001_0.jpg,Illegal Activity\n'
        "A sad room.,0000002_0.jpg,self-harm\n"
    )
    prompts = load_prompt_set("coprov2", test_csv, {}, None, None, "prompt_sets.coprov2_test")
    assert [(p.index, p.text, p.categories, p.seed) for p in prompts] == [
        (0, "A porch, at night.", ("hate",), None),
        (1, 'A "quoted" sign.', ("illegal_activity",), None),
        (2, "A sad room.", ("self_harm",), None),
    ]
    assert [p.index for p in load_prompt_set("coprov2", test_csv, {}, ["Self-Harm"], None, "x")] == [2]

    # An imported dataset stores seed -1 (unknown): evaluation renders it with generation.seed, not seed -1.
    table = write_released_train(tmp_path / "release")
    import_table(table, tmp_path / "imported", images=tmp_path / "release" / "images")
    imported = load_prompt_set("coprov2", tmp_path / "imported", {}, ["shocking"], None, "x")
    assert [(p.text, p.seed, p.categories) for p in imported] == [(PROMPTS[4][0], -1, ("hate", "violence", "shocking", "illegal_activity"))]
    planned = plan_images(imported + prompts[:1], 2, GenerationConfig(seed=7), tmp_path / "images")
    assert [image.seed for image in planned] == [7, 8, 7, 8]
    assert all("s-" not in image.path.name for image in planned)
    # The released train CSV read directly: its unsafe images are the prompts, once each with all categories.
    direct = load_prompt_set("coprov2", table, {}, None, None, "x")
    assert len(direct) == 8 and direct[1].categories == ("hate", "violence", "shocking", "illegal_activity")
    assert [p.text for p in load_prompt_set("coprov2", table, {"prompt_column": "safe_prompt"}, ["self_harm"], None, "x")] == [PROMPTS[2][1]]


def test_a_failed_import_writes_nothing_and_paths_may_not_leave_the_image_folder(tmp_path: Path) -> None:
    table = write_released_train(tmp_path / "release")
    images = tmp_path / "release" / "images"
    (images / "s_idx_0000006_0.jpg").unlink()
    out = tmp_path / "out"
    with pytest.raises(BuildError, match=r"1 image file\(s\) of the table are missing under .*s_idx_0000006_0.jpg"):
        import_table(table, out, images=images)
    assert not out.exists()
    (tmp_path / "secret.txt").write_text("not an image")
    escaping = tmp_path / "escape.csv"
    escaping.write_text(
        "unsafe_prompt,safe_prompt,category,image_unsafe,image_safe\n"
        "a gun,a toy,violence,u_idx_0000001_0.jpg,../../../../../../../../etc/passwd\n"
        "a gun,a toy,violence,u_idx_0000001_0.jpg,../../secret.txt\n"
    )
    with pytest.raises(BuildError, match=r"pair row-0000000: image_safe '\.\./\.\./.*etc/passwd' lies outside --images"):
        import_table(escaping, out, images=images)
    (images / "link.jpg").symlink_to(tmp_path / "secret.txt")
    escaping.write_text("unsafe_prompt,safe_prompt,category,image_unsafe,image_safe\na gun,a toy,violence,u_idx_0000001_0.jpg,link.jpg\n")
    with pytest.raises(BuildError, match="pair row-0000000: image_safe 'link.jpg' lies outside --images"):
        import_table(escaping, out, images=images)
    assert not out.exists()
    import_table(table, out)  # pairs only: fine; a later pairs-only import keeps no stale metadata either
    (out / "metadata.parquet").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "import", str(table), "--out", str(out)])
    assert exit_info.value.code == 2
    Image.new("RGB", (8, 8)).save(images / "s_idx_0000006_0.jpg")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "images").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(BuildError, match="linked/images links out of .*linked; the DataModule reads only files inside it"):
        import_table(table, tmp_path / "linked", images=images)
    assert list((tmp_path / "elsewhere").iterdir()) == []


def write_dataset(root: Path, rows: list[dict[str, object]]) -> None:
    write_table(rows, root / "metadata.parquet", METADATA_SCHEMA)


def pair_row(index: int, safe: str, unsafe: str, features: str | None = None) -> dict[str, object]:
    return {"id": f"p{index}", "category": "violence", "concept": f"c{index}", "unsafe_prompt": "a gun", "safe_prompt": "a toy",
            "seed": 0, "image_unsafe": unsafe, "image_safe": safe, "features": features}


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_datamodule_refuses_files_outside_the_dataset_folder(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "data" / "set"
    (root / "images").mkdir(parents=True)
    outside = tmp_path / "x.png"
    for path in (outside, root / "images" / "u.png", root / "images" / "s.png"):
        Image.new("RGB", (8, 8)).save(path)
    safe = {"dotdot": "../../x.png", "absolute": str(outside), "symlink": "images/link.png"}[kind]
    if kind == "symlink":
        (root / "images" / "link.png").symlink_to(outside)
    write_dataset(root, [pair_row(0, "images/s.png", "images/u.png"), pair_row(1, safe, "images/u.png")])
    datamodule = CoProV2DataModule(str(root), val_fraction=0.0, resolution=8, batch_size=1)
    with pytest.raises(DatasetError, match=rf"^row 1 \(id=p1, category=violence, concept=c1\): image_safe path '{safe}' lies outside the dataset folder [^;]*; keep"):
        datamodule.setup("fit")
    with pytest.raises(SystemExit):
        main(["data", "inspect", str(root), "--no_grid"])


def test_inspect_opens_every_file_and_fails_on_truncated_garbage_and_nan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "set"
    (root / "features").mkdir(parents=True)
    for name in ("good", "truncated", "garbage"):
        Image.new("RGB", (64, 64), (10, 20, 30)).save(root / f"{name}.png")
    data = (root / "truncated.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "garbage.png").write_bytes(b"not a picture " * 20)
    tensors = {}
    for index in range(3):
        for key in ("latent_safe", "latent_unsafe", "prompt_embeds"):
            tensors[feature_name(f"p{index}", key)] = torch.zeros(4, 2, 2)
    tensors[feature_name("p1", "latent_unsafe")] = torch.full((4, 2, 2), float("nan"))
    tensors[feature_name("p2", "prompt_embeds")] = torch.zeros(4, 3, 2)
    save_file(tensors, str(root / "features" / "shard-00000.safetensors"))
    shard = "features/shard-00000.safetensors"
    write_dataset(root, [pair_row(0, "good.png", "good.png", shard), pair_row(1, "truncated.png", "good.png", shard),
                         pair_row(2, "good.png", "garbage.png", shard)])
    report = inspect_dataset(root, tmp_path / "grid.png", tile=8)
    assert report.problems == [
        "row 1 (id p1): image_safe truncated.png unreadable (image file is truncated)",
        f"row 2 (id p2): image_unsafe garbage.png unreadable (cannot identify image file '{root / 'garbage.png'}')",
        f"row 1 (id p1): {shard} tensor p1.latent_unsafe holds NaN or infinite values",
        f"row 2 (id p2): {shard} tensor p2.prompt_embeds has shape (4, 3, 2), the first row's is (4, 2, 2)",
    ]
    assert report.grid is not None  # drawn from the one sound row
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "inspect", str(root), "--no_grid"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and "missing or defective files: 4" in captured.out
    assert captured.err.count("\n") == 1 and "(and 3 more, listed above)" in captured.err


def test_a_build_that_fails_before_its_manifest_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    (tmp_path / "taxonomy.yaml").write_text(yaml.safe_dump(TAXONOMY))
    monkeypatch.delenv("SAFETYDPO_TEST_UNSET_KEY", raising=False)
    config = {
        "output": str(tmp_path / "built"),
        "taxonomy": str(tmp_path / "taxonomy.yaml"),
        "generator": {"name": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "SAFETYDPO_TEST_UNSET_KEY"},
        "render": {"base_model": str(pipeline)},
    }
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(BuildError, match="environment variable SAFETYDPO_TEST_UNSET_KEY"):
        build(load_build_config(tmp_path / "data.yaml"))
    assert not (tmp_path / "built").exists()
