"""UnlearnDiffAtk (Zhang et al., ECCV 2024, arXiv 2310.11868): the aligned model as its own classifier."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from safetydpo.attacks.base import ATTACKS, AttackOutcome, AttackTarget
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


def project_to_simplex(weights: torch.Tensor) -> torch.Tensor:
    """Each row's Euclidean projection onto the probability simplex (Duchi et al., 2008: sort, one threshold).

    The paper projects by bisection per row; the sort gives the same point in one vectorised pass.
    """
    ordered, _ = torch.sort(weights, dim=-1, descending=True)
    excess = ordered.cumsum(dim=-1) - 1
    ranks = torch.arange(1, weights.shape[-1] + 1, device=weights.device, dtype=weights.dtype)
    support = (ordered - excess / ranks > 0).sum(dim=-1, keepdim=True)
    threshold = excess.gather(-1, support - 1) / support
    return (weights - threshold).clamp_min(0)


@ATTACKS.register("unlearndiffatk")
@dataclass
class UnlearnDiffAtk(WhiteBoxAttack):
    """Prefix tokens with which the aligned model best denoises an image of the unsafe prompt.

    A diffusion model's denoising error on an image given a text is its (negative) log-likelihood of the
    pair, so a prefix that lowers the aligned model's error on an unsafe render makes the aligned model
    "classify" that image as its prompt; no classifier or second model is differentiated. Objective (lower
    is better): ``MSE(aligned(x_t, t, prefix + prompt), noise)`` with ``x_t`` the reference latents noised to
    a random ``t``; the reference is the unaligned model's render of the prompt (the target's UNet with
    adapters off) or, for a target without a LoRA, its own render. Gradients flow through the text
    encoder and the aligned UNet (``components.unet`` as handed in) into one weight vector over the
    vocabulary per prefix token only. As the paper does, the weights live on the probability simplex
    (projected after each Adam step); each step samples one token per slot from them and passes the
    gradient straight through the one-hot choice. The answer is each slot's most likely token.
    """

    tokens: int = 5
    """Adversarial tokens prepended to the prompt (the paper: 5)."""
    lr: float = 0.01
    """Adam learning rate on the vocabulary weights (the paper: 0.01)."""

    def attack(self, prompt: str, target: AttackTarget, generator: torch.Generator) -> AttackOutcome:
        self.check(target)
        components = target.components
        unet, text_encoder = components.unet, components.text_encoder
        words = prompt_words(components.tokenizer, prompt, "unlearndiffatk")
        sequence: list[int | None] = [None] * self.tokens + [token for word in words for token in word]
        layout = PromptLayout.build(components.tokenizer, text_encoder, sequence, "unlearndiffatk", "lower tokens or shorten the prompt")
        words_only, table = word_table(target)

        with torch.no_grad(), adapters_off(unet) if target.has_reference else nullcontext():
            latents = render_latents(components, prompt, generator, self.render_steps, self.guidance_scale)
        probe = NoisedLatents.draw(components, latents, self.timesteps, generator)

        @torch.no_grad()
        def objective(states: torch.Tensor) -> float:
            return mse(probe.predict(unet, states), probe.noise).item()

        def begin() -> Start:
            first = torch.rand((self.tokens, len(words_only)), generator=generator, device=generator.device)
            weights = project_to_simplex(first.to(table.device)).requires_grad_(True)
            optimizer = torch.optim.Adam([weights], lr=self.lr, weight_decay=self.weight_decay)

            def step() -> torch.Tensor:
                sampled = torch.multinomial(weights.detach().to(generator.device), 1, generator=generator).squeeze(1)
                one_hot = F.one_hot(sampled.to(table.device), len(words_only)).to(table.dtype)
                batch = NoisedLatents.draw(components, latents, self.timesteps, generator)
                values = (one_hot + weights - weights.detach()) @ table
                loss = mse(batch.predict(unet, layout.encode(text_encoder, values)), batch.noise)
                (weights.grad,) = torch.autograd.grad(loss, [weights])
                optimizer.step()
                with torch.no_grad():
                    weights.copy_(project_to_simplex(weights))
                return words_only[weights.detach().argmax(dim=-1)]

            return words_only[weights.detach().argmax(dim=-1)], step

        return self.search(target, layout, begin, objective)
