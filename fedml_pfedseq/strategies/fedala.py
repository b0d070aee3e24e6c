"""FedALA (Zhang et al., AAAI 2023, "FedALA: Adaptive Local Aggregation for Personalized Federated Learning").

The server is FedAvg's. Each client does not simply overwrite its local model theta_l with the global theta_g it
receives. It forms theta_hat = theta_l + (theta_g - theta_l) * W, where W holds one weight in [0, 1] per element
(the paper's Adaptive Local Aggregation, ALA). It learns W on its own data with theta_l and theta_g fixed:
W <- clamp(W - eta * dL/dtheta_hat * (theta_g - theta_l), 0, 1), one SGD step per batch, recomputing theta_hat
after each step. Then it trains theta_hat locally as in FedAvg.

Adapted to federated adapter tuning (pFedSeq paper, "Implementation Details"): FedALA shares and averages the
whole model. Here the whole model is the LoRA adapter plus the head, so:
- Server -> client i: the global (LoRA, head), the same for everyone (FedAvg's payload).
- Client -> server: the deltas of theta_hat after local training, relative to the theta_g received, and the
  sample count (FedAvg's upload, so the server averages theta_hat's trained updates).
- Client state: theta_l (``state``, the model it trained last round) and W. Neither is sent anywhere.
  ``evaluate`` reports theta_hat, the locally aggregated model, as the official code does.

How the choices follow the official code (TsingZ0/FedALA):
- ``fedala_layer_idx`` counts the trainable tensors from the end of the model. Their order is the LoRA tensors
  layer by layer (A, B of each target module), then the head's weight and bias. ALA mixes only these tensors.
  Every tensor below them takes theta_g as is; the official code keeps all of the global model's updates in the
  lower layers. The official default 2 covers the classifier's weight and bias: here, the head. 6 would add the
  top block's four LoRA tensors.
- Each ALA draws ``fedala_rand_percent``% of the client's training samples at random, seeded by client and round.
  Batches are train_args.batch_size, unshuffled, with the model in eval mode. W starts at 1 (theta_hat = theta_g).
- Round 1 skips ALA: the client has not trained yet, so theta_l carries nothing. The official code skips it
  because the local and global models are still equal. The first ALA is the start phase. It runs epochs over the
  sample until the population std of the last ``fedala_num_pre_loss`` epoch losses falls below
  ``fedala_threshold``. An epoch's loss is the loss of its last batch. The official loop is unbounded; here it
  stops after ``fedala_max_start_epochs``. Every later ALA runs one epoch and starts from the W kept from before.
ALA runs in ``receive``: evaluation, which comes between ``receive`` and ``train``, must see theta_hat. The round
number it seeds the sample with is the count of payloads received, as in both engines.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fedml_pfedseq.adapter_model import AdapterModel
from fedml_pfedseq.algorithm_args import FedALAArgs
from fedml_pfedseq.config import Recipe, RecipeError
from fedml_pfedseq.data.federated import ClientData, client_seed
from fedml_pfedseq.lora_state import StateDict
from fedml_pfedseq.method import Method
from fedml_pfedseq.strategies.fedavg import FedAvgClient, FedAvgServer, Payload, Upload
from fedml_pfedseq.training import make_loader

Weights = dict[str, StateDict]  # W: {"lora"|"head": {key: tensor of weights in [0, 1]}}, covered tensors only


def trainable_by_key(model: AdapterModel) -> list[tuple[str, str, torch.nn.Parameter]]:
    """The model's trainable tensors in model order as (part, state key, parameter): LoRA layer by layer, then head.

    The state keys are the ones ``get_lora_state``/``get_head_state`` use (PEFT's, without the adapter name)."""
    lora_keys = set(model.get_lora_state())
    out = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("head."):
            out.append(("head", name.removeprefix("head."), param))
            continue
        key = name.removeprefix("backbone.").replace(".default.", ".")
        if key not in lora_keys:
            raise KeyError(f"trainable parameter {name!r} has no LoRA state key")
        out.append(("lora", key, param))
    return out


class FedALAClient(FedAvgClient):
    """Mixes the global model into its local one by learned element-wise weights, then trains as in FedAvg."""

    rebuilt = ("covered",)  # the model's live parameters, not state (checkpoint.py)

    def __init__(self, client_id: int, data: ClientData, model: AdapterModel, recipe: Recipe):
        super().__init__(client_id, data, model, recipe)
        self.args = recipe.algorithm_args
        trainable = trainable_by_key(model)
        if self.args.fedala_layer_idx > len(trainable):
            raise RecipeError(f"algorithm_args.fedala_layer_idx is {self.args.fedala_layer_idx} but the model has "
                              f"{len(trainable)} trainable tensors")
        self.covered = trainable[-self.args.fedala_layer_idx:]
        self.weights: Weights | None = None  # W; None until the first ALA (the start phase)
        self.payloads_received = 0
        self.last_ala_epochs = 0  # epochs over the sample that the last ALA ran

    def receive(self, payload: Payload) -> None:
        local = dict(self.state)  # FedAvg's receive updates ``state`` in place
        super().receive(payload)
        self.payloads_received += 1
        if self.payloads_received > 1:
            self.state = self.adaptive_local_aggregation(local, self.received, self.payloads_received)

    def ala_loader(self, round_idx: int) -> DataLoader:
        """``fedala_rand_percent``% of the training samples, drawn at random by client and round."""
        train = self.data.train
        count = max(1, int(len(train) * self.args.fedala_rand_percent / 100))
        seed = client_seed(self.recipe.common_args.random_seed, self.client_id, purpose=5000 + round_idx)
        indices = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:count]
        return make_loader(train.select(indices.tolist()), self.recipe.train_args.batch_size, shuffle=False)

    def adaptive_local_aggregation(self, local: dict[str, StateDict], global_: dict[str, StateDict],
                                   round_idx: int) -> dict[str, StateDict]:
        """theta_hat: theta_g below the covered tensors, theta_l + (theta_g - theta_l) * W on them, W learned here."""
        start_phase = self.weights is None
        if start_phase:
            self.weights = {part: {key: torch.ones_like(global_[part][key]) for part, key, _ in self.covered}
                            for part in {part for part, _, _ in self.covered}}
        diff = {(part, key): global_[part][key] - local[part][key] for part, key, _ in self.covered}
        self.model.set_lora_state(global_["lora"])
        self.model.set_head_state(global_["head"])
        self._mix(local, diff)
        self.model.eval()  # W is fitted to the model as it is evaluated (no dropout noise)
        device = next(self.model.head.parameters()).device
        params = [param for _, _, param in self.covered]
        losses: list[float] = []
        for _ in range(self.args.fedala_max_start_epochs if start_phase else 1):
            for batch in self.ala_loader(round_idx):
                logits = self.model(batch["pixel_values"].to(device))
                loss = F.cross_entropy(logits, batch["labels"].to(device))
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    for (part, key, _), grad in zip(self.covered, grads):
                        w = self.weights[part][key]
                        w.copy_(torch.clamp(w - self.args.fedala_eta * grad.cpu() * diff[part, key], 0, 1))
                self._mix(local, diff)
            losses.append(loss.item())
            recent = losses[-self.args.fedala_num_pre_loss:]
            if len(losses) > self.args.fedala_num_pre_loss and np.std(recent) < self.args.fedala_threshold:
                break
        self.last_ala_epochs = len(losses)
        return {"lora": self.model.get_lora_state(), "head": self.model.get_head_state()}

    @torch.no_grad()
    def _mix(self, local: dict[str, StateDict], diff: dict[tuple[str, str], torch.Tensor]) -> None:
        """Set the covered tensors of the model to theta_l + (theta_g - theta_l) * W."""
        for part, key, param in self.covered:
            param.copy_(local[part][key] + diff[part, key] * self.weights[part][key])

    def train(self, round_idx: int) -> Upload:
        """FedAvg's local training, from theta_hat; ``last_train_stats`` adds the epochs of this round's ALA."""
        upload = super().train(round_idx)
        self.last_train_stats["ala_epochs"] = self.last_ala_epochs
        return upload


METHOD = Method("FedALA", FedAvgServer, FedALAClient, Args=FedALAArgs)
