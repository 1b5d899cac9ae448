"""FID with clean-fid: its "clean" resizing, its feature loop and its Fréchet distance, on local weights only.

clean-fid downloads Inception into /tmp when it is missing; here the extractor is always built
from a local file (or is FID-CLIP, or another registered class) and handed to clean-fid as a custom extractor.
"""

from __future__ import annotations

import hashlib
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from glob import glob
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cleanfid.downloads_helper import inception_url
from cleanfid.fid import frechet_distance, get_files_features
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.utils import EXTENSIONS
from PIL import Image
from torch import Tensor

from safetydpo.evaluation.clip import ClipEncoder, load_clip
from safetydpo.evaluation.config import FidConfig
from safetydpo.evaluation.errors import EvaluationError
from safetydpo.progress import is_terminal
from safetydpo.quiet import ignore_warnings
from safetydpo.registry import Registry

INCEPTION_FILE = "inception-2015-12-05.pt"
FeatureExtractor = Callable[[Tensor], Tensor]

#: ``fid.feature_extractor`` picks one of these by name: a YAML file selects among registered classes
#: and never names a module to import. Plugins (ToyWorld's judge features) register through the
#: ``safetydpo.plugins`` entry point.
FEATURE_EXTRACTORS: Registry[Any] = Registry("FID feature extractor")


class ConfiguredFeatures(ABC):
    """A built-in extractor whose settings have ``fid`` keys of their own, so ``fid.extractor_args`` is not for it."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: FidConfig, device: torch.device) -> ConfiguredFeatures:
        """The extractor built from its own ``fid`` keys, on ``device``."""

    @abstractmethod
    def __call__(self, batch: Tensor) -> Tensor:
        """Features of N x 3 x 299 x 299 floats in [0, 255] (clean-fid's resized images)."""


@FEATURE_EXTRACTORS.register("inception")
class InceptionFeatures(ConfiguredFeatures):
    """clean-fid's TorchScript Inception (the FID standard) from a local file or the folder holding it (``fid.inception_path``)."""

    def __init__(self, path: str | None, device: torch.device, sha256: str | None = None) -> None:
        how = f"download {inception_url} once and set fid.inception_path to it (or use fid.feature_extractor: clip)"
        if not path:
            raise EvaluationError(f"FID with the Inception extractor needs fid.inception_path: {how}")
        given = Path(path).expanduser()
        weights = given / INCEPTION_FILE if given.is_dir() else given
        if weights.name != INCEPTION_FILE:
            raise EvaluationError(f"fid.inception_path {given}: clean-fid loads a file named {INCEPTION_FILE}")
        if not weights.is_file():
            raise EvaluationError(f"Inception weights not found at {weights}: {how}")
        # torch.jit.load runs the file's TorchScript program, so a pinned hash is checked before it is loaded.
        if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256.lower()):
            raise EvaluationError(f"fid.inception_sha256 must be 64 hexadecimal digits (sha256sum's output), got {sha256!r}")
        with weights.open("rb") as handle:
            self.sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
        if sha256 is not None and self.sha256 != sha256.lower():
            raise EvaluationError(
                f"{weights} has SHA-256 {self.sha256}, not fid.inception_sha256 {sha256.lower()}: refusing to load it; "
                f"download {inception_url} again"
            )
        self.model = InceptionV3W(str(weights.parent), download=False, resize_inside=False).to(device).eval()

    @classmethod
    def from_config(cls, config: FidConfig, device: torch.device) -> InceptionFeatures:
        return cls(config.inception_path, device, config.inception_sha256)

    def __call__(self, batch: Tensor) -> Tensor:
        return self.model(batch)


@FEATURE_EXTRACTORS.register("clip")
class ClipFeatures(ConfiguredFeatures):
    """FID-CLIP (Kynkäänniemi et al., 2023): CLIP image embeddings of clean-fid's resized images (``fid.clip``)."""

    def __init__(self, encoder: ClipEncoder) -> None:
        self.encoder = encoder

    @classmethod
    def from_config(cls, config: FidConfig, device: torch.device) -> ClipFeatures:
        return cls(load_clip(config.clip, device))

    def __call__(self, batch: Tensor) -> Tensor:
        pixels = batch.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return self.encoder.embed_images([Image.fromarray(array) for array in pixels])


def build_extractor(config: FidConfig, device: torch.device) -> FeatureExtractor:
    """The registered extractor ``fid.feature_extractor`` names (other classes take ``fid.extractor_args``).

    A name or a registered class's dotted path, never imported: the config cannot run code of its choosing.
    """
    try:
        extractor_class = FEATURE_EXTRACTORS.get(config.feature_extractor)
    except ValueError as err:
        raise EvaluationError(f"fid.feature_extractor: {err}") from None
    if issubclass(extractor_class, ConfiguredFeatures):
        if config.extractor_args:
            raise EvaluationError(f"fid.extractor_args only apply to a custom extractor class, not '{config.feature_extractor}'")
        return extractor_class.from_config(config, device)
    try:
        extractor = FEATURE_EXTRACTORS.build(config.feature_extractor, **config.extractor_args)
    except TypeError as err:
        raise EvaluationError(f"fid.extractor_args: {err}") from None
    return extractor.to(device).eval() if isinstance(extractor, torch.nn.Module) else extractor


def image_files(folder: str | Path) -> list[str]:
    """Every image clean-fid would read from ``folder`` (recursively), sorted."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise EvaluationError(f"FID image folder {folder} does not exist")
    files = sorted({file for ext in EXTENSIONS for file in glob(str(folder / "**" / f"*.{ext}"), recursive=True)})
    if len(files) < 2:
        raise EvaluationError(f"FID image folder {folder} holds {len(files)} image(s); FID needs at least 2")
    return files


class FidScorer:
    """FID of image lists against reference folders; a reference's features are extracted once per run."""

    def __init__(self, extractor: FeatureExtractor, device: torch.device, batch_size: int = 32, num_workers: int = 0) -> None:
        self.extractor = extractor
        self.device = device
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._references: dict[Path, np.ndarray] = {}

    def features(self, files: Sequence[str | Path], description: str) -> np.ndarray:
        return get_files_features(
            [str(file) for file in files],
            model=self.extractor,
            num_workers=self.num_workers,
            batch_size=self.batch_size,
            device=self.device,
            mode="clean",
            description=description,
            verbose=is_terminal(sys.stderr),  # clean-fid's bar redraws; a log gets the evaluation's own lines
        )

    def score(self, files: Sequence[str | Path], reference: str | Path) -> float:
        """FID between ``files`` and every image under the ``reference`` folder."""
        if len(files) < 2:
            raise EvaluationError(f"FID needs at least 2 generated images, got {len(files)}")
        key = Path(reference).expanduser().resolve()
        if key not in self._references:
            self._references[key] = self.features(image_files(key), f"FID reference {key.name}")
        return fid_from_features(self.features(files, "FID generated"), self._references[key])

    def folders(self, folder: str | Path, reference: str | Path) -> float:
        """Folder-vs-folder FID, as ``cleanfid.fid.compute_fid(fdir1, fdir2)`` computes it."""
        return self.score(image_files(folder), reference)


def fid_from_features(features: np.ndarray, reference: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (clean-fid's implementation)."""
    mu, sigma = features.mean(axis=0), np.cov(features, rowvar=False)
    mu_ref, sigma_ref = reference.mean(axis=0), np.cov(reference, rowvar=False)
    if min(len(features), len(reference)) <= features.shape[1]:
        # Fewer images than feature dimensions: the covariance is singular by construction and scipy's sqrtm
        # says so on every call; such an FID is a coarse signal (docs/evaluation.md), not a failure.
        ignore_warnings(r"Matrix is singular")
    return float(frechet_distance(mu, sigma, mu_ref, sigma_ref))
