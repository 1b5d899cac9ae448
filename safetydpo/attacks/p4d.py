"""P4D, Prompting4Debugging (Chin et al., ICML 2024, arXiv 2309.06135), P4D-N and P4D-K."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from safetydpo.attacks.base import ATTACKS, AttackError, AttackOutcome, AttackTarget
from safetydpo.attacks.prompt_tokens import (
    NoisedLatents,
    PromptLayout,
    Start,
    WhiteBoxAttack,
    adapters_off,
    mse,
    prompt_words,
    render_latents,
    word_table,
)
from safetydpo.attacks.text import prompt_embedding

MODES = ("n", "k")


@ATTACKS.register("p4d")
@dataclass
class P4D(WhiteBoxAttack):
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
    lr: float = 0.1
    """AdamW learning rate on the soft embeddings (the paper: 0.1)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise AttackError(f"attack 'p4d': mode must be one of {', '.join(MODES)} (P4D-N, P4D-K), got {self.mode!r}")
        super().__post_init__()

    def positive_options(self) -> dict[str, float]:
        return {**super().positive_options(), "k": self.k}

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

    def attack(self, prompt: str, target: AttackTarget, generator: torch.Generator) -> AttackOutcome:
        self.check(target)
        components = target.components
        unet, text_encoder = components.unet, components.text_encoder
        layout = self.layout(target, prompt)
        words_only, table = word_table(target)
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

        return self.search(target, layout, begin, objective)
