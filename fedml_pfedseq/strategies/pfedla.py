"""pFedLA (Ma et al., CVPR 2022): hypernetworks at the server learn layer-wise aggregation weights per client.

Adapted to federated adapter tuning as the pFedSeq paper adapts every baseline (frozen ViT, only LoRA and head
tuned): what is aggregated is the LoRA adapter, a "layer" is one backbone layer's LoRA tensors (``LayerLayout``),
and the head stays with its client (the client is FedAvgLocalHead's: it trains adapter and head, uploads the LoRA
delta). The server keeps theta_j, the adapter client j trained last, and one hypernetwork HN_i per client, as in the
paper and the reference code (KarhouTam/pFedLA, which calls itself unofficial, and its FL-bench port; a single
network conditioned on client embeddings would be pFedHN's design):
  HN_i: its own embedding v_i [E] -> 3 Linear+ReLU [H] -> per layer l, relu(W_l h + b_l) [N] normalised to sum 1:
  alpha_i^l, client i's weights over the N clients' layer l (all zero: client i's own layer, as FL-bench does).
Client i receives theta_i^l = sum_j alpha_ij^l theta_j^l, which is differentiable in HN_i. One round:
  1. rebuild each trained adapter (sent + Delta_i), refusing NaN/Inf, wrong keys or missing clients before any
     state changes;
  2. from round 2: recompute each theta_i from the adapters it was built from and take one Adam step on the
     hypernetworks with gradient (d theta_i / d HN_i)^T (-Delta_i) (the paper's update, Delta_i standing for the
     negative gradient of client i's loss at theta_i). Round 1 sent everyone the initial adapter, which any alpha
     reproduces (all stored adapters are equal), so its gradient is zero: no step;
  3. store the trained adapters and send each client its own aggregate from the updated hypernetworks.
Every client takes part in every round (the recipe checks it) and HN_i's gradient comes from Delta_i alone, so one
Adam over all hypernetworks takes each one's own step (Adam is elementwise): it equals N separate optimizers.

Hyperparameters: E = H = 100 (reference code); Adam lr 1e-3 (pFedSeq paper: hypernetwork baselines are trained
with Adam at 1e-3; the reference code uses SGD at 5e-3). W_l starts U(0, 1) and b_l at 0, as in the reference, so
that the ReLU does not zero a layer's weights; an untrained HN_i thus gives nearly uniform weights (FedAvg with
equal weights) and personalizes as it learns. HeurpFedLA (the top-K layers by self-weight kept local) is the
paper's heuristic variant, not the pFedLA of pFedSeq's Table 1, and is left out.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fedml_pfedseq.algorithm_args import PFedLAArgs
from fedml_pfedseq.config import Recipe
from fedml_pfedseq.data.federated import client_seed
from fedml_pfedseq.lora_state import LayerLayout, StateDict
from fedml_pfedseq.method import Method
from fedml_pfedseq.models.seq_learner import update_proxy_gradient
from fedml_pfedseq.strategies.fedavg import Upload
from fedml_pfedseq.strategies.fedavg_local_head import FedAvgLocalHeadClient, FedAvgLocalHeadServer
from fedml_pfedseq.training import select_device

ARTIFACT = "pfedla_hypernetworks.safetensors"


class LayerWeightNet(nn.Module):
    """HN_i: client i's aggregation weights alpha_i [L, N], each row non-negative and summing to 1."""

    def __init__(self, client_id: int, num_clients: int, num_layers: int, embedding_dim: int, hidden_dim: int):
        super().__init__()
        self.client_id, self.num_clients, self.num_layers = client_id, num_clients, num_layers
        self.embedding = nn.Parameter(torch.randn(embedding_dim))  # v_i, as nn.Embedding initialises it
        self.mlp = nn.Sequential(nn.Linear(embedding_dim, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.ReLU())
        self.heads = nn.Linear(hidden_dim, num_layers * num_clients)  # the L heads W_l [N, H], stacked
        nn.init.uniform_(self.heads.weight, 0.0, 1.0)
        nn.init.zeros_(self.heads.bias)

    def forward(self) -> torch.Tensor:
        weights = torch.relu(self.heads(self.mlp(self.embedding))).view(self.num_layers, self.num_clients)  # [L, N]
        own = torch.zeros_like(weights)
        own[:, self.client_id] = 1.0
        weights = torch.where(weights.sum(-1, keepdim=True) > 0, weights, own)
        return weights / weights.sum(-1, keepdim=True)


class PFedLAServer(FedAvgLocalHeadServer):
    """Per client, the layer-wise weighted aggregate of all clients' latest adapters, with learned weights."""

    global_adapter = False  # each client gets its own adapter; no global one exists

    def __init__(self, num_clients: int, initial_state: dict[str, StateDict], recipe: Recipe):
        super().__init__(num_clients, initial_state, recipe)  # initial_payloads: the initial adapter for all
        self.args: PFedLAArgs = recipe.algorithm_args
        self.layout = LayerLayout.of(initial_state["lora"])
        self.device = select_device(recipe.device_args.using_gpu)
        nets = []
        for i in range(num_clients):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(client_seed(recipe.common_args.random_seed, i, purpose=4001))
                nets.append(LayerWeightNet(i, num_clients, len(self.layout.layers), self.args.pfedla_embedding_dim,
                                           self.args.pfedla_hidden_dim))
        self.hypernetworks = nn.ModuleList(nets).to(self.device)
        self.optimizer = torch.optim.Adam(self.hypernetworks.parameters(), lr=self.args.pfedla_hn_lr)
        # theta_j, every client's latest adapter, per layer [D_l, N]; at first the initial adapter for all
        self.adapters = self._on_device(self.layout.stack([initial_state["lora"]] * num_clients))
        self.alphas: torch.Tensor | None = None  # [N, L, N] weights of what was sent last; None: the initial adapter
        self.round = 0

    def _on_device(self, matrices: list[torch.Tensor]) -> list[torch.Tensor]:
        return [m.to(self.device) for m in matrices]

    def weights(self) -> torch.Tensor:
        """alpha [N, L, N]: alpha[i, l, j] is client j's weight in client i's layer l."""
        return torch.stack([net() for net in self.hypernetworks])

    @staticmethod
    def personalize(alphas: torch.Tensor, adapters: list[torch.Tensor]) -> list[torch.Tensor]:
        """theta per layer [D_l, N]: column i is sum_j alphas[i, l, j] * adapters[l][:, j]."""
        return [adapter @ alphas[:, l, :].T for l, adapter in enumerate(adapters)]

    def aggregate(self, uploads: dict[int, Upload]):
        started = time.perf_counter()
        states = self.trained_states(uploads)  # refuses NaN/Inf, wrong keys or senders before any state changes
        self.round += 1
        order = range(self.num_clients)
        stats = {} if self.alphas is None else self._train_hypernetworks(self.lora_updates(uploads))
        self.adapters = self.latest_adapters({i: s["lora"] for i, s in states.items()})
        with torch.no_grad():
            self.alphas = self.weights()
            thetas = [theta.cpu() for theta in self.personalize(self.alphas, self.adapters)]
        self_weights = torch.diagonal(self.alphas, dim1=0, dim2=2)  # alpha_ii^l [L, N]
        self.last_round_stats = {"round": self.round, **stats, "self_weight_mean": float(self_weights.mean()),
                                 "self_weight_min": float(self_weights.min()),
                                 "self_weight_max": float(self_weights.max()),
                                 "server_seconds": time.perf_counter() - started}
        return self._send({i: {"lora": self._own_adapter(thetas, i)} for i in order})

    def latest_adapters(self, trained: dict[int, StateDict]) -> list[torch.Tensor]:
        """theta_j per layer [D_l, N] on the server's device: the trained adapter where client j sent one this round
        (uploads arrive on the CPU), else the column it had (a client left out keeps its adapter)."""
        return self.layout.stack([{k: v.to(self.device) for k, v in trained[i].items()} if i in trained else
                                  self.layout.column(self.adapters, i) for i in range(self.num_clients)])

    def _own_adapter(self, thetas: list[torch.Tensor], i: int) -> StateDict:
        """Column i as a state in its own storage: a payload owns its tensors (check_plain refuses a
        view into every client's adapters)."""
        return {k: v.clone(memory_format=torch.contiguous_format) for k, v in self.layout.column(thetas, i).items()}

    def _train_hypernetworks(self, deltas: list[StateDict]) -> dict[str, float]:
        """One Adam step with gradient sum_i (d theta_i / d HN)^T (-Delta_i), theta_i recomputed as it was sent."""
        thetas = torch.cat(self.personalize(self.weights(), self.adapters))  # [D, N], now with graph
        update = torch.cat(self._on_device(self.layout.stack(deltas)))  # [D, N]
        params = list(self.hypernetworks.parameters())
        grads = update_proxy_gradient(thetas, params, update)
        for p, grad in zip(params, grads):
            p.grad = grad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"hn_grad_norm": float(torch.cat([g.reshape(-1) for g in grads]).norm())}

    def save_artifacts(self, output_dir: Path) -> None:
        """Every client's hypernetwork in one safetensors file, keys "<client>.<parameter>"."""
        save_file({k: v.detach().cpu().contiguous() for k, v in self.hypernetworks.state_dict().items()},
                  str(Path(output_dir) / ARTIFACT))


class PFedLAClient(FedAvgLocalHeadClient):
    """Trains the adapter it received and its own head; reports the LoRA delta (the head stays here)."""


METHOD = Method("pFedLA", PFedLAServer, PFedLAClient, Args=PFedLAArgs)
