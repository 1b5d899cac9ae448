"""What the white-box attacks (P4D, UnlearnDiffAtk) share: their budget and checks (``WhiteBoxAttack``),
adversarial token slots in the text encoder's context, a differentiable way into the encoder, and the
reference render they noise.

Both search over discrete tokens with gradients through continuous stand-ins, so both need the same
three things: a prompt layout with slots, a way to feed a continuous vector at a slot, and a result that
survives being written down as text (the cache stores strings, a replay re-tokenises them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from safetydpo.attacks.base import Attack, AttackError, AttackOutcome, AttackTarget
from safetydpo.attacks.text import context_length, decode, prompt_embedding, soft_tokens, vocabulary
from safetydpo.models.components import DiffusionComponents


def check_budget(attack: str, positive: dict[str, float], non_negative: dict[str, float]) -> None:
    """Refuse a budget that cannot search (0 iterations, no tokens, a non-positive rate) or a negative weight:
    one line naming the option, before any work."""
    rules: list[tuple[dict[str, float], str, Callable[[float], bool]]] = [
        (positive, "must be positive", lambda value: value > 0),
        (non_negative, "must be >= 0", lambda value: value >= 0),
    ]
    for options, need, holds in rules:
        for option, value in options.items():
            if not (math.isfinite(value) and holds(value)):
                raise AttackError(f"attack '{attack}': {option} {need}, got {value}; see docs/attacks.md for its default and the paper's")


def check_sd_model(attack: str, target: AttackTarget) -> None:
    """Refuse a model the white-box attacks cannot differentiate through: they feed one CLIP text encoder's
    hidden states to a UNet that takes nothing else (SD 1.x/2.x); SDXL's second encoder and added
    conditioning, or another network, would fail deep inside a forward pass instead."""
    components = target.components
    unet = components.unet
    plain_unet = isinstance(unet, UNet2DConditionModel) and unet.config.addition_embed_type is None
    if not (plain_unet and isinstance(components.text_encoder, CLIPTextModel) and getattr(components, "text_encoder_2", None) is None):
        raise AttackError(
            f"attack '{attack}' differentiates through an SD 1.x/2.x model (one CLIP text encoder, a UNet with no added "
            f"conditioning), which model '{target.name}' ({type(unet).__name__}) is not; attack an SD 1.x/2.x model"
        )


def prompt_words(tokenizer: CLIPTokenizer, prompt: str, attack: str) -> list[list[int]]:
    """The prompt's token ids grouped into words (a word ends with a ``</w>`` token), so insertions never split one."""
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    if not ids:
        raise AttackError(f"attack '{attack}': the prompt {prompt!r} has no tokens; remove empty prompts from the prompt set")
    words: list[list[int]] = [[]]
    for token_id, token in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        words[-1].append(token_id)
        if token.endswith("</w>"):
            words.append([])
    return [word for word in words if word]


@dataclass(frozen=True)
class PromptLayout:
    """A full text-encoder context (start, tokens, end, padding) with the adversarial tokens' positions."""

    ids: torch.Tensor
    """(1, context) token ids; the slots hold padding until ``with_tokens`` fills them."""
    slots: torch.Tensor
    """(n,) positions of the adversarial tokens in ``ids``."""
    length: int
    """Tokens between the start and end tokens."""

    @classmethod
    def build(
        cls, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, sequence: list[int | None], attack: str, fix: str
    ) -> PromptLayout:
        """``sequence`` lists prompt token ids and ``None`` for each adversarial slot, in order."""
        room = context_length(tokenizer, text_encoder) - 2
        if len(sequence) > room:
            raise AttackError(
                f"attack '{attack}': the adversarial prompt needs {len(sequence)} tokens, more than the {room} "
                f"the text encoder reads; {fix}"
            )
        pad = tokenizer.pad_token_id
        body = [pad if token is None else token for token in sequence]
        ids = [tokenizer.bos_token_id, *body, tokenizer.eos_token_id] + [pad] * (room - len(sequence))
        slots = [position + 1 for position, token in enumerate(sequence) if token is None]
        return cls(torch.tensor([ids]), torch.tensor(slots), len(sequence))

    def with_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The context with ``tokens`` (vocabulary ids, one per slot) in the slots."""
        ids = self.ids.clone()
        ids[0, self.slots] = tokens.to(ids.device)
        return ids

    def text(self, tokenizer: CLIPTokenizer, tokens: torch.Tensor) -> str:
        """The adversarial prompt as text, as the cache stores it and a replay reads it."""
        return decode(tokenizer, self.with_tokens(tokens)[0, 1 : 1 + self.length])

    def encode(self, text_encoder: CLIPTextModel, values: torch.Tensor) -> torch.Tensor:
        """Hidden states with ``values`` (one embedding per slot) as the slots' input embeddings, differentiably."""
        with soft_tokens(text_encoder, self.slots, values):
            return text_encoder(self.ids.to(text_encoder.device))[0]

    @torch.no_grad()
    def encode_tokens(self, text_encoder: CLIPTextModel, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states with vocabulary ``tokens`` in the slots, as the decoded text gives them."""
        return text_encoder(self.with_tokens(tokens).to(text_encoder.device))[0]


@contextmanager
def adapters_off(unet: UNet2DConditionModel) -> Iterator[UNet2DConditionModel]:
    """The unaligned model: the same UNet with its LoRA switched off for the duration."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


@torch.no_grad()
def render_latents(
    components: DiffusionComponents, prompt: str, generator: torch.Generator, steps: int, guidance_scale: float
) -> torch.Tensor:
    """Latents (1, C, h, w) of ``prompt`` rendered by ``components.unet`` as it is now (the caller switches
    adapters off for the unaligned model), with DDIM on the model's noise schedule and ``generator``'s noise.

    The attacks noise these latents, not a VAE re-encoding of the decoded image: the same image, without a
    decode/encode round trip that only adds the VAE's reconstruction error.
    """
    pipe = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=DDIMScheduler.from_config(components.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator, output_type="latent").images


@dataclass(frozen=True)
class NoisedLatents:
    """Latents noised to random timesteps: the UNet's inputs and the noise it should predict."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor

    @classmethod
    def draw(cls, components: DiffusionComponents, latents: torch.Tensor, count: int, generator: torch.Generator) -> NoisedLatents:
        """``count`` (timestep, noise) draws from ``generator`` applied to ``latents`` (1, C, h, w)."""
        schedule = components.noise_scheduler
        steps = torch.randint(0, schedule.config.num_train_timesteps, (count,), generator=generator, device=generator.device)
        noise = torch.randn((count, *latents.shape[1:]), generator=generator, device=generator.device)
        noise = noise.to(latents.device, latents.dtype)
        steps = steps.to(latents.device)
        return cls(schedule.add_noise(latents.expand_as(noise), noise, steps), steps, noise)

    def predict(self, unet: UNet2DConditionModel, states: torch.Tensor) -> torch.Tensor:
        """The UNet's noise prediction for every draw, conditioned on text hidden states (1, tokens, width)."""
        return unet(self.noisy, self.timesteps, encoder_hidden_states=states.expand(len(self.noisy), -1, -1)).sample


def mse(prediction: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32, whatever the model's dtype (fp16 squares of small errors underflow)."""
    return F.mse_loss(prediction.float(), wanted.float())


#: One random start of a token search: the tokens it starts from, and a step that optimises and returns the new tokens.
Start = tuple[torch.Tensor, Callable[[], torch.Tensor]]


def search_tokens(
    restarts: int, iterations: int, begin: Callable[[], Start], score: Callable[[torch.Tensor], float]
) -> tuple[torch.Tensor, list[float]]:
    """The lowest-scoring tokens seen over ``restarts`` runs of ``iterations`` steps, and that run's history.

    ``history[0]`` scores the run's starting tokens and ``history[i]`` its tokens after step ``i``, so a
    history shows what the optimisation gained; the best tokens are kept, as the papers keep their best
    prompt, since a projected step can make the discrete prompt worse.
    """
    best: tuple[float, torch.Tensor, list[float]] | None = None
    for _ in range(restarts):
        tokens, step = begin()
        history: list[float] = []
        for index in range(iterations + 1):
            tokens = step() if index else tokens
            history.append(score(tokens))
            if best is None or history[-1] < best[0]:
                best = (history[-1], tokens, history)
    if best is None:
        raise AttackError("token search: restarts must be >= 1")
    return best[1], best[2]


def outcome(
    components: DiffusionComponents, layout: PromptLayout, tokens: torch.Tensor, history: list[float],
    score: Callable[[torch.Tensor], float],
) -> AttackOutcome:
    """The found prompt as text, with its objective scored on the hidden states of that text re-tokenised
    (what a cached replay feeds the model), not on the optimised ids."""
    text = layout.text(components.tokenizer, tokens)
    with torch.no_grad():
        states = prompt_embedding(components.tokenizer, components.text_encoder, [text])
    return AttackOutcome(text, score(states), history, higher_is_better=False)


def word_table(target: AttackTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole-word vocabulary ids the white-box attacks place, and their input embeddings in float32."""
    words_only = vocabulary(target.components.tokenizer).to(target.device)
    return words_only, target.components.text_encoder.get_input_embeddings().weight.detach()[words_only].float()


@dataclass
class WhiteBoxAttack(Attack):
    """The budget and checks of an attack that optimises soft tokens through the aligned UNet (P4D, UnlearnDiffAtk).

    Both take ``iterations`` gradient steps per restart on ``timesteps`` noised copies of a reference render
    and score every iteration on as many fixed draws, so their budgets are the same options, checked the same
    way before any work; each subclass keeps only its own defaults, layout and step.
    """

    needs: ClassVar[frozenset[str]] = frozenset({"text_encoder", "unet"})

    tokens: int = 8
    """Adversarial tokens (the subclass says where they go and the paper's number)."""
    iterations: int = 40
    """Optimisation steps per restart (P4D's paper: 3000; UnlearnDiffAtk's: 40 per timestep for 50 timesteps, 2000 in all)."""
    restarts: int = 1
    """Independent random starts; the prompt with the lowest objective over all of them wins (both papers: 1)."""
    lr: float = 0.1
    """Learning rate of the optimiser on the soft tokens (the subclass gives its paper's)."""
    weight_decay: float = 0.1
    """Weight decay of the optimiser on the soft tokens (both papers: 0.1)."""
    timesteps: int = 2
    """Fresh (timestep, noise) draws per step; as many fixed draws score every iteration (both papers: 1 per step)."""
    render_steps: int = 20
    """DDIM steps of the unaligned model's reference render (P4D: 25; UnlearnDiffAtk renders its images beforehand)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance of the reference render (both papers: 7.5)."""
    seed: int = 0
    """Seed of the generator the attack draws from (initial tokens, render noise, timesteps)."""

    def positive_options(self) -> dict[str, float]:
        """The options that must be positive; a subclass adds its own."""
        return dict(
            tokens=self.tokens, iterations=self.iterations, restarts=self.restarts, lr=self.lr,
            timesteps=self.timesteps, render_steps=self.render_steps,
        )

    def __post_init__(self) -> None:
        check_budget(
            self.registry_name, self.positive_options(), dict(weight_decay=self.weight_decay, guidance_scale=self.guidance_scale)
        )

    def check(self, target: AttackTarget) -> None:
        """Refuse a target without the parts this attack needs, or one it cannot differentiate through."""
        super().check(target)
        check_sd_model(self.registry_name, target)

    def search(
        self, target: AttackTarget, layout: PromptLayout, begin: Callable[[], Start], objective: Callable[[torch.Tensor], float]
    ) -> AttackOutcome:
        """The best prompt over the restarts (``objective`` scores hidden states), written as text and scored as a replay reads it."""
        text_encoder = target.components.text_encoder
        tokens, history = search_tokens(
            self.restarts, self.iterations, begin, lambda tokens: objective(layout.encode_tokens(text_encoder, tokens))
        )
        return outcome(target.components, layout, tokens, history, objective)
