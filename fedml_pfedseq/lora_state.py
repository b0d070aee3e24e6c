"""Arithmetic on state dicts (name -> tensor) and the per-backbone-layer view of a LoRA state.

The server works on what clients send: plain state dicts. pFedSeq's sequential learner works per backbone layer
on one flat vector per layer, so :class:`LayerLayout` records, for each layer, the (key, shape) pairs in a fixed
order to flatten a state into vectors and split them back exactly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

StateDict = dict[str, torch.Tensor]

_LAYER_INDEX = re.compile(r"\.layers?\.(\d+)\.")
_LORA_FACTOR = re.compile(r"\.lora_([AB])(?:\.|$)")


def weighted_average(states: list[StateDict], weights: list[float]) -> StateDict:
    """sum_i w_i * state_i / sum_i w_i, key by key (FedAvg's rule, eq. 1, with w_i = n_i)."""
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state, got {len(states)} states and {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {weights}")
    keys = states[0].keys()
    for i, state in enumerate(states[1:], start=1):
        if state.keys() != keys:
            raise KeyError(f"state {i} has different keys from state 0")
    return {k: sum(w / total * s[k] for s, w in zip(states, weights)) for k in keys}


def add(a: StateDict, b: StateDict, scale: float = 1.0) -> StateDict:
    """a + scale * b."""
    return {k: a[k] + scale * b[k] for k in a}


def subtract(a: StateDict, b: StateDict) -> StateDict:
    """a - b."""
    return {k: a[k] - b[k] for k in a}


def lora_factors(state: StateDict, factors: tuple[str, ...]) -> StateDict:
    """The entries of a LoRA state that belong to ``factors``: "A" (PEFT's ``lora_A``, the down-projections),
    "B" (``lora_B``, the up-projections); with both, the whole state (whatever else an adapter holds)."""
    if {"A", "B"} <= set(factors):
        return state
    return {k: v for k, v in state.items() if (m := _LORA_FACTOR.search(k)) and m.group(1) in factors}


def check_finite(state: StateDict, who: str) -> None:
    """Refuse NaN/Inf before it reaches any aggregate."""
    for key, value in state.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"{who}: tensor {key!r} holds NaN or Inf")


def layer_index(key: str) -> int:
    match = _LAYER_INDEX.search(key)
    if match is None:
        raise KeyError(f"cannot find a layer index in LoRA key {key!r}")
    return int(match.group(1))


@dataclass(frozen=True)
class LayerLayout:
    """For each backbone layer (in order), the LoRA (key, shape) pairs that make its flat vector."""

    layers: tuple[tuple[tuple[str, torch.Size], ...], ...]

    @classmethod
    def of(cls, state: StateDict) -> LayerLayout:
        by_layer: dict[int, list[tuple[str, torch.Size]]] = {}
        for key in sorted(state):
            by_layer.setdefault(layer_index(key), []).append((key, state[key].shape))
        return cls(tuple(tuple(by_layer[i]) for i in sorted(by_layer)))

    @property
    def sizes(self) -> list[int]:
        """D_l, the number of LoRA parameters of each layer."""
        return [sum(shape.numel() for _, shape in layer) for layer in self.layers]

    def flatten(self, state: StateDict) -> list[torch.Tensor]:
        """One flat vector [D_l] per layer."""
        return [torch.cat([state[key].reshape(-1) for key, _ in layer]) for layer in self.layers]

    def unflatten(self, vectors: list[torch.Tensor]) -> StateDict:
        """Inverse of :meth:`flatten`. Each tensor owns its storage: a view would carry (and pickle) the whole
        vector or matrix it was cut from, e.g. every client's column."""
        if len(vectors) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} layer vectors, got {len(vectors)}")
        state: StateDict = {}
        for layer, vector, size in zip(self.layers, vectors, self.sizes):
            if vector.shape != (size,):
                raise ValueError(f"layer vector of shape {tuple(vector.shape)}, expected ({size},)")
            offset = 0
            for key, shape in layer:
                state[key] = vector[offset : offset + shape.numel()].reshape(shape).clone()
                offset += shape.numel()
        return state

    def stack(self, states: list[StateDict]) -> list[torch.Tensor]:
        """One [D_l, N] matrix per layer whose column i is ``states[i]`` flattened (a round as the learner sees it)."""
        return [torch.stack(columns, dim=1) for columns in zip(*(self.flatten(state) for state in states))]

    def column(self, matrices: list[torch.Tensor], i: int) -> StateDict:
        """Column i of per-layer [D_l, N] matrices as a state (the inverse of :meth:`stack` for one client)."""
        return self.unflatten([matrix[:, i] for matrix in matrices])
