"""pFedLoRA, also called FedLoRA (Yi, Yu, Wang, Liu 2023, arXiv 2310.13283): model-heterogeneous personalized FL
in which each client's own model carries one small homogeneous low-rank adapter, and only the adapter is shared.

Adapted to this library (the paper's local models are CNNs of different widths trained from scratch):
- Heterogeneous local models: client i's backbone is the committed ViT cut to its first
  ``model_args.client_depths[i % len]`` encoder layers (the spec's "derive backbones of different depth from the
  committed one"), with its own head. The local model (every backbone weight and the head) starts from the
  pretrained weights, is trained by its client, and never leaves it.
- The homogeneous adapter: PEFT LoRA on the first min(client_depths) layers, which every client has, so every
  adapter has the same tensors and the same init. The paper's mu, the adapter's weight against the local model,
  is LoRA's scaling lora_alpha / r.
- Iterative learning, each round, from the global adapter received:
    1. adapter frozen, train the local model for ``pfedlora_model_epochs`` at ``pfedlora_model_lr``
       (the global knowledge flows into the local model);
    2. local model frozen, train the adapter for ``train_args.epochs`` at ``train_args.learning_rate``
       (the local knowledge flows into the adapter);
  then upload the adapter's delta. The server is FedAvg over adapters weighted by sample counts
  (FedAvgLocalHead's). Both phases share the round's seeded loader and train_args' momentum and weight decay.
- Evaluation: the received global adapter on the client's local model, the harness's convention (as FedRep).
- Cost: a round moves one adapter each way, where full-model sharing would move the whole local model;
  ``benchmarks/pfedlora_cost.py`` measures the bytes of both and the seconds of each phase.
Defaults are ours: one epoch per phase, as the recipes' one local epoch, and a rate for the full-weight phase
chosen on validation in the Omniglot recipe (which says how).
"""
from __future__ import annotations

from fedml_pfedseq.adapter_model import AdapterModel
from fedml_pfedseq.algorithm_args import PFedLoRAArgs
from fedml_pfedseq.config import Recipe
from fedml_pfedseq.data.federated import ClientData
from fedml_pfedseq.method import Method
from fedml_pfedseq.strategies.fedavg import Upload
from fedml_pfedseq.strategies.fedavg_local_head import FedAvgLocalHeadClient, FedAvgLocalHeadServer
from fedml_pfedseq.training import requires_grad, train_epochs


class PFedLoRAClient(FedAvgLocalHeadClient):
    """Keeps its own local model (backbone weights + head); trains it, then the shared adapter; uploads the adapter."""

    def __init__(self, client_id: int, data: ClientData, model: AdapterModel, recipe: Recipe):
        super().__init__(client_id, data, model, recipe)
        self.state["backbone"] = model.get_backbone_state()  # its depth's pretrained weights

    def load(self) -> None:
        super().load()
        self.model.set_backbone_state(self.state["backbone"])

    def train(self, round_idx: int) -> Upload:
        self.load()
        args, own = self.recipe.train_args, self.recipe.algorithm_args
        loader = self.round_loader(round_idx)
        adapter = self.model.lora_parameters()
        local_model = [*self.model.backbone_parameters().values(), *self.model.head.parameters()]
        with requires_grad(adapter, False), requires_grad(local_model, True):
            model_stats = train_epochs(self.model, loader, own.pfedlora_model_epochs, own.pfedlora_model_lr,
                                       args.momentum, args.weight_decay, parameters=local_model)
        with requires_grad(local_model, False):
            adapter_stats = train_epochs(self.model, loader, args.epochs, args.learning_rate, args.momentum,
                                         args.weight_decay, parameters=adapter)
        self.last_train_stats = {"model_train_loss": model_stats["train_loss"],
                                 "train_loss": adapter_stats["train_loss"]}
        self.state = {"lora": self.model.get_lora_state(), "head": self.model.get_head_state(),
                      "backbone": self.model.get_backbone_state()}
        return self.upload()


METHOD = Method("pFedLoRA", FedAvgLocalHeadServer, PFedLoRAClient, Args=PFedLoRAArgs)
