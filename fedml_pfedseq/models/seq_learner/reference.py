"""The Mamba learner as first written, kept as the reference that the fast path is checked and timed against.

It computes from the same modules and weights as ``modeling_seq_learner``: the grouped ``nn.Conv1d``, the PyTorch
loop scan over every round of every block, the readout of the last round at the end. Tests compare calibrations and
proxy gradients with it; ``benchmarks/seq_learner_cost.py`` times both in one run. The model's code never imports
this module, so it is not pushed with a learner.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from . import modeling_seq_learner as modeling
from .modeling_seq_learner import MambaBlock, MambaLearner
from .scan import selective_scan_loop


def block_forward(block: MambaBlock, x: torch.Tensor) -> torch.Tensor:  # x: [b, L, c] -> [b, L, c]
    length = x.shape[1]
    u, z = block.in_proj(block.norm(x)).chunk(2, dim=-1)  # [b, L, e] each
    u = F.silu(block.conv1d(u.transpose(1, 2))[..., :length].transpose(1, 2))  # causal: drop the right padding
    dt, B, C = block.x_proj(u).split([block.dt_rank, block.state_size, block.state_size], dim=-1)
    dt = F.softplus(block.dt_proj(dt))  # [b, L, e]
    y = selective_scan_loop(u, dt, -torch.exp(block.A_log), B, C, block.D)  # [b, L, e]
    return x + block.out_proj(y * F.silu(z))  # [b, L, c]


def learner_forward(learner: MambaLearner, x: torch.Tensor) -> torch.Tensor:  # x: [b, L, c] -> [b, c]
    for block in learner.blocks:
        x = block_forward(block, x)
    return learner.readout(learner.norm(x[:, -1]))


def learners_forward(learners: list[MambaLearner], x: torch.Tensor) -> torch.Tensor:  # [G, b, L, c] -> [G, b, c]
    return torch.stack([learner_forward(learner, layer_x) for learner, layer_x in zip(learners, x)])


@contextmanager
def reference_implementation() -> Iterator[None]:
    """Inside this context every Mamba learner of the process computes as the reference does, one layer at a time
    (also where the model batches several layers)."""
    fast, fast_layers = MambaLearner.forward, modeling.learners_forward
    MambaLearner.forward, modeling.learners_forward = learner_forward, learners_forward
    try:
        yield
    finally:
        MambaLearner.forward, modeling.learners_forward = fast, fast_layers
