"""FedRep (Collins et al., ICML 2021): a shared representation averaged by FedAvg, and a head per client.

Adapted to federated adapter tuning as the pFedSeq paper adapts every baseline (frozen ViT, only LoRA and head
tuned): the representation is the ViT with its LoRA adapter, so the LoRA is what is shared and averaged (the server
is FedAvgLocalHead's, weighted by sample counts) and the head never leaves its client. Each round a client starts
from the global adapter it received and
  1. trains its head for ``fedrep_head_epochs`` epochs with the adapter frozen (default 10, the reference code's
     head epochs: local_ep 11 minus 1 representation epoch);
  2. then trains the adapter for ``train_args.epochs`` with the head frozen (the reference's 1 representation
     epoch, which is also pFedSeq's 1 local epoch);
and uploads the LoRA delta only. It is evaluated on the received global adapter with its own head (the head it fitted
last round), as the reference evaluates the global representation with each local head.

Freezing clears ``requires_grad``, as the reference does, so the head epochs backpropagate through the head alone
and cost about a forward pass each (still, 10 of them make a round's training ~5.5x FedAvgLocalHead's on CPU).
Both phases use train_args' SGD settings and one data loader per round (its shuffles continue across phases).
"""
from __future__ import annotations

from fedml_pfedseq.algorithm_args import FedRepArgs
from fedml_pfedseq.method import Method
from fedml_pfedseq.strategies.fedavg import Upload
from fedml_pfedseq.strategies.fedavg_local_head import FedAvgLocalHeadClient, FedAvgLocalHeadServer
from fedml_pfedseq.training import requires_grad, train_epochs


class FedRepClient(FedAvgLocalHeadClient):
    """Head epochs on the frozen received adapter, then adapter epochs under the new head; uploads the LoRA delta."""

    def train(self, round_idx: int) -> Upload:
        self.load()
        args = self.recipe.train_args
        loader = self.round_loader(round_idx)
        sgd = (args.learning_rate, args.momentum, args.weight_decay)
        head = list(self.model.head.parameters())
        adapter = self.model.lora_parameters()
        with requires_grad(adapter, False):
            head_stats = train_epochs(self.model, loader, self.recipe.algorithm_args.fedrep_head_epochs, *sgd,
                                      parameters=head)
        with requires_grad(head, False):
            adapter_stats = train_epochs(self.model, loader, args.epochs, *sgd, parameters=adapter)
        self.last_train_stats = {"head_train_loss": head_stats["train_loss"], "train_loss": adapter_stats["train_loss"]}
        self.state = {"lora": self.model.get_lora_state(), "head": self.model.get_head_state()}
        return self.upload()


METHOD = Method("FedRep", FedAvgLocalHeadServer, FedRepClient, Args=FedRepArgs)
