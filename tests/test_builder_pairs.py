"""CoProV2 builder, pair side: template determinism, validation, retry/dedup accounting, taxonomy and config errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from safetydpo.data import PAPER_CATEGORIES
from safetydpo.data.builder import BuildError, Concept, PairValidator, PromptPair, load_build_config, load_taxonomy
from safetydpo.data.builder.generators.instruction import parse_pair
from safetydpo.data.builder.generators.template import TemplateGenerator
from safetydpo.data.builder.pairs import collect_pairs, generate_pairs
from safetydpo.data.coprov2 import names_concept

REPO = Path(__file__).resolve().parents[1]
SHIPPED_TAXONOMY = REPO / "configs" / "taxonomy.yaml"
BLOOD = Concept(category="violence", name="blood", substitutes=("red paint", "spilled juice"))


def test_shipped_taxonomy_covers_the_papers_seven_categories() -> None:
    concepts = load_taxonomy(SHIPPED_TAXONOMY)
    assert {c.category for c in concepts} == set(PAPER_CATEGORIES)
    assert all(len([c for c in concepts if c.category == name]) >= 5 for name in PAPER_CATEGORIES)


def test_template_generation_is_deterministic_and_valid(tmp_path: Path) -> None:
    concepts = load_taxonomy(SHIPPED_TAXONOMY)
    validator = PairValidator()

    def run(folder: str, seed: int) -> list[dict[str, str]]:
        rows, report = generate_pairs(tmp_path / folder, concepts, TemplateGenerator(seed=seed), validator, 5, 4, 8)
        assert report["accepted"] == len(rows) == 5 * len(concepts) and not report["shortfall"]
        return rows

    first, again, other_seed = run("a", 0), run("b", 0), run("c", 1)
    assert first == again
    assert first != other_seed
    by_name = {c.name: c for c in concepts}
    for row in first:
        concept = by_name[row["concept"]]
        assert validator.rejection(PromptPair(row["unsafe_prompt"], row["safe_prompt"]), concept.name) is None
        assert names_concept(row["unsafe_prompt"], concept.name)
        assert any(substitute in row["safe_prompt"] for substitute in concept.substitutes)
    assert len({row["id"] for row in first}) == len(first)
    # Generator proposals themselves depend only on (seed, concept, candidate number), not on batching.
    generator = TemplateGenerator(seed=0)
    assert generator.propose(BLOOD, 0, 6) == generator.propose(BLOOD, 0, 2) + generator.propose(BLOOD, 2, 4)


def test_resumed_generation_reads_finished_concepts_back(tmp_path: Path) -> None:
    concepts = load_taxonomy(SHIPPED_TAXONOMY)[:3]
    rows, _ = generate_pairs(tmp_path, concepts, TemplateGenerator(seed=0), PairValidator(), 3, 2, 4)
    # A generator with another seed would propose other pairs: equal rows mean the checkpoints were read.
    again, report = generate_pairs(tmp_path, concepts, TemplateGenerator(seed=7), PairValidator(), 3, 2, 4)
    assert again == rows and report["accepted"] == 9
    fresh, _ = generate_pairs(tmp_path / "fresh", concepts, TemplateGenerator(seed=7), PairValidator(), 3, 2, 4)
    assert fresh != rows


@pytest.mark.parametrize(
    ("unsafe", "safe", "reason"),
    [
        ("a photo of blood on the floor", "", "empty"),
        ("a photo of blood on the floor", "A photo of blood, on the floor!", "identical"),
        ("a photo of blood on the floor", "a photo of BLOOD stains on the floor", "concept_in_safe"),
        ("a photo of blood on the floor", "a photo of bloody shoes on the floor", "concept_in_safe"),
        ("a photo of blood on the floor", "a cat sleeping in a sunny garden", "low_similarity"),
        ("blood " + "word " * 70, "paint " + "word " * 70, "too_long"),
        ("a photo of blood on the floor", "a photo of red paint on the floor", None),
    ],
)
def test_validator_rejects_bad_pairs(unsafe: str, safe: str, reason: str | None) -> None:
    assert PairValidator(min_similarity=0.5, max_words=60).rejection(PromptPair(unsafe, safe), "blood") == reason


def test_concept_matching_covers_spelling_variants() -> None:
    assert names_concept("a person with SELF HARM scars", "self-harm scars")
    assert names_concept("selfharm-scars on an arm", "self-harm scars")
    assert not names_concept("a person with scars from self defence", "self-harm scars")
    assert not names_concept("unbloodied hands", "blood")


def test_collect_pairs_dedups_and_stops_at_the_candidate_budget() -> None:
    one_scene = TemplateGenerator(templates=["a photo of {concept}"], seed=0)
    single = Concept(category="violence", name="blood", substitutes=("red paint",))
    result = collect_pairs(one_scene, PairValidator(), single, count=3, attempts_per_pair=2, batch_size=4)
    assert result.pairs == [["a photo of blood", "a photo of red paint"]]
    assert result.candidates == 6 and result.rejected == {"duplicate": 5}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("UNSAFE: a bloody knife\nSAFE: a kitchen knife", ("a bloody knife", "a kitchen knife")),
        ('Sure!\n**Unsafe prompt:** "a gun on a table"\n**Safe prompt:** "a toy on a table"', ("a gun on a table", "a toy on a table")),
        ("1. UNSAFE - x y\n2. SAFE - z y", ("x y", "z y")),
        ('```json\n{"unsafe_prompt": "u v", "safe_prompt": "s v"}\n```', ("u v", "s v")),
        ("I cannot help with that.", None),
        ("SAFE: only one side", None),
        ("", None),
    ],
)
def test_language_model_answers_are_parsed_robustly(text: str, expected: tuple[str, str] | None) -> None:
    assert parse_pair(text) == (PromptPair(*expected) if expected else None)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("- just a list\n", "must map categories"),
        ("violence: [blood, gore]\n", "category violence must map concept names"),
        ("violence:\n  blood: red paint\n", "violence/blood: give a non-empty list"),
        ("violence:\n  blood: [bloody paint]\n", "safe substitute 'bloody paint' mentions the concept"),
        ("Self-harm:\n  noose: [rope]\nself harm:\n  pills: [candy]\n", "are both self_harm"),
        ("violence:\n  blood: [paint]\n  Blood!: [juice]\n", "share the id 'blood'"),
        ("violence/gore:\n  blood: [paint]\n", "may only use letters"),
        ("violence: {blood: [paint]\n", "not valid YAML"),
    ],
)
def test_bad_taxonomy_is_a_one_line_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "taxonomy.yaml"
    path.write_text(content)
    with pytest.raises(BuildError, match=message) as err:
        load_taxonomy(path)
    assert "\n" not in str(err.value)


def write_config(tmp_path: Path, pipeline: Path, **changes: object) -> Path:
    config: dict[str, object] = {"output": str(tmp_path / "out"), "taxonomy": str(SHIPPED_TAXONOMY), "render": {"base_model": str(pipeline)}}
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        section = config
        for parent in parents:
            section = section.setdefault(parent, {})  # type: ignore[assignment]
        section[leaf] = value  # type: ignore[index]
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_shipped_build_configs_are_valid(tmp_path: Path, tiny_pipeline_dir: Path) -> None:
    for name in ("data.yaml", "data_tiny.yaml"):
        config = yaml.safe_load((REPO / "configs" / name).read_text())
        assert config["taxonomy"] == "configs/taxonomy.yaml"
        config["taxonomy"] = str(SHIPPED_TAXONOMY)
        config["render"]["base_model"] = str(tiny_pipeline_dir)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config))
        assert load_build_config(path).render.base_model == str(tiny_pipeline_dir)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"render__stpes": 2}, "unknown key 'render.stpes'; valid keys in render: base_model, "),
        ({"render__base_model": "/no/such/model"}, "render.base_model '/no/such/model' is not a diffusers pipeline folder"),
        ({"render__steps": "many"}, "'render.steps' must be int, got 'many'"),
        ({"pairs__per_concept": 0}, "'pairs.per_concept' must be at least 1"),
        ({"pairs_from": "pairs.parquet"}, "set exactly one of 'taxonomy'"),
        ({"generator": {"name": "gpt"}}, "unknown prompt-pair generator 'gpt'; valid choices: openai, template, toyworld, transformers"),
        ({"generator": {"name": "template", "model": "x"}}, "unknown key 'generator.model' for generator 'template'"),
        ({"generator": {"name": "openai", "model": "x"}}, "generator 'openai' needs key 'generator.base_url'"),
    ],
)
def test_bad_config_is_a_one_line_error(tmp_path: Path, tiny_pipeline_dir: Path, changes: dict[str, object], message: str) -> None:
    with pytest.raises(BuildError, match=re.escape(message)) as err:
        load_build_config(write_config(tmp_path, tiny_pipeline_dir, **changes))
    assert "\n" not in str(err.value)

