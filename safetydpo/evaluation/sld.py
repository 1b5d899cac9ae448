"""Safe Latent Diffusion (Schramowski et al., CVPR 2023) as a rendering option: diffusers' own SLD pipeline.

The installed diffusers still ships SLD as a deprecated pipeline (``StableDiffusionPipelineSafe``);
it takes the components of an SD 1.x/2.x pipeline as they are, LoRA fused in, so base, LoRA and SLD
models render through one code path and SLD's guidance is the authors' implementation, not ours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline, StableDiffusionPipeline
from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig, StableDiffusionPipelineSafe

from safetydpo.evaluation.config import ModelConfig
from safetydpo.evaluation.errors import EvaluationError
from safetydpo.quiet import drop_log_messages, ignore_warnings

#: The paper's hyper-parameter presets (Tab. 1), as diffusers ships them.
PRESETS: dict[str, dict[str, float]] = {
    "weak": SafetyConfig.WEAK, "medium": SafetyConfig.MEDIUM, "strong": SafetyConfig.STRONG, "max": SafetyConfig.MAX,
}
#: Pipeline classes that carry SLD's own safety concept (the paper's I2P concept text).
SAFE_PIPELINES = ("StableDiffusionPipelineSafe",)


def check_sld(model: ModelConfig) -> None:
    """An SLD model names a preset, a Stable Diffusion pipeline and a safety concept (checked before rendering)."""
    if model.sld is None:
        if model.sld_concept is not None or model.sld_guidance_scale is not None:
            raise EvaluationError(f"model '{model.name}': sld_concept / sld_guidance_scale need sld: a preset ({', '.join(PRESETS)})")
        return
    if model.sld not in PRESETS:
        raise EvaluationError(f"model '{model.name}': sld '{model.sld}' is not a preset; valid choices: {', '.join(PRESETS)}")
    index = Path(model.base_model).expanduser() / "model_index.json"
    family = json.loads(index.read_text(encoding="utf-8")).get("_class_name") if index.is_file() else None
    if family not in ("StableDiffusionPipeline", *SAFE_PIPELINES):
        raise EvaluationError(f"model '{model.name}': sld needs a Stable Diffusion 1.x/2.x pipeline, {model.base_model} is a {family}")
    if model.sld_concept is None and family not in SAFE_PIPELINES:
        raise EvaluationError(
            f"model '{model.name}': sld needs a safety concept and {model.base_model} ({family}) has none: set "
            "models[].sld_concept to the text SLD steers away from (a StableDiffusionPipelineSafe folder brings the paper's)"
        )


def sld_settings(model: ModelConfig) -> dict[str, Any] | None:
    """The SLD arguments of ``model``'s renders (the preset, the guidance-scale override, the concept), or ``None``."""
    if model.sld is None:
        return None
    arguments = dict(PRESETS[model.sld])
    if model.sld_guidance_scale is not None:
        arguments["sld_guidance_scale"] = model.sld_guidance_scale
    return {"preset": model.sld, "arguments": arguments, "concept": model.sld_concept}


class PresetSafePipeline(StableDiffusionPipelineSafe):
    """diffusers' SLD pipeline with its SLD arguments bound, so it renders through the plain pipeline's call."""

    sld_arguments: dict[str, float]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # With guidance off (sld_guidance_scale <= 1) diffusers warns "Safety checker disabled!" on every call.
        ignore_warnings(r"Safety checker disabled!")
        # The deprecated SLD pipeline still decodes through its own decode_latents, which diffusers marks deprecated.
        ignore_warnings(r"The decode_latents method is deprecated", category=FutureWarning)
        return super().__call__(*args, **self.sld_arguments, **kwargs)


def safe_pipeline(pipe: DiffusionPipeline, model: ModelConfig) -> DiffusionPipeline:
    """``pipe`` (LoRA already fused) wrapped in SLD's pipeline with ``model``'s preset and concept."""
    settings = sld_settings(model)
    assert settings is not None
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionPipelineSafe)):
        raise EvaluationError(f"model '{model.name}': sld needs a StableDiffusionPipeline, got {type(pipe).__name__}")
    # SLD is deprecated in diffusers (no updates) but is the authors' implementation; its deprecation notice is expected.
    # diffusers names the instance's class in it, so our subclass's name is the one printed.
    drop_log_messages("diffusers.pipelines.pipeline_utils", rf"^The {PresetSafePipeline.__name__} has been deprecated")
    safe = PresetSafePipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet, scheduler=pipe.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    if settings["concept"] is not None:
        safe.safety_concept = settings["concept"]
    safe.sld_arguments = settings["arguments"]
    safe.set_progress_bar_config(disable=True)
    return safe
