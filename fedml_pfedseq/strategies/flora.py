"""FLoRA (Wang et al., NeurIPS 2024): the server stacks the clients' LoRA factors instead of averaging each, merges
their product into the global model's weights, and every round starts from a fresh LoRA.

Why: averaging A and B separately gives avg(B) avg(A), not the average of the clients' updates avg(B_i A_i).
Stacking A = [A_1; ...; A_K] (rows) and B = [p_1 B_1, ..., p_K B_K] (columns), p_k = n_k / n, gives exactly
B A = sum_k p_k B_k A_k, at rank K r: the stacked adapter raises the rank, so it is merged into the frozen weights
(W <- W + (lora_alpha / r) B A) and each round's clients train a new LoRA from theta^0 (A random, B = 0).

Adapted to this harness (the paper fine-tunes language models and sends the stacked factors, which each client
merges itself): the payload carries the running sum of the merged updates per adapted weight (``merged``: one
d_out x d_in tensor per LoRA module) with theta^0's LoRA and the averaged head, so a client that missed rounds
(sampling, a restart) still holds the global model, at the price of dense weights down (for ViT-B/16's q and v, 14 M
values per payload against the stacked factors' K r (d_in + d_out) per module); uploads are LoRA and head deltas.
A client evaluates the global model it received: the merged weights, theta^0's LoRA (B = 0 adds nothing) and the
averaged head. Its Hub export therefore carries its own backbone folder (the merged weights, as pFedLoRA's) with
the adapter on it; the server saves no global adapter (the global model is not an adapter on the pretrained ViT).
"""
from __future__ import annotations

import torch

from fedml_pfedseq.adapter_model import AdapterModel
from fedml_pfedseq.config import Recipe
from fedml_pfedseq.data.federated import ClientData
from fedml_pfedseq.lora_state import StateDict, lora_factors, weighted_average
from fedml_pfedseq.method import Method
from fedml_pfedseq.strategies.fedavg import FedAvgClient, FedAvgServer, Payload, Upload


def base_weight(lora_a_key: str) -> str:
    """The frozen weight a LoRA module adapts: '....q_proj.lora_A.weight' -> '....q_proj.base_layer.weight'."""
    return lora_a_key.replace(".lora_A.", ".base_layer.")


def merged_shapes(lora: StateDict) -> dict[str, tuple[int, int]]:
    """Each adapted weight's shape (d_out, d_in), read from its module's factors: B [d_out, r], A [r, d_in]."""
    return {base_weight(a): (lora[a.replace(".lora_A.", ".lora_B.")].shape[0], value.shape[1])
            for a, value in lora_factors(lora, ("A",)).items()}


class FLoRAServer(FedAvgServer):
    """Stacks the trained factors, merges their product into ``merged``; sends theta^0's LoRA every round."""

    global_adapter = False

    def __init__(self, num_clients: int, initial_state: dict[str, StateDict], recipe: Recipe):
        super().__init__(num_clients, initial_state, recipe)
        self.scaling = recipe.model_args.lora_alpha / recipe.model_args.lora_r  # PEFT's scaling of B A
        self.merged = {key: torch.zeros(shape) for key, shape in merged_shapes(initial_state["lora"]).items()}

    def _send(self, states: dict[int, dict[str, StateDict]]) -> dict[int, Payload]:
        payloads = super()._send(states)
        for payload in payloads.values():
            payload["merged"] = self.merged
        return payloads

    def aggregate(self, uploads: dict[int, Upload]) -> dict[int, Payload]:
        states = self.trained_states(uploads)
        weights = torch.tensor([float(uploads[i]["num_samples"]) for i in states])
        p = weights / weights.sum()  # [K]
        lora = [states[i]["lora"] for i in states]
        merged = {}  # a new dict: the payloads already sent keep theirs
        for key, before in self.merged.items():
            a_key = key.replace(".base_layer.", ".lora_A.")
            b_key = a_key.replace(".lora_A.", ".lora_B.")
            stacked_a = torch.cat([state[a_key] for state in lora], dim=0)  # [K r, d_in]
            stacked_b = torch.cat([p_k * state[b_key] for p_k, state in zip(p, lora)], dim=1)  # [d_out, K r]
            merged[key] = before + self.scaling * stacked_b @ stacked_a
        self.merged = merged
        head = weighted_average([states[i]["head"] for i in states], weights.tolist())
        self.global_state = {"lora": self.global_state["lora"], "head": head}  # the LoRA: theta^0's, every round
        return self._send({i: self.global_state for i in range(self.num_clients)})


class FLoRAClient(FedAvgClient):
    """FedAvg's client on the global model: its adapted weights are the pretrained ones plus ``merged``."""

    rebuilt = ("pretrained",)  # from the model, not saved in a checkpoint

    def __init__(self, client_id: int, data: ClientData, model: AdapterModel, recipe: Recipe):
        super().__init__(client_id, data, model, recipe)
        weights = model.backbone_parameters()
        self.pretrained = {key: weights[key].detach().cpu().clone() for key in merged_shapes(self.state["lora"])}
        self.state["merged"] = {key: torch.zeros_like(value) for key, value in self.pretrained.items()}

    def receive(self, payload: Payload) -> None:
        super().receive(payload)
        self.state["merged"] = payload["merged"]

    def load(self) -> None:
        super().load()
        weights = self.model.backbone_parameters()
        with torch.no_grad():
            for key, pretrained in self.pretrained.items():
                weights[key].copy_(pretrained + self.state["merged"][key])

    def train(self, round_idx: int) -> Upload:
        merged = self.state["merged"]
        upload = super().train(round_idx)  # its state is rebuilt from the model's LoRA and head
        self.state["merged"] = merged
        return upload


METHOD = Method("FLoRA", FLoRAServer, FLoRAClient, extra_message_bytes=lambda model: sum(
    4 * d_out * d_in for d_out, d_in in merged_shapes(model.get_lora_state()).values()))
