"""Build a federation's parts from a recipe: the client model, the server strategy and the client strategies.

The simulator builds every part in one process; a FedML party builds only its own (the server never loads a
client's samples, a client keeps only its own partition). Both go through these functions, so a party starts
from exactly the state the simulator starts from for the same recipe and seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from fedml_pfedseq.adapter_model import AdapterModel, load_image_processor
from fedml_pfedseq.config import Recipe
from fedml_pfedseq.data.federated import ClientData, FederatedData, build_client_data, build_federated_data, client_seed
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


def build_party_data(recipe: Recipe, client: int) -> tuple[ClientData, list[str]]:
    """Client ``client``'s splits (as ``build_data`` makes them) and the label space: what its party loads."""
    processor = load_image_processor(recipe.model_args.model)
    return build_client_data(recipe.data_args, processor, recipe.train_args.client_num_in_total,
                             recipe.common_args.random_seed, client)


def client_depth(recipe: Recipe, client_id: int) -> int | None:
    """How many encoder layers client ``client_id``'s backbone keeps (None: all), from model_args.client_depths."""
    depths = recipe.model_args.client_depths
    return depths[client_id % len(depths)] if depths else None


def participants(recipe: Recipe, num_clients: int, round_idx: int) -> list[int]:
    """The clients sampled for ``round_idx`` (train_args.client_num_per_round of them, uniformly without
    replacement, seeded by run and round so every engine and a resumed run draw the same), in index order."""
    k = recipe.train_args.client_num_per_round
    if k is None or k >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(client_seed(recipe.common_args.random_seed, 0, purpose=8000 + round_idx))
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))


def build_model(recipe: Recipe, num_labels: int, depth: int | None = None) -> AdapterModel:
    """The frozen backbone (its first ``depth`` layers) with LoRA and a head; PEFT's LoRA init (A random, B = 0)
    is theta^0 for everyone, at every depth."""
    m = recipe.model_args
    torch.manual_seed(recipe.common_args.random_seed)
    model = AdapterModel(m.model, num_labels, m.lora_r, m.lora_alpha, m.lora_dropout, m.lora_target_modules,
                         num_layers=depth, lora_layers=min(m.client_depths) if m.client_depths else None)
    model.precision = recipe.device_args.mixed_precision
    device = select_device(recipe.device_args.using_gpu)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = recipe.device_args.tf32
    return model.to(device)


def build_server(recipe: Recipe, model: AdapterModel, num_clients: int, resuming: bool = False):
    """The method's server strategy, starting from the model's LoRA init and a seeded shared head, and from a
    pushed or saved SeqLearner where ``hub_args.hub_learner_init`` names one (the simulator's and a cross-silo
    server's alike). ``resuming``: a checkpoint will replace the learner, so its source is not read (it may be
    gone or offline)."""
    initial = {"lora": model.get_lora_state(),
               "head": model.init_head_state(client_seed(recipe.common_args.random_seed, 0, purpose=4))}
    server = method_class(recipe.train_args.federated_optimizer).Server(num_clients, initial, recipe)
    if recipe.hub_args.hub_learner_init and not resuming:
        from fedml_pfedseq.hub.warm_start import warm_start_learner  # the Hub client only where a recipe asks

        warm_start_learner(server, recipe.hub_args.hub_learner_init)
    return server


def build_client(recipe: Recipe, client_id: int, data: ClientData, model: AdapterModel):
    return method_class(recipe.train_args.federated_optimizer).Client(client_id, data, model, recipe)


@dataclass
class Federation:
    """Everything an in-process run needs: data, the models the clients share (one per backbone depth), server and
    clients. ``model`` is the whole backbone's: the server's, and every client's unless model_args.client_depths."""

    recipe: Recipe
    data: FederatedData
    models: dict[int | None, AdapterModel]
    server: object
    clients: list

    @property
    def model(self) -> AdapterModel:
        return self.models[None]


def build_federation(recipe: Recipe, resuming: bool = False, progress: bool = False) -> Federation:
    """Data, models, server and clients of ``recipe``; ``resuming``: as ``build_server``'s. ``progress``: one bar
    for the whole build (the libraries' own bars are for ``console.quiet_libraries`` to turn off)."""
    set_threads(recipe)
    with tqdm(total=3, desc=f"{recipe.name}: loading", disable=not progress, leave=False) as bar:
        bar.set_postfix_str("data")
        data = build_data(recipe)
        bar.update()
        bar.set_postfix_str("backbone")
        models = {None: build_model(recipe, data.num_labels)}
        for i in range(len(data.clients)):
            depth = client_depth(recipe, i)
            if depth not in models:
                models[depth] = build_model(recipe, data.num_labels, depth)
        bar.update()
        bar.set_postfix_str("strategies")
        server = build_server(recipe, models[None], len(data.clients), resuming)
        clients = [build_client(recipe, i, client_data, models[client_depth(recipe, i)])
                   for i, client_data in enumerate(data.clients)]
        bar.update()
    return Federation(recipe, data, models, server, clients)
