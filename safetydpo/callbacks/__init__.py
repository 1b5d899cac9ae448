"""Lightning callbacks of SafetyDPO (kept inside the package: a top-level ``callbacks`` would clash)."""

from safetydpo.callbacks.comerge import CoMergeCallback
from safetydpo.callbacks.lora_export import LoraExport
from safetydpo.callbacks.progress import StepProgress
from safetydpo.callbacks.samples import ValidationSamples

__all__ = ["CoMergeCallback", "LoraExport", "StepProgress", "ValidationSamples"]
