"""ToyWorld's registered classes, imported through the ``safetydpo.plugins`` entry point.

Importing this module registers the ``toyworld`` pair generator, safety classifier and FID feature
extractor, and the pipeline's ``toyworld_heldout`` and ``toyworld_concept_pairs`` asset writers and ``toyworld_fidelity`` report section,
so configs name them while the generic packages never import ToyWorld.
"""

from safetydpo.evaluation.fid import FEATURE_EXTRACTORS
from safetydpo.toyworld.classifier import ToyWorldClassifier
from safetydpo.toyworld.concept_pairs import ToyWorldConceptPairs
from safetydpo.toyworld.generator import ToyWorldGenerator
from safetydpo.toyworld.judge import JudgeFeatures
from safetydpo.toyworld.measures import ToyWorldFidelity, ToyWorldHeldout

# Registered here rather than in judge.py, so training and loading the judge need no evaluation stack.
FEATURE_EXTRACTORS.register("toyworld")(JudgeFeatures)

__all__ = ["JudgeFeatures", "ToyWorldClassifier", "ToyWorldConceptPairs", "ToyWorldFidelity", "ToyWorldGenerator", "ToyWorldHeldout"]
