"""pFedMe (Dinh, Tran, Nguyen, NeurIPS 2020, "Personalized Federated Learning with Moreau Envelopes").

Each client i keeps a local copy w_i of the global model and a personalized model theta_i tied to it by the Moreau
envelope F_i(w) = min_theta f_i(theta) + lambda/2 ||theta - w||^2. One local step on a batch D:
    theta_i <- approx. argmin_theta f_i(theta; D) + lambda/2 ||theta - w_i||^2, by K gradient steps
               theta <- theta - personal_lr (grad f_i(theta; D) + lambda (theta - w_i))
    w_i     <- w_i - eta lambda (w_i - theta_i)     (lambda (w_i - theta_i) is the gradient of F_i at w_i)
The server mixes the sample-weighted average of the w_i with its previous model: w <- (1 - beta) w + beta avg_i w_i
(beta = 1 is FedAvg's average).

Adapted to federated adapter tuning as pFedSeq adapts every baseline: a model is the LoRA adapter plus the head on
the frozen ViT, so w, w_i and theta_i are (LoRA, head) pairs and the proximal term covers both.
- Server -> client i: the global (LoRA, head), the same for everyone (FedAvg's payload).
- Client -> server: the delta of w_i after the round w.r.t. the w received, with n_i (FedAvg's upload); the server
  rebuilds the w_i, averages them by sample counts and applies beta (``PFedMeServer``).
- Client state: ``personal`` (theta_i: LoRA + head), which never travels. ``evaluate`` reports theta_i, as the
  official code's evaluate_personalized_model does (the personalized model after the client's last local step; it
  evaluates it after training, here it is evaluated after the next payload arrives, which does not change it).
  Before the first round theta_i is the first global model received (the official personalized copy starts as the
  initial model), so round 0 evaluates the initial global model, as every method does.

Choices, following the official code (CharlieDinh/pFedMe: userpFedMe.py, pFedMeOptimizer, serverbase.py):
- Learning rates. The official ``learning_rate`` is eta, the rate of the w-update; FedAvg and pFedMe share it in the
  official scripts (0.005 for both), and with an exactly solved inner problem eta lambda (w_i - theta_i) =
  eta grad f_i(theta_i), so eta is the step the shared model takes along the loss, FedAvg's lr. Hence
  eta = train_args.learning_rate (the recipe's 0.5, as for every baseline). The inner steps take their own key,
  ``pfedme_personal_lr`` (official: ``personal_learning_rate``).
- Stability: the w-update moves w_i the fraction eta lambda of the way to theta_i, which overshoots theta_i for
  eta lambda >= 1; the inner steps contract theta - w_i by |1 - personal_lr lambda| and blow up for
  personal_lr lambda >= 2 (official: 0.09 * 15 = 1.35). Both are refused as recipe errors. The official lambda 15 at
  eta 0.5 would make eta lambda 7.5, so lambda defaults to 1: eta lambda = 0.5, the proximal strength of this
  project's Ditto recipe (Ditto's official lambda 1 at the same lr). ``pfedme_personal_lr`` defaults to 0.5, the
  recipe's rate for gradient steps on this model: the inner steps are the only steps on the cross-entropy (the
  official 0.09 is 18 eta, which at eta 0.5 would be 9 and diverge).
- Local steps: the official client takes ``local_epochs`` steps, each on the next batch of its loader (one batch,
  K inner steps, one w-update). Here one epoch is one pass over the round's shuffled batches (FedAvg's seeded
  ``round_loader``), one local step per batch, so a round sees each sample train_args.epochs times as in FedAvg,
  at K forward/backward passes per batch (pFedMe's inner cost).
- The inner problem of each step starts from the current personalized model (the previous step's theta_i), not
  from w_i; at the start of a round both theta and w_i are reset to the global model received (the official
  set_parameters copies the global into the model that holds theta and into the local w). theta_i at the end of
  the round is what is kept and evaluated.
- Inner steps are plain gradient steps, as pFedMeOptimizer's. Its extra ``mu * theta`` term (mu = 0.001, an L2
  penalty the paper's objective does not have) is left out, and train_args.momentum and weight_decay must be 0.
- K defaults to 5 and beta to 1, the official main.py defaults (the paper also reports runs with beta = 2); the
  official lambda 15, personal_learning_rate 0.09 and learning_rate 0.005 are main.py's / the scripts' values too.
No randomness beyond FedAvg's seeded shuffling, so the simulator and FedML parties match.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fedml_pfedseq.algorithm_args import PFedMeArgs
from fedml_pfedseq.config import Recipe
from fedml_pfedseq.lora_state import StateDict, add, subtract, weighted_average
from fedml_pfedseq.method import Method
from fedml_pfedseq.personal_model import PersonalModelClient
from fedml_pfedseq.strategies.fedavg import FedAvgServer, Payload, Upload
from fedml_pfedseq.training import proximal_term


class PFedMeServer(FedAvgServer):
    """FedAvg's sample-weighted average of the clients' local models, mixed with the previous global by beta."""

    def __init__(self, num_clients: int, initial_state: dict[str, StateDict], recipe: Recipe):
        super().__init__(num_clients, initial_state, recipe)
        self.beta = recipe.algorithm_args.pfedme_beta

    def aggregate(self, uploads: dict[int, Upload]) -> dict[int, Payload]:
        states = self.trained_states(uploads)
        weights = [uploads[i]["num_samples"] for i in states]
        new_state = {}
        for part in self.shared_parts:
            average = weighted_average([states[i][part] for i in states], weights)
            previous = self.global_state[part]
            new_state[part] = average if self.beta == 1 else add(previous, subtract(average, previous), self.beta)
        self.global_state = new_state
        return self._send({i: self.global_state for i in range(self.num_clients)})


class PFedMeClient(PersonalModelClient):
    """Solves the Moreau-envelope inner problem per batch (theta_i: ``personal``, kept and evaluated) and moves
    w_i (uploaded)."""

    def inner_steps(self, params: list[torch.nn.Parameter], local: list[torch.Tensor], batch: dict
                    ) -> tuple[float, float]:
        """K steps theta <- theta - personal_lr (grad CE(theta; batch) + lambda (theta - w_i)) on ``params`` (theta,
        in place), with w_i = ``local`` fixed; returns the cross-entropy at the first and at the last step."""
        device = next(self.model.head.parameters()).device
        x, y = batch["pixel_values"].to(device), batch["labels"].to(device)
        lam, lr = self.args.pfedme_lambda, self.args.pfedme_personal_lr
        losses = []
        for _ in range(self.args.pfedme_k):
            loss = F.cross_entropy(self.model(x), y)
            grads = torch.autograd.grad(loss + proximal_term(params, local, lam), params)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p -= lr * g
            losses.append(loss.item())
        return losses[0], losses[-1]

    def train(self, round_idx: int) -> Upload:
        """One local step per batch of this round's loader, train_args.epochs passes; uploads w_i's delta.

        ``last_train_stats``: ``train_loss`` is the personalized model's cross-entropy on each batch before its inner
        steps, ``inner_train_loss`` after K - 1 of them (the last step's starting point), both sample-weighted."""
        eta, lam = self.recipe.train_args.learning_rate, self.args.pfedme_lambda
        self._put(self.received)  # theta and w_i both start at the global model received
        params = self.model.trainable_parameters()
        local = [p.detach().clone() for p in params]  # w_i
        loader = self.round_loader(round_idx)
        self.model.train()
        seen, first_sum, last_sum = 0, 0.0, 0.0
        for _ in range(self.recipe.train_args.epochs):
            for batch in loader:
                first, last = self.inner_steps(params, local, batch)  # theta_i, warm-started from the last one
                with torch.no_grad():
                    for w, theta in zip(local, params, strict=True):
                        w -= eta * lam * (w - theta)
                n = len(batch["labels"])
                seen, first_sum, last_sum = seen + n, first_sum + first * n, last_sum + last * n
        if not math.isfinite(first_sum + last_sum):
            raise FloatingPointError(f"local training diverged (loss {first_sum / max(seen, 1)}); lower "
                                     "algorithm_args.pfedme_personal_lr or train_args.learning_rate")
        self.personal = self._trained()
        with torch.no_grad():
            for p, w in zip(params, local, strict=True):
                p.copy_(w)
        self.state = self._trained()
        self.last_train_stats = {"train_loss": first_sum / max(seen, 1), "inner_train_loss": last_sum / max(seen, 1)}
        return self.upload()


METHOD = Method("pFedMe", PFedMeServer, PFedMeClient, Args=PFedMeArgs)
