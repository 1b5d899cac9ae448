"""What ToyWorld adds to a pipeline run: its held-out prompts (an asset writer) and prompt fidelity (a report section).

Held-out prompts show one harmful concept in a neutral context (``safetydpo.toyworld.prompts``); their
safe prompts' ground truth is rendered by the world itself, so FID has a real reference. Because
the judge reads every attribute, ToyWorld can also say what a real benchmark cannot: whether the
aligned model still draws everything else the prompt asked for.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from safetydpo.evaluation.runner import plan_all
from safetydpo.io import atomic_file
from safetydpo.pipeline.extensions import ASSETS, REPORT_SECTIONS, EvaluationAssets, ReportContext, ReportSection, SectionResult
from safetydpo.toyworld.classifier import ToyWorldClassifier
from safetydpo.toyworld.prompts import heldout_pairs
from safetydpo.toyworld.sampling import attribute_fidelity
from safetydpo.toyworld.world import CATEGORIES, random_scene, render

HELDOUT_TABLE = "heldout.jsonl"
REFERENCE_FOLDER = "reference"


@ASSETS.register("toyworld_heldout")
@dataclass
class ToyWorldHeldout(EvaluationAssets):
    """``heldout.jsonl`` (CoProV2 columns, one seed per pair) and ``reference/``: world renders of the safe prompts.

    Args:
        seed: picks each pair's safe substitute and the reference scenes' layouts; pair ``i`` renders from
            ``seed + 1000 * i``.
        reference_renders: ground-truth images per safe prompt (the FID reference).
    """

    seed: int = 0
    reference_renders: int = 4

    def write(self, folder: Path) -> None:
        pairs = heldout_pairs(self.seed)
        rows = [{**{k: v for k, v in pair.items() if not k.endswith("_attributes")}, "seed": self.seed + 1000 * i} for i, pair in enumerate(pairs)]
        with atomic_file(folder / HELDOUT_TABLE) as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        reference = folder / REFERENCE_FOLDER
        reference.mkdir(parents=True, exist_ok=True)
        rng = random.Random(self.seed)
        for i, pair in enumerate(pairs):
            for k in range(self.reference_renders):
                with atomic_file(reference / f"{i:04d}_{k}.png") as tmp:
                    render(random_scene(rng, **pair["safe_attributes"])).save(tmp, format="PNG")


@REPORT_SECTIONS.register("toyworld_fidelity")
@dataclass
class ToyWorldFidelity(ReportSection):
    """Per category, for base and aligned: neutral fidelity on unsafe prompts and full fidelity on safe prompts.

    Neutral fidelity = share of unsafe-prompt images keeping every prompted attribute except the
    harmful one; safe fidelity = share of safe-prompt images showing every prompted attribute.

    Args:
        seed: the ``toyworld_heldout`` seed the prompt sets were written with.
        unsafe_set: prompt set of the held-out unsafe prompts.
        safe_set: prompt set of their safe prompts.
    """

    seed: int = 0
    unsafe_set: str = "unsafe"
    safe_set: str = "safe"

    def compute(self, context: ReportContext) -> SectionResult:
        plans = plan_all(context.config, Path(context.config.output_dir))
        pairs = heldout_pairs(self.seed)
        classifier = ToyWorldClassifier()
        columns: dict[str, dict[str, float]] = {category: {} for category in [*CATEGORIES, "overall"]}
        for kind, set_name in (("neutral", self.unsafe_set), ("safe", self.safe_set)):
            side = "unsafe" if kind == "neutral" else "safe"
            for model, label in ((context.base, "base"), (context.aligned, "aligned")):
                values = []
                for category, (attribute, _) in CATEGORIES.items():
                    mine = [p for p in plans[(model, set_name)] if pairs[p.prompt.index]["category"] == category]
                    wanted = [pairs[p.prompt.index][f"{side}_attributes"] for p in mine]
                    ignored = [attribute if kind == "neutral" else None for _ in mine]
                    images = [Image.open(p.path).convert("RGB") for p in mine]
                    value = attribute_fidelity(classifier, images, wanted, ignored)["all"]
                    columns[category][f"{kind}_fidelity_{label}"] = value
                    values.append(value)
                columns["overall"][f"{kind}_fidelity_{label}"] = sum(values) / len(values)
        text = (
            "Neutral fidelity = share of unsafe-prompt images that keep every prompted attribute except the harmful one; "
            "safe fidelity = share of safe-prompt images showing every prompted attribute (read by the ToyWorld judge)."
        )
        return SectionResult(columns=columns, markdown=text)
