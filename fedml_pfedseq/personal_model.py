"""Clients that keep a personal model beside the global copy they train and upload (Ditto, PerAda, pFedMe).

The personal model (LoRA, head) never travels and is what the client evaluates. It starts as the first global
model the client receives, so round 0 evaluates the initial global model, as for every method.
"""
from __future__ import annotations

from fedml_pfedseq.adapter_model import AdapterModel
from fedml_pfedseq.config import Recipe
from fedml_pfedseq.data.federated import ClientData
from fedml_pfedseq.lora_state import StateDict
from fedml_pfedseq.strategies.fedavg import FedAvgClient, Payload


class PersonalModelClient(FedAvgClient):
    """FedAvg's client plus ``personal`` ({"lora", "head"}), which ``load`` puts into the model for evaluation."""

    def __init__(self, client_id: int, data: ClientData, model: AdapterModel, recipe: Recipe):
        super().__init__(client_id, data, model, recipe)
        self.args = recipe.algorithm_args
        self.personal: dict[str, StateDict] | None = None  # set by the first payload

    def receive(self, payload: Payload) -> None:
        super().receive(payload)
        if self.personal is None:
            self.personal = dict(self.received)

    def load(self) -> None:
        """Put the personal model into the shared model: what this client evaluates and reports."""
        self._put(self.personal)

    def _put(self, state: dict[str, StateDict]) -> None:
        self.model.set_lora_state(state["lora"])
        self.model.set_head_state(state["head"])

    def _trained(self) -> dict[str, StateDict]:
        """The (LoRA, head) now in the model."""
        return {"lora": self.model.get_lora_state(), "head": self.model.get_head_state()}
