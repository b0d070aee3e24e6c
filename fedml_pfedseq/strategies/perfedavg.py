"""Per-FedAvg (Fallah, Mokhtari, Ozdaglar, NeurIPS 2020), first-order variant (Per-FedAvg (FO)).

The global model is a meta-model theta: the starting point from which one gradient step on a client's own data
gives a good personal model, min_theta sum_i f_i(theta - alpha grad f_i(theta)). Local training takes, per pair of
batches (D, D'),
    temp  = theta - alpha * grad L_D(theta)           (inner step, alpha = ``perfedavg_alpha``)
    theta = theta - beta  * grad L_D'(temp)           (outer step, beta = train_args.learning_rate)
The first-order variant uses the gradient at temp as it is, dropping the Hessian term
(I - alpha hess L(theta)) of the exact meta-gradient; the Hessian-free variant is not implemented.

Adapted to federated adapter tuning as pFedSeq adapts every baseline: theta is the LoRA adapter plus the head on
the frozen ViT, and the server is FedAvg's (the same meta-model for all, averaged by sample counts).
- Server -> client: the global (LoRA, head); client -> server: the delta of the meta-model theta (never of an
  adapted model) w.r.t. what it received, with n_i (FedAvg's payload and upload: one round trip).
- Pairs: consecutive batches of this round's shuffled loader, ceil(epochs * batches / 2) pair-steps, restarting
  the loader when it runs out, so each sample is seen about once per epoch (a client with a single batch pairs it
  with the next shuffle of itself). The outer step is train_args' SGD (momentum, weight decay); the inner is plain.
- Evaluation is the paper's personalization: from the meta-model, one alpha-step on one batch of the client's
  training data (train_args.batch_size, drawn with seed ``client_seed(seed, i, 6000 + t)`` for the t-th payload
  received, the same in both engines), then the adapted model is evaluated; the meta-model is kept unchanged.
- alpha defaults to 0.01, FLGo's Per-FedAvg default (which, like here, takes beta from the learning rate).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import islice

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fedml_pfedseq.adapter_model import AdapterModel
from fedml_pfedseq.algorithm_args import PerFedAvgArgs
from fedml_pfedseq.config import Recipe
from fedml_pfedseq.data.federated import ClientData, client_seed
from fedml_pfedseq.method import Method
from fedml_pfedseq.strategies.fedavg import FedAvgClient, FedAvgServer, Payload, Upload
from fedml_pfedseq.training import make_loader


def cycle(loader: DataLoader) -> Iterator[dict]:
    """The loader's batches, pass after pass (each pass reshuffles from the loader's seeded generator)."""
    while True:
        yield from loader


def batch_loss(model: AdapterModel, batch: dict) -> torch.Tensor:
    device = next(model.head.parameters()).device
    return F.cross_entropy(model(batch["pixel_values"].to(device)), batch["labels"].to(device))


def adapt_step(model: AdapterModel, batch: dict, alpha: float) -> torch.Tensor:
    """theta <- theta - alpha * grad L_batch(theta) on the trainable parameters, in place; returns L_batch(theta)."""
    params = model.trainable_parameters()
    loss = batch_loss(model, batch)
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p -= alpha * g
    return loss.detach()


class PerFedAvgClient(FedAvgClient):
    """Trains the meta-model by first-order MAML pair-steps; evaluates it after one adaptation step."""

    def __init__(self, client_id: int, data: ClientData, model: AdapterModel, recipe: Recipe):
        super().__init__(client_id, data, model, recipe)
        self.alpha = recipe.algorithm_args.perfedavg_alpha
        self.payloads_received = 0  # names the evaluation's adaptation batch (the round it evaluates)

    def receive(self, payload: Payload) -> None:
        super().receive(payload)
        self.payloads_received += 1

    def adaptation_batch(self) -> dict:
        """The batch of the evaluation's alpha-step: seeded by client and payload count, so reruns match."""
        seed = client_seed(self.recipe.common_args.random_seed, self.client_id,
                           purpose=6000 + self.payloads_received - 1)
        return next(iter(make_loader(self.data.train, self.recipe.train_args.batch_size, shuffle=True, seed=seed)))

    def load(self) -> None:
        """Put the adapted model into the shared model: the meta-model after one alpha-step (what is evaluated)."""
        super().load()
        self.model.train()  # the mode local training steps in; evaluation switches to eval afterwards
        adapt_step(self.model, self.adaptation_batch(), self.alpha)

    def train(self, round_idx: int) -> Upload:
        """ceil(epochs * batches / 2) first-order MAML steps on the meta-model; uploads its delta.

        ``last_train_stats``: ``train_loss`` is the meta-model's loss on the D batches, ``adapted_train_loss`` the
        adapted model's on the D' batches (the meta-objective)."""
        super().load()
        args = self.recipe.train_args
        loader = self.round_loader(round_idx)
        steps = math.ceil(args.epochs * len(loader) / 2)
        params = self.model.trainable_parameters()
        outer = torch.optim.SGD(params, lr=args.learning_rate, momentum=args.momentum, weight_decay=args.weight_decay)
        self.model.train()
        batches = cycle(loader)
        inner_sum, outer_sum = 0.0, 0.0
        for _ in range(steps):
            d, d_prime = islice(batches, 2)
            theta = [p.detach().clone() for p in params]
            inner_sum += adapt_step(self.model, d, self.alpha).item()
            loss = batch_loss(self.model, d_prime)
            outer.zero_grad(set_to_none=True)
            loss.backward()  # grad L_D'(temp): the first-order meta-gradient
            with torch.no_grad():
                for p, t in zip(params, theta, strict=True):
                    p.copy_(t)
            outer.step()
            outer_sum += loss.item()
        n = max(steps, 1)
        if not math.isfinite(inner_sum + outer_sum):
            raise FloatingPointError(f"local training diverged (loss {outer_sum / n}); lower "
                                     "train_args.learning_rate or algorithm_args.perfedavg_alpha")
        self.last_train_stats = {"train_loss": inner_sum / n, "adapted_train_loss": outer_sum / n}
        self.state = {"lora": self.model.get_lora_state(), "head": self.model.get_head_state()}
        return self.upload()


METHOD = Method("PerFedAvg", FedAvgServer, PerFedAvgClient, Args=PerFedAvgArgs)
