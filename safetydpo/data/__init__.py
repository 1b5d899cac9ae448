"""CoProV2 preference data: the on-disk format, pair datasets, the LightningDataModule."""

from safetydpo.data.batch import PairBatch, PairSample, collate_pairs
from safetydpo.data.coprov2 import METADATA_COLUMNS, DatasetError
from safetydpo.data.datamodule import CoProV2DataModule, pair_batches
from safetydpo.data.dataset import PreferencePairDataset
from safetydpo.data.taxonomy import PAPER_CATEGORIES, normalize_category

__all__ = [
    "METADATA_COLUMNS",
    "PAPER_CATEGORIES",
    "CoProV2DataModule",
    "DatasetError",
    "PairBatch",
    "PairSample",
    "PreferencePairDataset",
    "collate_pairs",
    "normalize_category",
    "pair_batches",
]
