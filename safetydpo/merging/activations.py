"""Streaming activation statistics of every expert's LoRA directions, in one UNet pass per batch.

For an adapted layer with input ``x`` and expert ``e`` (factors ``A_e``, ``B_e``), rank direction
``r`` adds ``B_e[:, r] * (A_e[r] . x)`` to the layer output. Its activity is the mean over all
inputs and positions of ``|A_e[r] . x| * ||B_e[:, r]||``, the magnitude of what that direction
writes into the layer output. All experts are evaluated on the same input ``x`` taken from the
base UNet's forward pass (a "stacked" pass): one UNet forward per batch serves every expert, and
memory holds only running sums, so it is independent of the number of inputs. The base pass is a
first-order choice: upstream experts do not shift a layer's input, which keeps the experts'
scores comparable on identical inputs.

The per-weight statistic of ``comerge_weight`` needs the opposite: on a shared input, the
activity ``|delta W_e[o, i] * x_i|`` of a weight ranks experts by ``|delta W_e[o, i]|`` alone. So
``collect_input_magnitudes`` runs one pass per expert, with that expert alone added to the base
UNet by forward hooks, and records the mean ``|x_i|`` of every input feature each expert's own
model feeds each adapted layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from safetydpo.lora_files import LoraExpert


@dataclass
class ActivationStats:
    """Per-layer statistics over ``num_inputs`` UNet inputs: ``(num_experts, rank)`` direction activity from
    ``collect_activations``, ``(num_experts, in_features)`` mean input magnitudes from ``collect_input_magnitudes``."""

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


class _InputProbe:
    """Forward hook that adds the active expert's LoRA output to one layer and accumulates mean ``|x_i|`` of its input."""

    def __init__(self, module: torch.nn.Module, experts: list[LoraExpert], name: str) -> None:
        module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        self.module = module
        weight = next(module.parameters())
        self.factors = [(e.layers[name].down.to(weight.device, weight.dtype), e.layers[name].up.to(weight.device, weight.dtype)) for e in experts]
        features = self.factors[0][0].flatten(1).shape[1]
        self.total = torch.zeros(len(experts), features, device=weight.device, dtype=torch.float64)
        self.count = torch.zeros(len(experts), 1, device=weight.device, dtype=torch.float64)
        self.active = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module: torch.nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = inputs[0]
        down, up = self.factors[self.active]
        if isinstance(module, torch.nn.Conv2d):  # peft's conv LoRA: down has the layer's kernel, up is 1x1
            features = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
            added = F.conv2d(F.conv2d(x, down, None, module.stride, module.padding, module.dilation), up)
        else:
            features = x
            added = x @ down.T @ up.T
        flat = features.reshape(-1, features.shape[-1]).abs().double()
        self.total[self.active] += flat.sum(0)
        self.count[self.active] += flat.shape[0]
        return output + added

    def mean(self) -> Tensor:
        return (self.total / self.count.clamp(min=1)).float().cpu()


#: One batch of network inputs: noisy latents, timesteps, and the text embeddings (a UNet's ``encoder_hidden_states``)
#: or every conditioning keyword the network takes (SDXL's ``added_cond_kwargs``, SD3's ``pooled_projections``).
NetworkInputs = tuple[Tensor, Tensor, Tensor | Mapping[str, Any]]


def _run_probes(
    unet: torch.nn.Module,
    experts: list[LoraExpert],
    inputs: Iterable[NetworkInputs],
    probe: Callable[[torch.nn.Module, list[LoraExpert], str], _LayerProbe | _InputProbe],
    passes: int,
) -> ActivationStats:
    """Hook ``probe`` on every adapted layer and run ``unet`` ``passes`` times per batch (pass ``k`` sets ``active = k``)."""
    layer_names = list(experts[0].layers)
    modules = dict(unet.named_modules())
    missing = [name for name in layer_names if name not in modules]
    if missing:
        raise ValueError(f"expert layer {missing[0]} does not exist in this UNet; the experts belong to another base model")
    probes = {name: probe(modules[name], experts, name) for name in layer_names}
    num_inputs = 0
    try:
        for latents, timesteps, conditioning in inputs:
            for active in range(passes):
                for hook in probes.values():
                    if isinstance(hook, _InputProbe):
                        hook.active = active
                if isinstance(conditioning, Mapping):  # keywords for any network (SD3's takes timestep as a keyword)
                    unet(latents, timestep=timesteps, **conditioning)
                else:
                    unet(latents, timesteps, encoder_hidden_states=conditioning)
            num_inputs += latents.shape[0]
    finally:
        for hook in probes.values():
            hook.handle.remove()
    if num_inputs == 0:
        raise ValueError("no inputs were given for activation statistics")
    return ActivationStats(scores={name: hook.mean() for name, hook in probes.items()}, num_inputs=num_inputs)


@torch.no_grad()
def collect_activations(
    unet: torch.nn.Module,
    experts: list[LoraExpert],
    inputs: Iterable[NetworkInputs],
) -> ActivationStats:
    """Direction activity of every expert in one pass of the base ``unet`` per batch; any adapter on it must be disabled.

    ``inputs`` are ``(noisy_latents, timesteps, text_embeds or conditioning keywords)`` batches; ``unet`` is the
    adapted network (a UNet, or SD3's transformer).
    """
    return _run_probes(unet, experts, inputs, _LayerProbe, passes=1)


@torch.no_grad()
def collect_input_magnitudes(
    unet: torch.nn.Module,
    experts: list[LoraExpert],
    inputs: Iterable[NetworkInputs],
) -> ActivationStats:
    """Mean ``|x_i|`` per input feature of every adapted layer under each expert's own model (one pass per expert)."""
    return _run_probes(unet, experts, inputs, _InputProbe, passes=len(experts))
