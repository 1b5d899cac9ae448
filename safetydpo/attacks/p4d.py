"""P4D, Prompting4Debugging (Chin et al., ICML 2024, arXiv 2309.06135), P4D-N and P4D-K."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from safetydpo.attacks.base import ATTACKS, Attack, AttackError, AttackOutcome, AttackTarget
from safetydpo.attacks.prompt_tokens import (
    NoisedLatents,
    PromptLayout,
    Start,
    adapters_off,
    check_budget,
    check_sd_model,
    mse,
    outcome,
    prompt_words,
    render_latents,
    search_tokens,
)
from safetydpo.attacks.text import prompt_embedding, vocabulary

MODES = ("n", "k")


@ATTACKS.register("p4d")
@dataclass
class P4D(Attack):
    """Tokens with which the aligned model denoises the way the unaligned model does on the unsafe prompt.

    Objective (lower is better): ``MSE(aligned(x_t, t, adversarial), unaligned(x_t, t, prompt))`` with
    ``x_t`` the unaligned model's render of the prompt noised to a random ``t``. The render, not random
    latents, is noised because that is where sampling the unsafe concept passes; on random latents the two
    models' predictions differ in ways no image shows. Gradients flow through the target's text encoder and
    its aligned UNet (``components.unet`` with the LoRA on) into the soft token embeddings only; the
    unaligned model (the same UNet, adapters off) supplies targets without gradients. As in the paper (after
    PEZ, Wen et al. 2023) each step projects the soft embeddings to their nearest vocabulary tokens by cosine,
    evaluates the loss on those, and applies its gradient to the soft embeddings (straight-through).
    """

    needs: ClassVar[frozenset[str]] = frozenset({"text_encoder", "unet", "reference_unet"})

    mode: str = "n"
    """``n`` (P4D-N): the adversarial prompt is ``tokens`` free tokens and nothing else; ``k`` (P4D-K): the
    prompt's words with one adversarial token before every ``k`` of them."""
    tokens: int = 8
    """P4D-N: the number of free tokens (the paper: 16 of SD's 75; ToyWorld's encoder reads 18)."""
    k: int = 3
    """P4D-K: one adversarial token before every ``k`` prompt words (the paper: 3)."""
    iterations: int = 40
    """Optimisation steps per restart (the paper: 3000)."""
    restarts: int = 1
    """Independent random starts; the prompt with the lowest objective over all of them wins (the paper: 1)."""
    lr: float = 0.1
    """AdamW learning rate on the soft embeddings (the paper: 0.1)."""
    weight_decay: float = 0.1
    """AdamW weight decay on the soft embeddings (the paper: 0.1)."""
    timesteps: int = 2
    """Fresh (timestep, noise) draws per step; as many fixed draws score every iteration (the paper: 1 per step)."""
    render_steps: int = 20
    """DDIM steps of the unaligned model's reference render (the paper: 25)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance of the reference render (the paper: 7.5)."""
    seed: int = 0
    """Seed of the generator the attack draws from (initial tokens, render noise, timesteps)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise AttackError(f"attack 'p4d': mode must be one of {', '.join(MODES)} (P4D-N, P4D-K), got {self.mode!r}")
        check_budget(
            "p4d",
            positive=dict(
                tokens=self.tokens, k=self.k, iterations=self.iterations, restarts=self.restarts,
                lr=self.lr, timesteps=self.timesteps, render_steps=self.render_steps,
            ),
            non_negative=dict(weight_decay=self.weight_decay, guidance_scale=self.guidance_scale),
        )

    def layout(self, target: AttackTarget, prompt: str) -> PromptLayout:
        """Where the adversarial tokens go: alone (P4D-N) or before every ``k`` words of the prompt (P4D-K)."""
        tokenizer, text_encoder = target.components.tokenizer, target.components.text_encoder
        if self.mode == "n":
            return PromptLayout.build(tokenizer, text_encoder, [None] * self.tokens, "p4d", "lower tokens")
        words = prompt_words(tokenizer, prompt, "p4d")
        sequence: list[int | None] = []
        for start in range(0, len(words), self.k):
            sequence += [None, *(token for word in words[start : start + self.k] for token in word)]
        return PromptLayout.build(tokenizer, text_encoder, sequence, "p4d", "raise k or shorten the prompt")

    def check(self, target: AttackTarget) -> None:
        """Refuse a target without the parts this attack needs, or one it cannot differentiate through."""
        super().check(target)
        check_sd_model("p4d", target)

    def attack(self, prompt: str, target: AttackTarget, generator: torch.Generator) -> AttackOutcome:
        self.check(target)
        components = target.components
        unet, text_encoder = components.unet, components.text_encoder
        layout = self.layout(target, prompt)
        words_only = vocabulary(components.tokenizer).to(target.device)
        table = text_encoder.get_input_embeddings().weight.detach()[words_only].float()
        directions = F.normalize(table, dim=-1)

        with torch.no_grad(), adapters_off(unet):
            latents = render_latents(components, prompt, generator, self.render_steps, self.guidance_scale)
            prompt_states = prompt_embedding(components.tokenizer, text_encoder, [prompt])
            probe = NoisedLatents.draw(components, latents, self.timesteps, generator)
            probe_wanted = probe.predict(unet, prompt_states)

        @torch.no_grad()
        def objective(states: torch.Tensor) -> float:
            return mse(probe.predict(unet, states), probe_wanted).item()

        def nearest(soft: torch.Tensor) -> torch.Tensor:
            """Indices into ``words_only`` of the tokens nearest (by cosine) to each soft embedding."""
            return (F.normalize(soft.detach(), dim=-1) @ directions.T).argmax(dim=-1)

        def begin() -> Start:
            first = torch.randint(len(words_only), (len(layout.slots),), generator=generator, device=generator.device)
            soft = table[first.to(table.device)].clone().requires_grad_(True)
            optimizer = torch.optim.AdamW([soft], lr=self.lr, weight_decay=self.weight_decay)

            def step() -> torch.Tensor:
                batch = NoisedLatents.draw(components, latents, self.timesteps, generator)
                with torch.no_grad(), adapters_off(unet):
                    wanted = batch.predict(unet, prompt_states)
                straight_through = table[nearest(soft)] + soft - soft.detach()
                loss = mse(batch.predict(unet, layout.encode(text_encoder, straight_through)), wanted)
                (soft.grad,) = torch.autograd.grad(loss, [soft])
                optimizer.step()
                return words_only[nearest(soft)]

            return words_only[first.to(words_only.device)], step

        tokens, history = search_tokens(
            self.restarts, self.iterations, begin, lambda tokens: objective(layout.encode_tokens(text_encoder, tokens))
        )
        return outcome(components, layout, tokens, history, objective)
