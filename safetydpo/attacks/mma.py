"""MMA-Diffusion, text modality (Yang et al., "MMA-Diffusion: MultiModal Attack on Diffusion Models", CVPR 2024).

The adversarial prompt is ``tokens`` free tokens, none of them a sensitive word, whose text embedding
points the way the unsafe prompt's does: greedy coordinate-gradient (GCG) search maximising the
cosine similarity of the two embeddings (the encoder's hidden states the UNet is conditioned on,
flattened). Each step takes the gradient of the similarity with respect to a one-hot encoding of
the tokens, keeps each position's ``top_k`` most promising vocabulary tokens, evaluates ``candidates``
single-token substitutions drawn from them and keeps the best. It differentiates through the text
encoder only, so it attacks any model that shares the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from safetydpo.attacks.base import ATTACKS, Attack, AttackError, AttackOutcome, AttackTarget
from safetydpo.attacks.text import check_length, context_length, decode, prompt_embedding, sequence_ids, soft_tokens, tokens_embedding, vocabulary

#: MMA-Diffusion's sensitive-word list for nudity (its released text attack bans these from the search).
NSFW_WORDS: tuple[str, ...] = (
    "sexual", "nude", "nudity", "sex", "18+", "naked", "nsfw", "porn", "dick", "vagina", "naked child",
    "explicit content", "uncensored", "fuck", "nipples", "visible nipples", "breast", "areola",
)


@ATTACKS.register("mma")
@dataclass
class MMADiffusion(Attack):
    """GCG token substitution maximising cos(embedding(adversarial), embedding(prompt)) without the sensitive words."""

    tokens: int = 16
    """Length of the adversarial token sequence (the paper: 20; at most the encoder's context minus 2)."""
    iterations: int = 40
    """GCG steps (the paper runs about a thousand on SD)."""
    top_k: int = 32
    """Candidate tokens kept per position from the gradient (the paper: 256)."""
    candidates: int = 64
    """Single-token substitutions evaluated per step (the paper: 512)."""
    banned_words: list[str] = field(default_factory=lambda: list(NSFW_WORDS))
    """Sensitive words kept out of the adversarial prompt (with every token containing one); default: MMA's nudity list."""
    restarts: int = 1
    """Independent searches from fresh random tokens; the most similar result is kept."""
    seed: int = 0
    """Seeds the search (each prompt's generator derives from it)."""

    def __post_init__(self) -> None:
        for name in ("tokens", "iterations", "top_k", "candidates", "restarts"):
            if getattr(self, name) < 1:
                raise AttackError(f"attack 'mma': {name} must be >= 1, got {getattr(self, name)}")

    def attack(self, prompt: str, target: AttackTarget, generator: torch.Generator) -> AttackOutcome:
        tokenizer, encoder = target.components.tokenizer, target.components.text_encoder
        check_length(self.tokens, tokenizer, encoder, "mma")
        allowed = vocabulary(tokenizer, tuple(self.banned_words))
        if allowed.numel() == 0:
            raise AttackError("attack 'mma': banned_words leave no token to search over; ban fewer words")
        with torch.no_grad():
            goal = prompt_embedding(tokenizer, encoder, [prompt])[0].flatten().float()
        runs = [self._search(goal, allowed, target, generator) for _ in range(self.restarts)]
        tokens, history = max(runs, key=lambda run: run[1][-1])
        return AttackOutcome(decode(tokenizer, tokens), history[-1], history, higher_is_better=True)

    def _search(
        self, goal: torch.Tensor, allowed: torch.Tensor, target: AttackTarget, generator: torch.Generator
    ) -> tuple[torch.Tensor, list[float]]:
        """One GCG run from random tokens: the best sequence and the best similarity after every step."""
        tokenizer, encoder = target.components.tokenizer, target.components.text_encoder
        table = encoder.get_input_embeddings().weight
        banned = torch.ones(table.shape[0], dtype=torch.bool)
        banned[allowed] = False
        length = context_length(tokenizer, encoder)

        def similarity(batch: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return F.cosine_similarity(tokens_embedding(tokenizer, encoder, batch).flatten(1).float(), goal[None]).cpu()

        current = allowed[torch.randint(0, allowed.numel(), (self.tokens,), generator=generator)]
        best, best_score = current, float(similarity(current[None])[0])
        history = [best_score]
        for _ in range(self.iterations):
            one_hot = F.one_hot(current, table.shape[0]).to(table.device, table.dtype).requires_grad_(True)
            ids = sequence_ids(tokenizer, current[None].to(table.device), length)
            with soft_tokens(encoder, slice(1, 1 + self.tokens), (one_hot @ table)[None]):
                embedding = encoder(ids)[0].flatten().float()
            (gradient,) = torch.autograd.grad(F.cosine_similarity(embedding, goal, dim=0), one_hot)
            gradient = gradient.float().cpu()
            gradient[:, banned] = -torch.inf
            top = gradient.topk(min(self.top_k, allowed.numel()), dim=1).indices
            positions = torch.randint(0, self.tokens, (self.candidates,), generator=generator)
            picks = top[positions, torch.randint(0, top.shape[1], (self.candidates,), generator=generator)]
            batch = current.repeat(self.candidates, 1)
            batch[torch.arange(self.candidates), positions] = picks
            scores = similarity(batch)
            current = batch[scores.argmax()]  # GCG moves to the best candidate even when it is worse
            if float(scores.max()) > best_score:
                best, best_score = current, float(scores.max())
            history.append(best_score)
        return best, history
