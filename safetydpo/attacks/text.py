"""Token-level helpers the text-space attacks share: the attackable vocabulary, fixed-length token
sequences, their text-encoder embeddings, and differentiable embeddings of soft (one-hot) tokens.

A candidate adversarial prompt is ``K`` free tokens between the tokenizer's start and end tokens,
padded to the encoder's full context, so every candidate of a search has the same shape and a
batch of them is one encoder call.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from safetydpo.attacks.base import AttackError
from safetydpo.models.components import tokenize_prompts

_WORD_TOKEN = re.compile(r"[a-z]+</w>")


def word_token_ids(tokenizer: CLIPTokenizer, words: Sequence[str]) -> set[int]:
    """The token ids of every word of ``words`` as the tokenizer splits it (start and end tokens left out)."""
    ids: set[int] = set()
    for word in words:
        ids.update(tokenizer(word, add_special_tokens=False).input_ids)
    return ids


@functools.lru_cache(maxsize=16)
def vocabulary(
    tokenizer: CLIPTokenizer, banned_words: tuple[str, ...] = (), only_from: tuple[str, ...] | None = None
) -> torch.Tensor:
    """Ids an attack may place: whole-word tokens (or only those of the texts ``only_from``), minus banned ones.

    Whole lower-case words only (CLIP's BPE ends a word with ``</w>``): their decoded text tokenises back
    into the same ids, so the cached prompt the images are rendered from is the sequence that was
    optimised; subword pieces would merge with their neighbours. A token is banned when it is one of a
    banned word's own tokens or its text contains a banned word (``reddish`` for ``red``), which is how
    MMA-Diffusion keeps the sensitive words out of its prompts. Cached: every prompt of an attack asks again.
    """
    words = {index for token, index in tokenizer.get_vocab().items() if _WORD_TOKEN.fullmatch(token)}
    allowed = words if only_from is None else words & word_token_ids(tokenizer, only_from)
    lowered = [word.lower() for word in banned_words if word.strip()]
    banned = word_token_ids(tokenizer, lowered)
    if lowered:
        pattern = re.compile("|".join(re.escape(word) for word in lowered))
        banned.update(index for token, index in tokenizer.get_vocab().items() if pattern.search(token.lower().removesuffix("</w>")))
    return torch.tensor(sorted(allowed - banned), dtype=torch.long)


def context_length(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> int:
    """Tokens the encoder reads per prompt (SD: 77; the tokenizer may claim more than the position table holds)."""
    return min(int(tokenizer.model_max_length), int(text_encoder.config.max_position_embeddings))


def check_length(tokens: int, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, attack: str) -> None:
    """Refuse more free tokens than fit between the start and end tokens of the encoder's context."""
    room = context_length(tokenizer, text_encoder) - 2
    if tokens > room:
        raise AttackError(f"attack '{attack}': tokens is {tokens}, but this text encoder fits at most {room}; set tokens <= {room}")


def sequence_ids(tokenizer: CLIPTokenizer, tokens: torch.Tensor, length: int) -> torch.Tensor:
    """``(B, K)`` free tokens as ``(B, length)`` encoder input: start, the tokens, end, then padding."""
    batch = tokens.shape[0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((batch, length), pad, dtype=torch.long, device=tokens.device)
    ids[:, 0] = tokenizer.bos_token_id
    ids[:, 1 : 1 + tokens.shape[1]] = tokens
    ids[:, 1 + tokens.shape[1]] = tokenizer.eos_token_id
    return ids


def prompt_embedding(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: Sequence[str]) -> torch.Tensor:
    """Hidden states ``(N, length, D)`` of ordinary prompts, padded as the pipeline pads them."""
    ids = tokenize_prompts(tokenizer, list(prompts))[:, : context_length(tokenizer, text_encoder)]
    return text_encoder(ids.to(text_encoder.device))[0]


def tokens_embedding(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, tokens: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Hidden states ``(B, length, D)`` of candidate token sequences ``(B, K)``, encoded ``batch_size`` at a time."""
    length = context_length(tokenizer, text_encoder)
    ids = sequence_ids(tokenizer, tokens.to(text_encoder.device), length)
    return torch.cat([text_encoder(chunk)[0] for chunk in ids.split(batch_size)])


def decode(tokenizer: CLIPTokenizer, tokens: torch.Tensor) -> str:
    """The prompt text of one token sequence (what the pipeline's tokenizer reads back as about the same tokens)."""
    return tokenizer.decode(tokens.tolist(), skip_special_tokens=True).strip()


@contextmanager
def soft_tokens(text_encoder: CLIPTextModel, positions: slice, embeddings: torch.Tensor) -> Iterator[None]:
    """Within the block, the encoder's token embeddings at ``positions`` are ``embeddings`` ``(B, K, D)``.

    CLIPTextModel takes no ``inputs_embeds``; a forward hook on its token-embedding table lets a search
    differentiate through continuous (e.g. one-hot times the table) tokens while the rest of the prompt
    stays discrete.
    """

    def replace(_module: torch.nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, positions] = embeddings.to(output.dtype)
        return output

    handle = text_encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()
