"""pFedHN (Shamsian et al., ICML 2021) on federated adapter tuning: a server hypernetwork maps a learnable embedding
per client to that client's LoRA adapter, and is trained with the clients' updates as gradient proxies.

Adapted as the pFedSeq paper adapts every baseline (Implementation Details: frozen ViT, only LoRA + head tuned):
  - the hypernetwork generates the adapter (``LoRAHypernetwork``: theta^0 + zero-initialised heads, so the first
    adapter is PEFT's init); the head never leaves the client, as in pFedHN-PC, the official personal-classifier
    variant, and as every local-head method here;
  - client i's input is an embedding v_i [E] initialised N(0, 1) (official ``nn.Embedding``); E = 6 is the official
    rule 1 + N/4 at N = 20 clients, trunk width 100 with 3 hidden layers are the official defaults;
  - each round every client trains what it received for the recipe's local epochs (the official code samples one
    client per step) and the server takes one Adam step (lr 1e-3, the pFedSeq paper's setting for hypernetwork
    baselines) on phi and all v_i with the gradient of the surrogate sum_i <theta_i(phi, v_i), -Delta_i>
    (``update_proxy_gradient``; pFedHN's delta-theta rule). Summed over clients, not averaged: v_i is fed by client
    i alone, and under Adam a 1/N would only act through eps. The official gradient clip (norm 50) is left out:
    it bounds SGD steps, and Adam's step does not grow with the gradient.
What travels: server -> client i {"client_id", "lora": theta_i}, its own adapter only; client -> server
{"client_id", "num_samples", "lora": Delta_i = trained - received}. The hypernetwork, the embeddings and Adam's
state live at the server only; the head and the data at the client only.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fedml_pfedseq.algorithm_args import PFedHNArgs
from fedml_pfedseq.config import Recipe
from fedml_pfedseq.data.federated import client_seed
from fedml_pfedseq.hypernetwork import LoRAHypernetwork
from fedml_pfedseq.lora_state import StateDict
from fedml_pfedseq.method import Method
from fedml_pfedseq.models.seq_learner import update_proxy_gradient
from fedml_pfedseq.strategies.fedavg import Payload, Upload
from fedml_pfedseq.strategies.fedavg_local_head import FedAvgLocalHeadClient, FedAvgLocalHeadServer
from fedml_pfedseq.training import select_device


class PFedHNServer(FedAvgLocalHeadServer):
    """Generates each client's adapter from its input; one Adam step per round from all clients' updates."""

    global_adapter = False  # each client gets its own adapter; no global one exists

    def __init__(self, num_clients: int, initial_state: dict[str, StateDict], recipe: Recipe):
        super().__init__(num_clients, initial_state, recipe)
        self.args = recipe.algorithm_args
        self.device = select_device(recipe.device_args.using_gpu)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(client_seed(recipe.common_args.random_seed, 0, purpose=3001))
            hypernetwork = LoRAHypernetwork(initial_state["lora"], self.args.hn_embedding_dim,
                                            self.args.hn_hidden_dim, self.args.hn_num_hidden)
            self.networks = nn.ModuleDict({"hypernetwork": hypernetwork,
                                           **self._input_networks(num_clients, initial_state)}).to(self.device)
        self.hypernetwork: LoRAHypernetwork = self.networks["hypernetwork"]
        self.optimizer = torch.optim.Adam(self.networks.parameters(), lr=self.args.hn_lr)
        self.round = 0
        self.generated: torch.Tensor | None = None  # [N, D] CPU: the adapters last sent, row i to client i

    def _input_networks(self, num_clients: int, initial_state: dict[str, StateDict]) -> dict[str, nn.Module]:
        """The server modules that make the hypernetwork's inputs: pFedHN's learnable client embeddings."""
        return {"client_embeddings": nn.Embedding(num_clients, self.args.hn_embedding_dim)}

    def _inputs(self) -> torch.Tensor:
        """The inputs [N, E] the adapters last sent were generated from (row i: client i's)."""
        return self.networks["client_embeddings"].weight

    def initial_payloads(self) -> dict[int, Payload]:
        self.generated = self._generate()
        return self._send(self._payloads(self.generated))

    @torch.no_grad()
    def _generate(self) -> torch.Tensor:
        return self.hypernetwork(self._inputs()).cpu()  # [N, D]

    def _payloads(self, generated: torch.Tensor) -> dict[int, dict]:
        """Client i's content: its own adapter only."""
        return {i: {"lora": self.hypernetwork.unflatten(generated[i])} for i in range(self.num_clients)}

    def aggregate(self, uploads: dict[int, Upload]) -> dict[int, Payload]:
        started = time.perf_counter()
        self.trained_states(uploads)  # refuses NaN/Inf, wrong keys or senders before any state changes
        self._check_uploads(uploads)
        self.round += 1
        updates = torch.stack([self.hypernetwork.flatten(delta) for delta in self.lora_updates(uploads)])
        hypernetwork_grads, input_grad = self.proxy_gradients(updates)  # updates [N, D]
        for p, grad in zip(self.hypernetwork.parameters(), hypernetwork_grads):
            p.grad = grad
        self._apply_input_gradient(input_grad, uploads)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._accept_inputs(uploads)
        previous, self.generated = self.generated, self._generate()
        grad_norm = torch.cat([g.reshape(-1) for g in hypernetwork_grads]).norm()
        self.last_round_stats = {"round": self.round, **self._adapter_stats(previous, updates),
                                 "proxy_grad_norm": float(grad_norm),
                                 "server_seconds": time.perf_counter() - started}
        return self._send(self._payloads(self.generated))

    def proxy_gradients(self, updates: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Gradients of sum_i <theta_i, -Delta_i> at the adapters last sent: one per hypernetwork parameter, and
        [N, E] for the inputs. Neither phi nor the inputs moved since they were sent, so the recomputed theta_i
        are exactly what the clients trained."""
        inputs = self._inputs()
        generated = self.hypernetwork(inputs)  # [N, D]
        params = list(self.hypernetwork.parameters())
        *hypernetwork_grads, input_grad = update_proxy_gradient(generated, params + [inputs], updates.to(self.device))
        return hypernetwork_grads, input_grad

    def _check_uploads(self, uploads: dict[int, Upload]) -> None:
        """Refuse what the base checks miss before any state changes (pFedHN's uploads are FedAvg's: nothing)."""

    def _apply_input_gradient(self, input_grad: torch.Tensor, uploads: dict[int, Upload]) -> None:
        """pFedHN's inputs are parameters: the embeddings step with the hypernetwork."""
        self.networks["client_embeddings"].weight.grad = input_grad

    def _accept_inputs(self, uploads: dict[int, Upload]) -> None:
        """Take new inputs from the uploads (pFedHN's embeddings live at the server: nothing to take)."""

    def _adapter_stats(self, previous: torch.Tensor, updates: torch.Tensor) -> dict[str, float]:
        """How far adapters are from theta^0 and from each other, and how far this step moved them relative to
        how far local training moved them."""
        base = self.hypernetwork.base.cpu()
        step = (self.generated - previous).norm(dim=1).sum() / updates.norm(dim=1).sum().clamp_min(1e-12)
        return {"adapter_residual_norm_mean": float((self.generated - base).norm(dim=1).mean()),
                "adapter_spread_mean": float((self.generated - self.generated.mean(0)).norm(dim=1).mean()),
                "step_update_ratio": float(step)}

    def save_artifacts(self, output_dir: Path) -> None:
        """The server's networks (the hypernetwork with theta^0, and what makes its inputs) as safetensors, with
        the LoRA layout and the algorithm_args in the metadata."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.networks.state_dict().items()}
        layout = [[key, list(shape)] for layer in self.hypernetwork.layout.layers for key, shape in layer]
        save_file(tensors, str(Path(output_dir) / "hypernetwork.safetensors"),
                  metadata={"lora_layout": json.dumps(layout), "algorithm_args": json.dumps(asdict(self.args))})


class PFedHNClient(FedAvgLocalHeadClient):
    """Trains the adapter it received and its own head (pFedHN-PC); reports the LoRA delta."""


METHOD = Method("pFedHN", PFedHNServer, PFedHNClient, Args=PFedHNArgs)
