"""Build a federation's parts from a recipe: the client model, the server strategy and the client strategies.

The simulator builds every part in one process; a FedML party builds only its own (the server never loads a
client's samples, a client keeps only its own partition). Both go through these functions, so a party starts
from exactly the state the simulator starts from for the same recipe and seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fedml_pfedseq.adapter_model import AdapterModel, load_image_processor
from fedml_pfedseq.config import Recipe
from fedml_pfedseq.data.federated import ClientData, FederatedData, build_federated_data, client_seed
from fedml_pfedseq.strategies import method_class
from fedml_pfedseq.training import select_device


def set_threads(recipe: Recipe) -> None:
    if recipe.device_args.num_threads:
        torch.set_num_threads(recipe.device_args.num_threads)


def build_data(recipe: Recipe) -> FederatedData:
    """Every client's splits, partitioned as the recipe says (deterministic in the seed)."""
    processor = load_image_processor(recipe.model_args.model)
    return build_federated_data(recipe.data_args, processor, recipe.train_args.client_num_in_total,
                                recipe.common_args.random_seed)


def build_model(recipe: Recipe, num_labels: int) -> AdapterModel:
    """The frozen backbone with LoRA and a head; PEFT's LoRA init (A random, B = 0) is theta^0 for everyone."""
    m = recipe.model_args
    torch.manual_seed(recipe.common_args.random_seed)
    model = AdapterModel(m.model, num_labels, m.lora_r, m.lora_alpha, m.lora_dropout, m.lora_target_modules)
    return model.to(select_device(recipe.device_args.using_gpu))


def build_server(recipe: Recipe, model: AdapterModel, num_clients: int):
    """The method's server strategy, starting from the model's LoRA init and a seeded shared head."""
    initial = {"lora": model.get_lora_state(),
               "head": model.init_head_state(client_seed(recipe.common_args.random_seed, 0, purpose=4))}
    return method_class(recipe.train_args.federated_optimizer).Server(num_clients, initial, recipe)


def build_client(recipe: Recipe, client_id: int, data: ClientData, model: AdapterModel):
    return method_class(recipe.train_args.federated_optimizer).Client(client_id, data, model, recipe)


@dataclass
class Federation:
    """Everything an in-process run needs: data, one model shared by all clients, server and clients."""

    recipe: Recipe
    data: FederatedData
    model: AdapterModel
    server: object
    clients: list


def build_federation(recipe: Recipe) -> Federation:
    set_threads(recipe)
    data = build_data(recipe)
    model = build_model(recipe, data.num_labels)
    server = build_server(recipe, model, len(data.clients))
    clients = [build_client(recipe, i, client_data, model) for i, client_data in enumerate(data.clients)]
    return Federation(recipe, data, model, server, clients)
