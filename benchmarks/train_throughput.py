"""Training throughput and peak GPU memory: SafetyDPO's expert step against a naive Diffusion-DPO step.

Both steps train the same LoRA on the same network of ``--arch`` (SD 1.5's UNet at 512 px, SDXL's UNet
at 1024 px, SD3-medium's MMDiT transformer at 1024 px; random weights built from configs, nothing
downloaded) with forward, backward and an AdamW update, in one process:

- ours: ``DPOExpertModule.preference_step`` (the body of ``training_step`` minus logging) on
  precomputed latents and text embeddings, winner and loser in one concatenated UNet forward, the
  reference = the same UNet with adapters disabled under ``no_grad``, frozen weights in bf16,
  bf16 autocast (what ``trainer.precision: bf16-mixed`` does; ``--ours-fp32``: fp32), plus the
  optional fast-path flags;
- naive: VAE-encode both images and run the text encoders every step, a deep-copied reference network,
  fp32 (``--naive-fp16``: fp16 autocast with a grad scaler), winner and loser in separate forwards.

Both steps noise, condition and predict through the family's denoiser (``safetydpo.models.denoisers``).
SD3 is built without its T5 encoder (SD3's drop-T5 option: its 4096-wide token embeddings are zeros);
the precomputed features ours reads are the same width either way.

    python benchmarks/train_throughput.py                 # SD 1.5 size: 512 px, batch 8, on CUDA
    python benchmarks/train_throughput.py --arch sdxl --batch-size 2   # SDXL at 1024 px
    python benchmarks/train_throughput.py --tiny --steps 2   # tiny config, a CPU smoke test (any --arch)

Peak memory is ``torch.cuda.max_memory_allocated`` from building a step to its last timed step,
so it counts weights, optimizer state and activations; on a CPU it is not measured (n/a).
"""

from __future__ import annotations

import argparse
import copy
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, UNet2DConditionModel
from lightning.fabric.utilities.apply_func import move_data_to_device
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from safetydpo.data.batch import PairBatch
from safetydpo.devices import resolve_device
from safetydpo.losses import DenoisingErrors, build_loss
from safetydpo.models import DPOExpertModule, LoraSettings
from safetydpo.models.components import DiffusionComponents, components_from_pipeline, freeze
from safetydpo.models.denoisers import StableDiffusion3, StableDiffusionXL
from safetydpo.models.lora import attach_lora
from safetydpo.models.tiny import TINY_BUILDERS, TINY_RESOLUTION
from safetydpo.models.tokenizer import build_clip_tokenizer

SD_RESOLUTION = 512
#: Image size of the SDXL and SD3 measurements (both models' native resolution).
XL_RESOLUTION = 1024
LEARNING_RATE = 1e-5
PROMPT = "a photo of a person in a city street"

Step = Callable[[Any, int], None]


def build_sd15_components(seed: int = 0) -> DiffusionComponents:
    """SD 1.5's UNet, VAE and CLIP text encoder architectures with random weights."""
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=tokenizer.model_max_length,
            hidden_act="quick_gelu",
        )
    )
    unet = UNet2DConditionModel(
        sample_size=SD_RESOLUTION // 8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        sample_size=SD_RESOLUTION,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
    )
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    return DiffusionComponents(unet, vae, text_encoder, tokenizer, scheduler)


def _clip(hidden: int, layers: int, heads: int, projection: int | None = None, act: str = "gelu") -> CLIPTextModel:
    """A CLIP text tower of the given size (with a projection: ``CLIPTextModelWithProjection``, pooled output)."""
    tokenizer = build_clip_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length, hidden_act=act,
        **({"projection_dim": projection} if projection else {}),
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae(latent_channels: int, **config: Any) -> AutoencoderKL:
    return AutoencoderKL(
        sample_size=XL_RESOLUTION, block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=latent_channels, **config,
    )


def build_sdxl_components(seed: int = 0) -> DiffusionComponents:
    """SDXL base's UNet (2.6B), VAE and two text encoders (CLIP ViT-L, OpenCLIP bigG) with random weights."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=XL_RESOLUTION // 8,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    return DiffusionComponents(
        unet, _vae(4, scaling_factor=0.13025), _clip(768, 12, 12, act="quick_gelu"), build_clip_tokenizer(), scheduler,
        text_encoder_2=_clip(1280, 32, 20, projection=1280), tokenizer_2=build_clip_tokenizer(), denoiser=StableDiffusionXL(),
    )


def build_sd3_components(seed: int = 0) -> DiffusionComponents:
    """SD3-medium's MMDiT (2B), 16-channel VAE and two CLIP encoders with random weights; T5 dropped."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=XL_RESOLUTION // 8, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
    )
    vae = _vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    return DiffusionComponents(
        transformer, vae, _clip(768, 12, 12, projection=768, act="quick_gelu"), build_clip_tokenizer(), FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder_2=_clip(1280, 32, 20, projection=1280), tokenizer_2=build_clip_tokenizer(), denoiser=StableDiffusion3(),
    )


#: ``--arch`` -> (real-size builder, resolution, model family of its tiny pipeline).
ARCHS: dict[str, tuple[Callable[[], DiffusionComponents], int, str]] = {
    "sd15": (build_sd15_components, SD_RESOLUTION, "sd"),
    "sdxl": (build_sdxl_components, XL_RESOLUTION, "sdxl"),
    "sd3": (build_sd3_components, XL_RESOLUTION, "sd3"),
}


def make_inputs(components: DiffusionComponents, batch_size: int, resolution: int) -> tuple[PairBatch, dict[str, Any]]:
    """One batch of pairs as each step consumes it: precomputed features (ours), pixels and prompts (naive)."""
    generator = torch.Generator().manual_seed(0)
    latent_size = resolution // 2 ** (len(components.vae.config.block_out_channels) - 1)
    latent_shape = (batch_size, components.unet.config.in_channels, latent_size, latent_size)
    prompts = [PROMPT] * batch_size
    conditioning = components.denoiser.encode(components, prompts[:1])  # the family's conditioning shapes
    pooled = conditioning.pooled
    features = PairBatch(
        positions=torch.arange(batch_size),
        prompts=prompts,
        latents_winner=torch.randn(latent_shape, generator=generator),
        latents_loser=torch.randn(latent_shape, generator=generator),
        prompt_embeds=torch.randn(batch_size, *conditioning.embeds.shape[1:], generator=generator),
        pooled_prompt_embeds=None if pooled is None else torch.randn(batch_size, *pooled.shape[1:], generator=generator),
    )
    pixels = {
        "pixels_winner": torch.rand(batch_size, 3, resolution, resolution, generator=generator) * 2 - 1,
        "pixels_loser": torch.rand(batch_size, 3, resolution, resolution, generator=generator) * 2 - 1,
        "prompts": prompts,
    }
    return features, pixels


def ours(components: DiffusionComponents, args: argparse.Namespace, device: torch.device) -> Step:
    """The training path of ``DPOExpertModule`` in bf16 (or fp32 with ``--ours-fp32``), fast-path flags from ``args``."""
    bf16 = not args.ours_fp32
    module = DPOExpertModule.from_components(
        components,
        "benchmark",
        lora=LoraSettings(rank=args.rank),
        learning_rate=LEARNING_RATE,
        frozen_dtype="bfloat16" if bf16 else "float32",
        gradient_checkpointing=args.gradient_checkpointing,
        channels_last=args.channels_last,
        compile=args.compile,
    )
    module.to(device).train()
    optimizer = module.configure_optimizers()["optimizer"]

    def step(batch: PairBatch, index: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            output, _ = module.preference_step(batch, index)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def naive(components: DiffusionComponents, args: argparse.Namespace, device: torch.device) -> Step:
    """A straightforward Diffusion-DPO LoRA step: encoders every step, a second network, one forward per image."""
    policy, vae, denoiser = components.unet, components.vae, components.denoiser
    reference = copy.deepcopy(policy)
    freeze(policy, reference, *components.encoders())
    attach_lora(policy, LoraSettings(rank=args.rank))
    for model in (policy, reference, *components.encoders()):
        model.to(device)
    policy.train()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=LEARNING_RATE, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device.type, enabled=args.naive_fp16)
    loss_fn = build_loss("safety_dpo")

    generator = torch.Generator().manual_seed(0)

    def step(batch: dict[str, Any], index: int) -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=args.naive_fp16):
            with torch.no_grad():
                shift = vae.config.shift_factor or 0.0
                images = [(vae.encode(batch[key]).latent_dist.sample() - shift) * vae.config.scaling_factor for key in ("pixels_winner", "pixels_loser")]
                conditioning = denoiser.encode(components, batch["prompts"])
            noise = torch.randn_like(images[0])
            timesteps = torch.cat([denoiser.sample_timestep(components, generator) for _ in range(noise.shape[0])]).to(device)
            errors = []
            for network, grad in ((policy, True), (reference, False)):
                with torch.set_grad_enabled(grad):
                    for latents in images:
                        noisy, target = denoiser.noisy_and_target(components, latents, noise, timesteps)
                        prediction = denoiser.predict(components, network, noisy, timesteps, conditioning)
                        errors.append(F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)))
            loss = loss_fn(DenoisingErrors(*errors)).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


@dataclass(frozen=True)
class Result:
    name: str
    pairs_per_second: float | None  # None: ran out of memory
    peak_bytes: int | None  # None: not measured (CPU) or out of memory


def measure(name: str, build: Callable[[], Step], inputs: PairBatch | dict[str, Any], pairs: int, steps: int, warmup: int, device: torch.device) -> Result:
    """Build one step and its batch on ``device``, run ``warmup`` untimed then ``steps`` timed steps.

    Peak memory covers all of it (weights, optimizer state, batch, activations), from a reset once
    the previous step's memory is freed.
    """
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        batch = move_data_to_device(inputs, device)
        step = build()
        for index in range(warmup):
            step(batch, index)
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for index in range(warmup, warmup + steps):
            step(batch, index)
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
    except torch.OutOfMemoryError:
        return Result(name, None, None)
    return Result(name, pairs * steps / elapsed, torch.cuda.max_memory_allocated(device) if cuda else None)


def ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None:
        return "n/a"
    return f"{numerator / denominator:.2f}x"


def report(results: list[Result], device: torch.device) -> str:
    memory_note = "n/a (CPU: not measured)" if device.type != "cuda" else "out of memory"
    lines = ["| step | pairs/s | peak GPU memory |", "| --- | ---: | ---: |"]
    for result in results:
        speed = f"{result.pairs_per_second:.3f}" if result.pairs_per_second is not None else "out of memory"
        memory = f"{result.peak_bytes / 2**30:.2f} GiB" if result.peak_bytes is not None else memory_note
        lines.append(f"| {result.name} | {speed} | {memory} |")
    ours_result, naive_result = results
    lines.append("")
    lines.append(f"ours/naive pairs/s: {ratio(ours_result.pairs_per_second, naive_result.pairs_per_second)}")
    lines.append(f"ours/naive peak memory: {ratio(ours_result.peak_bytes, naive_result.peak_bytes)}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="sd15", help="network to train: sd15 (512 px), sdxl or sd3 (1024 px)")
    parser.add_argument("--tiny", action="store_true", help="tiny pipeline (32 px, 16x16 latents): a CPU smoke test, not a measurement")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, cuDNN autotuning)")
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (configs/expert.yaml: 32)")
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile the UNet (model.init_args.compile)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="ours: model.init_args.gradient_checkpointing")
    parser.add_argument("--channels-last", action="store_true", help="ours: model.init_args.channels_last")
    parser.add_argument("--ours-fp32", action="store_true", help="ours: fp32 frozen weights, no autocast (savings without precision)")
    parser.add_argument("--naive-fp16", action="store_true", help="naive: fp16 autocast with a grad scaler instead of fp32")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.steps, args.rank) < 1 or args.warmup < 0:
        parser.error("--batch-size, --steps and --rank must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    build_real, real_resolution, family = ARCHS[args.arch]
    components = components_from_pipeline(TINY_BUILDERS[family](seed=0)) if args.tiny else build_real()
    resolution = TINY_RESOLUTION if args.tiny else real_resolution
    features, pixels = make_inputs(components, args.batch_size, resolution)
    naive_components = copy.deepcopy(components)  # ours attaches its LoRA to ``components`` in place
    attention = type(next(iter(components.unet.attn_processors.values()))).__name__
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{'tiny' if args.tiny else 'real-size'} {args.arch} architecture (random weights), {resolution} px, batch {args.batch_size} pairs, "
        f"LoRA rank {args.rank}, {args.steps} timed steps after {args.warmup} warm-up, attention {attention}, "
        f"{device} ({name}), torch {torch.__version__}"
    )
    print(
        f"ours: precomputed features, winner+loser in one forward, reference = adapters off, "
        f"{'fp32' if args.ours_fp32 else 'bf16 frozen weights + autocast'}"
        f"{', compile' if args.compile else ''}{', gradient checkpointing' if args.gradient_checkpointing else ''}"
        f"{', channels_last' if args.channels_last else ''}"
    )
    print(f"naive: VAE + text encoder every step, deep-copied reference UNet, {'fp16 autocast' if args.naive_fp16 else 'fp32'}, separate winner/loser forwards\n")
    timing = (args.batch_size, args.steps, args.warmup, device)
    ours_result = measure("ours", lambda: ours(components, args, device), features, *timing)
    components = None  # its modules now sit on the device; free them before the naive step is measured
    naive_result = measure("naive", lambda: naive(naive_components, args, device), pixels, *timing)
    print(report([ours_result, naive_result], device))


if __name__ == "__main__":
    main()
