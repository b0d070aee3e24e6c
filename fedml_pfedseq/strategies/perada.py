"""PerAda (Xie et al., CVPR 2024, "PerAda: Parameter-Efficient Federated Learning Personalization with
Generalization Guarantees"): Ditto's two models per client on adapters, plus knowledge distillation.

The original (NVlabs/PerAda) trains, on each client, a personal adapter v_k with CE + lambda ||v_k - w^t||^2
(anchored at the global adapter w^t received this round) and a local copy of the global adapter with CE; the server
averages the copies and then, in early rounds, distils the ensemble of the clients' adapters into the global adapter
on an auxiliary unlabeled public data set (e.g. CIFAR-100 for CIFAR-10), early-stopped on server-side validation data.

Adapted to this setting: there is no server-side data, and the server must never see a client's. So, as pFedSeq's
related work and this project's issue describe the method ("proximal regularization similar to Ditto, while
further incorporating knowledge distillation"), the distillation runs where data is, on the client, and in the
direction the client can compute: the global model w^t received this round (frozen) is the teacher, the personal
model the student, on the client's own training batches. The personal model minimises

    CE(v_k) + lambda ||v_k - w^t||^2 + beta KL(softmax(z_w / T) || softmax(z_v / T))

(the official code's penalty, without Ditto's 1/2, and its divergence: batch-mean KL, no T^2 factor). The global
model is FedAvg's (the official "nokd" aggregation), as in Ditto.
- What travels, where state lives: as in Ditto (global (LoRA, head) down; its deltas and the sample count up; the
  personal (LoRA, head) stays on the client, starts as the first global model, and is what ``evaluate`` reports).
- Defaults: lambda = 1 (official CIFAR-10 and CheXpert scripts; Office-Home uses 0.1), T = 1 (official
  kd_KL_temperature), beta = 1 (the paper has no client-side KD weight; 1 weighs the KL as its server KD does).
- The teacher's logits come from the same frozen backbone with w^t's LoRA and head swapped in for one no-grad,
  eval-mode forward per batch (``torch.func.functional_call``); the personal parameters being trained are untouched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from fedml_pfedseq.algorithm_args import PerAdaArgs
from fedml_pfedseq.method import Method
from fedml_pfedseq.strategies.ditto import DittoClient, DittoServer, ExtraLoss


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                    F.log_softmax(teacher_logits / temperature, dim=-1), reduction="batchmean", log_target=True)


class PerAdaServer(DittoServer):
    """FedAvg on (LoRA, head): the original's server-side distillation needs data this setting has not (see above)."""


class PerAdaClient(DittoClient):
    """Ditto's client whose personal model also distils the global model received this round."""

    def personal_loss(self, anchor: dict[str, torch.Tensor]) -> ExtraLoss:
        proximal = super().personal_loss(anchor)
        weight, temperature = self.args.perada_kd_weight, self.args.perada_kd_temperature

        def loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
            self.model.eval()
            with torch.no_grad():
                teacher = functional_call(self.model, anchor, (batch["pixel_values"].to(logits.device),))
            self.model.train()
            return proximal(logits, batch) + weight * distillation_loss(logits, teacher, temperature)

        return loss


METHOD = Method("PerAda", PerAdaServer, PerAdaClient, Args=PerAdaArgs)
