"""Ditto (Li et al., ICML 2021, "Ditto: Fair and robust federated learning through personalization").

Each client keeps two models: its copy of the global model w (trained as in FedAvg and averaged by the server) and
a personal model v_k that minimises F_k(v_k) + lambda/2 ||v_k - w^t||^2, by SGD steps
v_k <- v_k - eta (grad F_k(v_k) + lambda (v_k - w^t)) (paper Algorithm 1), where w^t is the global model received
this round.

Adapted to federated adapter tuning (pFedSeq paper, "Implementation Details"): a "model" is the LoRA adapter plus
the classification head on the frozen ViT, so both w and v_k are (LoRA, head) pairs and the proximal term covers
both.
- Server -> client i: the global (LoRA, head), the same for everyone (FedAvg's payload).
- Client -> server: the deltas of the global copy after local SGD, and the sample count (FedAvg's upload).
  The server averages them as in FedAvg, weighted by samples (``FedAvgServer``, which also refuses bad uploads).
- Client state: ``personal`` (v_k: LoRA + head), which never travels. It starts as the first global model the client
  receives (the official code starts every personal model from the initial global model). ``evaluate`` reports v_k,
  as the paper does.
Choices the paper leaves open, as the official code (litian96/ditto) makes them: the personal model takes one step
per step of the global copy, on the same batches (``ditto_personal_epochs: null`` = train_args.epochs passes over
the loader with the seed FedAvg uses); lambda defaults to 1, the official scripts' value. The two updates do not
depend on each other within a round (v_k's anchor is the w^t received, not the moving copy), so two passes over
the same batches equal the official code's interleaved steps. No randomness beyond FedAvg's seeded shuffling.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from fedml_pfedseq.adapter_model import AdapterModel
from fedml_pfedseq.algorithm_args import DittoArgs
from fedml_pfedseq.method import Method
from fedml_pfedseq.personal_model import PersonalModelClient
from fedml_pfedseq.strategies.fedavg import FedAvgServer, Upload
from fedml_pfedseq.training import proximal_term

ExtraLoss = Callable[[torch.Tensor, dict], torch.Tensor]


def trainable_tensors(model: AdapterModel) -> dict[str, torch.Tensor]:
    """Detached copies of the model's trainable parameters (LoRA + head) by parameter name."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


class DittoServer(FedAvgServer):
    """FedAvg on (LoRA, head): Ditto's global model is FedAvg's; personalization happens on the clients only."""


class DittoClient(PersonalModelClient):
    """Trains the global copy (uploaded, as in FedAvg) and the personal model v_k (kept here, evaluated)."""

    def personal_loss(self, anchor: dict[str, torch.Tensor]) -> ExtraLoss:
        """The personal model's regulariser mu/2 ||v - w^t||^2 (Ditto: mu = lambda), w^t = ``anchor`` by name."""
        params = dict(self.model.named_parameters())
        names = list(anchor)
        current, anchors = [params[n] for n in names], [anchor[n] for n in names]
        mu = self.args.proximal_mu
        return lambda logits, batch: proximal_term(current, anchors, mu)

    def train(self, round_idx: int) -> Upload:
        """The global copy by plain SGD (its delta is uploaded), then the personal model anchored at the w^t received.

        ``last_train_stats``: ``train_loss`` is the global copy's cross-entropy, ``personal_train_loss`` the personal
        model's."""
        epochs = self.recipe.train_args.epochs
        self._put(self.received)
        anchor = trainable_tensors(self.model)  # w^t, fixed for the whole round
        stats = self.sgd(round_idx, epochs)
        self.state = self._trained()
        self._put(self.personal)
        personal_stats = self.sgd(round_idx, self.args.personal_epochs or epochs, self.personal_loss(anchor))
        self.personal = self._trained()
        self.last_train_stats = {**stats, **{f"personal_{k}": v for k, v in personal_stats.items()}}
        return self.upload()


METHOD = Method("Ditto", DittoServer, DittoClient, Args=DittoArgs)
