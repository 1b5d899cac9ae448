"""Streaming activation statistics of every expert's LoRA directions, in one UNet pass per batch.

For an adapted layer with input ``x`` and expert ``e`` (factors ``A_e``, ``B_e``), rank direction
``r`` adds ``B_e[:, r] * (A_e[r] . x)`` to the layer output. Its activity is the mean over all
inputs and positions of ``|A_e[r] . x| * ||B_e[:, r]||``, the magnitude of what that direction
writes into the layer output. All experts are evaluated on the same input ``x`` taken from the
base UNet's forward pass (a "stacked" pass): one UNet forward per batch serves every expert, and
memory holds only running sums, so it is independent of the number of inputs. The base pass is a
first-order choice: upstream experts do not shift a layer's input, which keeps the experts'
scores comparable on identical inputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from safetydpo.lora_files import LoraExpert


@dataclass
class ActivationStats:
    """Mean activity per layer, shape ``(num_experts, rank)``, over ``num_inputs`` UNet inputs."""

    scores: dict[str, Tensor]
    num_inputs: int


class _LayerProbe:
    """Forward hook that accumulates the activity of every expert's rank directions at one layer."""

    def __init__(self, module: torch.nn.Module, experts: list[LoraExpert], name: str) -> None:
        # A UNet with a peft adapter attached (a training run's) wraps each layer; its input is the base layer's.
        module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        self.module = module
        downs = [expert.layers[name].down for expert in experts]
        ups = [expert.layers[name].up for expert in experts]
        self.rank = downs[0].shape[0]
        weight = next(module.parameters())
        self.stacked_down = torch.cat(downs).to(weight.device, weight.dtype)
        self.up_norms = torch.stack([up.flatten(2).norm(dim=(0, 2)) if up.dim() > 2 else up.norm(dim=0) for up in ups]).to(weight.device)
        self.total = torch.zeros(len(experts), self.rank, device=weight.device, dtype=torch.float64)
        self.count = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module: torch.nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0]
        if isinstance(module, torch.nn.Conv2d):
            projected = F.conv2d(x, self.stacked_down, None, module.stride, module.padding, module.dilation)
            projected = projected.movedim(1, -1)
        else:
            projected = x @ self.stacked_down.T
        flat = projected.reshape(-1, projected.shape[-1]).abs().double()
        self.total += flat.sum(0).view(-1, self.rank) * self.up_norms.double()
        self.count += flat.shape[0]

    def mean(self) -> Tensor:
        return (self.total / max(self.count, 1)).float().cpu()


@torch.no_grad()
def collect_activations(
    unet: torch.nn.Module,
    experts: list[LoraExpert],
    inputs: Iterable[tuple[Tensor, Tensor, Tensor]],
) -> ActivationStats:
    """Run ``unet`` over ``(noisy_latents, timesteps, text_embeds)`` batches; any adapter on it must be disabled."""
    layer_names = list(experts[0].layers)
    missing = [name for name in layer_names if name not in dict(unet.named_modules())]
    if missing:
        raise ValueError(f"expert layer {missing[0]} does not exist in this UNet; the experts belong to another base model")
    probes = {name: _LayerProbe(unet.get_submodule(name), experts, name) for name in layer_names}
    num_inputs = 0
    try:
        for latents, timesteps, embeds in inputs:
            unet(latents, timesteps, encoder_hidden_states=embeds)
            num_inputs += latents.shape[0]
    finally:
        for probe in probes.values():
            probe.handle.remove()
    if num_inputs == 0:
        raise ValueError("no inputs were given for activation statistics")
    return ActivationStats(scores={name: probe.mean() for name, probe in probes.items()}, num_inputs=num_inputs)
