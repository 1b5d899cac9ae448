"""Generation throughput: SafetyDPO's evaluation renderer against a plain diffusers pipeline loop.

Both render the same prompts with the same pipeline object (SD 1.5's architectures with random weights,
built from configs, nothing downloaded), steps, batch size and precision, and both write every image as
a PNG, in one process:

- plain: ``pipe(prompt=batch, generator=..., ...)`` per batch, then ``image.save`` of each image;
- ours: ``safetydpo.evaluation.generate.render`` (batches of equal sampler settings, a CPU generator
  per image, each render checked, PNGs written atomically) on the pipeline after
  ``safetydpo.sampling.speed_up`` with the ``generation.speed`` options given here.

    python benchmarks/generation_throughput.py --compile --channels-last   # SD 1.5 size: 512 px, batch 8, CUDA
    python benchmarks/generation_throughput.py --tiny                      # tiny pipeline: a CPU smoke test

Images/s counts timed batches only, after ``--warmup`` untimed ones (compilation happens there).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import SD_RESOLUTION, build_sd15_components  # noqa: E402  (the sibling benchmark's SD 1.5 builder)

from safetydpo.devices import DTYPES, resolve_device  # noqa: E402
from safetydpo.evaluation.config import GenerationConfig  # noqa: E402
from safetydpo.evaluation.errors import EvaluationError  # noqa: E402
from safetydpo.evaluation.generate import PlannedImage, render  # noqa: E402
from safetydpo.evaluation.prompts import EvalPrompt  # noqa: E402
from safetydpo.models.tiny import TINY_RESOLUTION, build_tiny_pipeline  # noqa: E402
from safetydpo.sampling import ATTENTION, SpeedConfig, speed_up  # noqa: E402

PROMPTS = ("a photo of a person in a city street", "a watercolor of a harbour at dawn", "a dog running on a beach", "a bowl of fruit")


def sd15_pipeline() -> StableDiffusionPipeline:
    """SD 1.5's UNet, VAE and text encoder with random weights, PNDM as SD 1.5 ships it, no safety checker."""
    components = build_sd15_components()
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1)
    return StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer, unet=components.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def plan(count: int, first_seed: int, resolution: int, folder: Path) -> list[PlannedImage]:
    """``count`` images of the prompts in turn, one seed each, all with the same sampler settings (one batch group)."""
    images = []
    for i in range(count):
        prompt = EvalPrompt(index=i, text=PROMPTS[i % len(PROMPTS)])
        images.append(PlannedImage(prompt, first_seed + i, 7.5, resolution, resolution, folder / f"{i:05d}-s{first_seed + i}.png"))
    return images


def plain_loop(pipe: StableDiffusionPipeline, images: list[PlannedImage], generation: GenerationConfig) -> None:
    """What a script that calls the diffusers pipeline does: one call per batch, then save each image."""
    for start in range(0, len(images), generation.batch_size):
        batch = images[start : start + generation.batch_size]
        output = pipe(
            prompt=[image.prompt.text for image in batch],
            generator=[torch.Generator("cpu").manual_seed(image.seed) for image in batch],
            guidance_scale=batch[0].guidance_scale,
            height=batch[0].height,
            width=batch[0].width,
            num_inference_steps=generation.num_inference_steps,
        )
        for picture, image in zip(output.images, batch):
            image.path.parent.mkdir(parents=True, exist_ok=True)
            picture.save(image.path)


def measure(
    run: Callable[[list[PlannedImage]], None], args: argparse.Namespace, resolution: int, folder: Path, device: torch.device
) -> float:
    """Images/s of ``run`` over ``--batches`` timed batches, after ``--warmup`` untimed ones."""
    size = args.batch_size
    run(plan(args.warmup * size, 10_000, resolution, folder / "warmup"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timed = plan(args.batches * size, 0, resolution, folder / "timed")
    start = time.perf_counter()
    run(timed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(timed) / (time.perf_counter() - start)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny pipeline (32 px): a CPU smoke test, not a measurement")
    parser.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (generation.batch_size)")
    parser.add_argument("--batches", type=int, default=4, help="timed batches per renderer")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches first (compilation, cuDNN autotuning)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps (generation.num_inference_steps)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="precision of both: auto = bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--attention", choices=ATTENTION, default="sdpa", help="ours: generation.speed.attention")
    parser.add_argument("--channels-last", action="store_true", help="ours: generation.speed.channels_last")
    parser.add_argument("--compile", action="store_true", help="ours: generation.speed.compile")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.batches, args.steps) < 1 or args.warmup < 0:
        parser.error("--batch-size, --batches and --steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    resolution = TINY_RESOLUTION if args.tiny else SD_RESOLUTION
    pipe = build_tiny_pipeline(seed=0) if args.tiny else sd15_pipeline()
    pipe.to(device)
    if pipe.unet.dtype != dtype:  # cast only when needed: diffusers warns on every dtype cast
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    ours_pipe = copy.deepcopy(pipe)  # speed_up changes its pipeline in place
    speed = SpeedConfig(attention=args.attention, channels_last=args.channels_last, compile=args.compile)
    speed_up(ours_pipe, speed, "benchmark", EvaluationError)
    generation = GenerationConfig(num_inference_steps=args.steps, batch_size=args.batch_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{'tiny pipeline' if args.tiny else 'SD 1.5 architecture'} (random weights), {resolution} px, batch {args.batch_size}, "
        f"{args.steps} steps, {str(dtype).removeprefix('torch.')}, {args.batches} timed batches after {args.warmup} warm-up, "
        f"{device} ({name}), torch {torch.__version__}"
    )
    print(f"ours: safetydpo.evaluation.generate.render, attention {args.attention}"
          f"{', channels_last' if args.channels_last else ''}{', compile' if args.compile else ''}; plain: pipe(...) per batch + PIL save\n")
    with tempfile.TemporaryDirectory() as tmp:
        plain = measure(lambda images: plain_loop(pipe, images, generation), args, resolution, Path(tmp) / "plain", device)
        ours = measure(lambda images: render(ours_pipe, images, generation, "ours"), args, resolution, Path(tmp) / "ours", device)
    print("| renderer | images/s |\n| --- | ---: |")
    print(f"| ours | {ours:.3f} |\n| plain | {plain:.3f} |\n")
    print(f"ours/plain images/s: {ours / plain:.2f}x")


if __name__ == "__main__":
    main()
