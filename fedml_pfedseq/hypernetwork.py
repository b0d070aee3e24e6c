"""The hypernetwork shared by pFedHN and PeFLL: a vector per client -> that client's LoRA state.

As in pFedHN's official code, an MLP trunk maps the input to features and linear heads map the features to the
target's parameters. The heads here are one ``nn.Linear`` per backbone layer (its LoRA tensors concatenated in
:class:`LayerLayout` order) rather than one per tensor: a linear map onto a concatenation is the stack of the
per-tensor maps, so the function class is the same, with 6 heads instead of 24 for the default backbone.

The heads start at zero and their output is a residual on the PEFT init theta^0 (A random, B = 0): the first
adapters every client receives are exactly theta^0, which local SGD is known to train, and every later adapter is
theta^0 plus what the hypernetwork has learnt from clients' updates. A random head init would instead send each
client a random B, an adapter that perturbs the frozen features before anything was learnt.
"""
from __future__ import annotations

import torch
from torch import nn

from fedml_pfedseq.lora_state import LayerLayout, StateDict


def mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers through ``dims`` with ReLU between them (none after the last, as pFedHN's trunk)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


class LoRAHypernetwork(nn.Module):
    """x [N, E] -> flat LoRA states [N, D] = theta^0 + heads(trunk(x)); D = 36,864 for the default backbone."""

    def __init__(self, initial_lora: StateDict, input_dim: int, hidden_dim: int, num_hidden: int):
        super().__init__()
        self.layout = LayerLayout.of(initial_lora)
        self.register_buffer("base", self.flatten(initial_lora))  # theta^0 [D]
        self.trunk = mlp([input_dim] + [hidden_dim] * (num_hidden + 1))  # pFedHN: Linear, then n x (ReLU, Linear)
        self.heads = nn.ModuleList(nn.Linear(hidden_dim, size) for size in self.layout.sizes)  # -> [N, D_l]
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk(x)  # [N, hidden]
        return self.base + torch.cat([head(features) for head in self.heads], dim=-1)  # [N, D]

    def flatten(self, state: StateDict) -> torch.Tensor:
        """A LoRA state (or update) as one vector [D], in the order of the output."""
        return torch.cat(self.layout.flatten(state))

    def unflatten(self, flat: torch.Tensor) -> StateDict:
        """One output row [D] as a detached CPU state (copies: a payload owns its tensors)."""
        return self.layout.unflatten(list(flat.detach().cpu().split(self.layout.sizes)))
