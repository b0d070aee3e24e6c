"""APPLE (Luo & Wu, IJCAI 2022, "Adapt to Adaptation: Learning Personalization for Cross-Silo Federated Learning").

Each client i owns a core model theta_i and a directed-relationship (DR) vector p_i in R^N. Its personalized model
is the weighted sum of every client's core, w_i = sum_j p_ij theta_j. Client i downloads the other clients' latest
cores and trains on its own data, with the others' cores held fixed:
    min over (theta_i, p_i) of  CE(w_i) + lambda(r) * mu * ||p_i - p_i^(0)||^2
so the gradients are d/d theta_i = p_ii * g and d/d p_ij = <g, theta_j> + 2 lambda(r) mu (p_ij - p_ij^(0)), g the
gradient w.r.t. w_i's tensors. The core model then goes back to the server, which keeps every client's latest core.
This method shares client models among clients by design: client i receives theta_j of every other client j.

Adapted to federated adapter tuning as pFedSeq adapts every baseline: a core model is a LoRA adapter plus a head on
the frozen ViT, and w_i mixes them tensor by tensor (LoRA A, LoRA B, head weight, head bias). The official model
mixes each layer's outputs, sum_j p_ij layer_j(x), which for its linear and conv layers is this weight mixing. For
LoRA it is the mix of the factors: B_w A_w = (sum_j p_ij B_j)(sum_j p_ij A_j), not sum_j p_ij B_j A_j. The head is
part of the core and is shared like the adapter.
- Server -> client i: its own latest core in FedAvg's slots ("lora", "head") and every other client's latest core
  under "peers" ({j: {"lora", "head"}}): N cores per client per round, N times FedAvg's download. All cores are
  encoded once per payload, so a round moves N^2 cores server -> clients.
- Client -> server: the delta of its own core w.r.t. the one it received, and n_i (FedAvg's upload). The server
  rebuilds the trained core (``trained_states``: it refuses NaN/Inf, wrong keys or senders) and replaces that
  client's slot only. Nothing is averaged.
- Stays on the client: p_i (and p_i^(0)). ``evaluate`` reports w_i built from the cores just received and p_i as it
  was last trained. The official code evaluates right after training, with the other cores from the start of the
  round; the framework evaluates what a client holds after it receives, as for every method.

Choices, as the official code (ljaiverson/pFL-APPLE) makes them unless said otherwise:
- Initial cores (``apple_core_init``): "distinct" (default) gives each client its own independently initialized
  core, as train_APPLE.py builds one fresh Net per client; every client downloads the same set in round 1. Here
  core j has PEFT's LoRA init with A drawn from seed client_seed(seed, j, 7001), B = 0, and the head that client j
  draws for itself (FedAvgClient's seed). "shared" starts every core from the server's theta^0 (FedAvg's start).
- p_i^(0) = 1/N for every j. The official code starts every p_i at the clients' sample shares n_j / sum_k n_k
  (utils/apple.py, init_pss). Here the server knows n_j only from the first uploads, and p_i^(0) is needed before
  them. So it falls back to the official ClientNet's default for no shares: uniform. On the shipped Omniglot
  recipe, each drawer's sample count is capped at 500 and the two are equal. p is unconstrained (no projection to
  the simplex), as in the official code.
- lambda(r), utils/losses.py get_reg_coef: with R = int(comm_round * ``apple_reg_rounds_fraction``) and r = round - 1,
  lambda = (cos(pi r / R) + 1) / 2 ("cosine") or 0.001^(r / R) ("exponential", the default) for r < R, else 0. It is
  also 0 when R = 0. The penalty is lambda * mu * ||p - p0||^2 (reg_loss: no 1/2; in the paper's mu/2 form the
  official mu = 0.1 would read mu = 0.2). Defaults: mu = 0.1, fraction 0.1, exponential. With 12 rounds, only round
  1 is regularized.
- Learning rates: the core takes train_args.learning_rate, momentum and weight decay. p takes ``apple_p_lr``
  (official lr_coef 0.001), the same momentum, and no weight decay. Both are in one SGD, rebuilt every round as the
  official code rebuilds its optimizer. The official per-round lr decay defaults to 1 (none) and is left out. Note:
  the personalized model moves by p_ii^2 * lr * g per step of the own core (p_ii = 1/N at first). That is the
  method's design, and it makes early progress slow for large N.
- Left out: the limited-bandwidth variant (M < N downloads per round). There, client i picks which cores to fetch
  from |p_i|, which stays on the client; here the server pushes. The variant would need p_i uploaded and stale
  copies kept on each client. Every client downloads all N - 1 other cores, the official default
  (limit_downloaded_models 10000). No randomness beyond FedAvg's seeded batch shuffling (both engines match).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedml_pfedseq.adapter_model import AdapterModel
from fedml_pfedseq.algorithm_args import AppleArgs
from fedml_pfedseq.config import Recipe
from fedml_pfedseq.data.federated import ClientData, client_seed
from fedml_pfedseq.lora_state import StateDict
from fedml_pfedseq.method import Method
from fedml_pfedseq.strategies.fedala import trainable_by_key
from fedml_pfedseq.strategies.fedavg import FedAvgClient, FedAvgServer, Payload, Upload
from fedml_pfedseq.training import loss_scaler

Core = dict[str, StateDict]  # {"lora": ..., "head": ...}
EXPONENTIAL_EPSILON = 0.001  # utils/losses.py: lambda falls from 1 to this at the end of the regularized rounds


def proximal_coefficient(round_idx: int, comm_round: int, args: AppleArgs) -> float:
    """lambda(r) * mu for round ``round_idx`` (1-based), the official get_reg_coef with r = round_idx - 1."""
    regularized = int(comm_round * args.apple_reg_rounds_fraction)
    r = round_idx - 1
    if args.apple_mu == 0 or r >= regularized:
        return 0.0
    if args.apple_scheduler == "cosine":
        return (math.cos(math.pi * r / regularized) + 1) / 2 * args.apple_mu
    return EXPONENTIAL_EPSILON ** (r / regularized) * args.apple_mu


def initial_p(num_clients: int) -> torch.Tensor:
    """p_i^(0): uniform 1/N (see the module docstring for why not the official sample shares)."""
    return torch.full((num_clients,), 1.0 / num_clients)


def fresh_core(initial: Core, seed: int, client: int) -> Core:
    """Client ``client``'s own initial core: PEFT's LoRA init (A kaiming-uniform, seeded; B as in ``initial``, i.e.
    0) and the head FedAvgClient draws for that client (nn.Linear's init from client_seed(seed, client, 3))."""
    generator = torch.Generator().manual_seed(client_seed(seed, client, purpose=7001))
    lora = {}
    for key in sorted(initial["lora"]):
        value = initial["lora"][key].clone()
        if ".lora_A." in key:
            nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
        lora[key] = value
    out_features, in_features = initial["head"]["weight"].shape
    head = nn.Linear(in_features, out_features)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(client_seed(seed, client, purpose=3))  # AdapterModel.init_head_state, as FedAvgClient
        head.reset_parameters()
    return {"lora": lora, "head": {k: v.detach().clone() for k, v in head.state_dict().items()}}


class AppleServer(FedAvgServer):
    """Keeps every client's latest core; sends client i its own core and all the others' ("peers")."""

    global_adapter = False  # each client gets its own adapter; no global one exists

    def __init__(self, num_clients: int, initial_state: dict[str, StateDict], recipe: Recipe):
        super().__init__(num_clients, initial_state, recipe)
        self.args: AppleArgs = recipe.algorithm_args
        seed = recipe.common_args.random_seed
        if self.args.apple_core_init == "distinct":
            self.cores: list[Core] = [fresh_core(self.global_state, seed, j) for j in range(num_clients)]
        else:
            self.cores = [{part: {k: v.clone() for k, v in self.global_state[part].items()}
                           for part in self.shared_parts} for _ in range(num_clients)]
        self.round = 0

    def initial_payloads(self) -> dict[int, Payload]:
        return self._send_cores()

    def _send_cores(self) -> dict[int, Payload]:
        """Client i: its own core in FedAvg's slots (what ``trained_states`` rebuilds from), the others' under
        "peers". The tensors are shared between payloads, never modified in place (a new upload replaces a slot)."""
        n = self.num_clients
        return self._send({i: {**self.cores[i], "peers": {j: self.cores[j] for j in range(n) if j != i}}
                           for i in range(n)})

    def aggregate(self, uploads: dict[int, Upload]) -> dict[int, Payload]:
        states = self.trained_states(uploads)  # refuses bad uploads before any slot changes
        self.round += 1
        for i, state in states.items():
            self.cores[i] = state
        self.last_round_stats = {"round": self.round, "cores_updated": len(states)}
        return self._send_cores()


class AppleClient(FedAvgClient):
    """Trains its own core and its DR vector p_i through the personalized model sum_j p_ij theta_j."""

    def __init__(self, client_id: int, data: ClientData, model: AdapterModel, recipe: Recipe):
        super().__init__(client_id, data, model, recipe)
        self.args: AppleArgs = recipe.algorithm_args
        names = {id(p): name for name, p in model.named_parameters()}
        self.tensors = [(part, key, names[id(param)]) for part, key, param in trainable_by_key(model)]
        self.peers: dict[int, Core] = {}  # theta_j of every other client, as received this round
        self.p: torch.Tensor | None = None  # p_i [N]; set by the first payload (N = its peers + 1)
        self.p0: torch.Tensor | None = None

    @property
    def num_clients(self) -> int:
        return len(self.peers) + 1

    def receive(self, payload: Payload) -> None:
        super().receive(payload)  # own core -> self.state and self.received
        peers = payload.get("peers")
        if not isinstance(peers, dict):
            raise KeyError(f"client {self.client_id}: payload lacks 'peers', the other clients' cores")
        expected = set(range(len(peers) + 1)) - {self.client_id}
        if set(peers) != expected:
            raise KeyError(f"client {self.client_id}: peers {sorted(peers)} are not the clients {sorted(expected)}")
        if self.p is not None and len(self.p) != len(peers) + 1:
            raise ValueError(f"client {self.client_id}: {len(peers) + 1} cores received, p has {len(self.p)}")
        self.peers = peers
        if self.p is None:
            self.p0 = initial_p(self.num_clients)
            self.p = self.p0.clone()

    def cores(self) -> list[Core]:
        """theta_1..theta_N: the peers' as received, this client's own as it stands (``state``)."""
        return [self.state if j == self.client_id else self.peers[j] for j in range(self.num_clients)]

    def personalized(self) -> Core:
        """w_i = sum_j p_ij theta_j, tensor by tensor (no gradient)."""
        cores, p = self.cores(), self.p.tolist()
        return {part: {key: sum(p[j] * core[part][key] for j, core in enumerate(cores)) for key in self.state[part]}
                for part in self.shared_parts}

    def load(self) -> None:
        """Put the personalized model into the shared model: what this client evaluates."""
        mixed = self.personalized()
        self.model.set_lora_state(mixed["lora"])
        self.model.set_head_state(mixed["head"])

    def train(self, round_idx: int) -> Upload:
        """SGD on (theta_i, p_i) through w_i; uploads theta_i's delta (p_i stays here).

        ``last_train_stats``: ``train_loss`` is the personalized model's cross-entropy; ``p_self`` is p_ii after
        training, ``p_shift`` is ||p_i - p_i^(0)||, and ``proximal_coef`` is lambda(r) * mu this round."""
        args = self.recipe.train_args
        device = next(self.model.head.parameters()).device
        i = self.client_id
        own = {name: self.state[part][key].to(device).clone().requires_grad_(True)
               for part, key, name in self.tensors}
        # the others' cores stacked per tensor [N, ...], row i zero: w = p_i theta_i + sum_j p_j others[j]
        others = {name: torch.stack([torch.zeros_like(own[name]) if j == i else self.peers[j][part][key]
                                     .to(device) for j in range(self.num_clients)])
                  for part, key, name in self.tensors}
        p = self.p.to(device).clone().requires_grad_(True)
        p0 = self.p0.to(device)
        coef = proximal_coefficient(round_idx, args.comm_round, self.args)
        optimizer = torch.optim.SGD([{"params": list(own.values()), "lr": args.learning_rate,
                                      "weight_decay": args.weight_decay},
                                     {"params": [p], "lr": self.args.apple_p_lr, "weight_decay": 0.0}],
                                    momentum=args.momentum)
        scaler = loss_scaler(self.model)
        self.model.train()
        seen, loss_sum = 0, 0.0
        for _ in range(args.epochs):
            for batch in self.round_loader(round_idx):
                mixed = {name: p[i] * own[name] + torch.tensordot(p, others[name], dims=1) for name in own}
                logits = functional_call(self.model, mixed, (batch["pixel_values"].to(device),))
                loss = F.cross_entropy(logits, batch["labels"].to(device))
                objective = loss + coef * ((p - p0) ** 2).sum()
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(objective).backward()
                scaler.step(optimizer)
                scaler.update()
                seen += len(batch["labels"])
                loss_sum += loss.item() * len(batch["labels"])
        if not (math.isfinite(loss_sum) and torch.isfinite(p).all()):
            raise FloatingPointError(f"local training diverged (loss {loss_sum / max(seen, 1)}); lower "
                                     "train_args.learning_rate or algorithm_args.apple_p_lr")
        self.state = {part: {} for part in self.shared_parts}
        for part, key, name in self.tensors:
            self.state[part][key] = own[name].detach().cpu().clone()
        self.p = p.detach().cpu().clone()
        self.last_train_stats = {"train_loss": loss_sum / max(seen, 1), "p_self": float(self.p[i]),
                                 "p_shift": float((self.p - self.p0).norm()), "proximal_coef": coef}
        return self.upload()


METHOD = Method("APPLE", AppleServer, AppleClient, Args=AppleArgs,
                states_per_message=lambda n: n + 1)  # its core, N - 1 peers, 1 spare
