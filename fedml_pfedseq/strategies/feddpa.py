"""FedDPA, the dual-personalizing adapter (Yang et al., NeurIPS 2024), in its iterative form FedDPA-T.

Each client holds two LoRA adapters on the frozen backbone: the global one, trained and averaged as in FedAvg, and
a local one that never travels. An adapted layer computes W0 x + (1 - alpha) s B_g A_g x + alpha s B_l A_l x.
- Training, each round: from the second round a client trains on (the paper's code: ``epoch > 0``), first its local
  adapter with the global one frozen, at alpha = 1 - ``local_weight`` (0.5); then the global adapter alone, whose
  delta it uploads. The server is FedAvg's on the adapter.
- Evaluation, per instance: alpha = w * the mean cosine similarity between the instance's features and those of
  ``reference_instances`` (k = 5) of the client's training instances drawn at random, both computed with the local
  adapter alone (w = ``instance_weight_scale``, 0.5). An instance like the client's own data leans on the local
  adapter, an unfamiliar one on the global.

Adapted to this harness as the pFedSeq paper adapts its baselines (frozen ViT, LoRA and head tuned): the head is the
client's own, trained in both phases (the paper's language models have no task head); the features are the [CLS]
features the head reads (the paper's code: the last token's last hidden state). The local adapter is PEFT's second
adapter (``LOCAL``) of the one model: both are active together and a forward hook on each lora_B scales its output
per instance. The local adapter starts from PEFT's initialisation (B = 0), seeded per client. Each client's folder in
``adapters/`` holds the global adapter as PEFT's default and the local one in ``local/`` (PEFT's layout for a
second adapter); the weighting rule is ``mixed_adapters`` with ``instance_weights``.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from fedml_pfedseq.adapter_model import AdapterModel
from fedml_pfedseq.algorithm_args import FedDPAArgs
from fedml_pfedseq.config import Recipe
from fedml_pfedseq.data.federated import ClientData, client_seed
from fedml_pfedseq.lora_state import StateDict
from fedml_pfedseq.method import Method
from fedml_pfedseq.strategies.fedavg import Upload
from fedml_pfedseq.strategies.fedavg_local_head import FedAvgLocalHeadClient, FedAvgLocalHeadServer
from fedml_pfedseq.training import evaluate_model, make_loader, requires_grad

GLOBAL, LOCAL = "default", "local"  # PEFT adapter names: the one every method trains, FedDPA's second


@contextmanager
def mixed_adapters(backbone, weights: dict[str, float | torch.Tensor]) -> Iterator[None]:
    """Inside the block the adapters named in ``weights`` are active together (PEFT adds their outputs), each
    adapter's LoRA output scaled by its weight: a number, or one per instance [batch]. PEFT makes active adapters
    trainable; the block ends with the global adapter alone active (and trainable), as every other method has it."""
    def scale(weight):
        def hook(module, inputs, output):
            return output * (weight.view(-1, *[1] * (output.dim() - 1)) if torch.is_tensor(weight) else weight)
        return hook

    backbone.base_model.set_adapter(list(weights))
    handles = [layer.lora_B[name].register_forward_hook(scale(weight))
               for layer in backbone.modules() if isinstance(layer, LoraLayer) for name, weight in weights.items()
               if torch.is_tensor(weight) or weight != 1]  # a weight of 1 is PEFT's own output
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        backbone.base_model.set_adapter(GLOBAL)


def instance_weights(features: torch.Tensor, references: torch.Tensor, picks: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """alpha [batch] = scale * mean_j cos(features_b, references[picks[b, j]]): features [batch, h], references
    [n, h], picks [batch, k] (indices into references)."""
    return scale * F.cosine_similarity(features[:, None], references[picks], dim=-1).mean(1)


class InstanceWeightedModel(nn.Module):
    """The model FedDPA evaluates: per instance, alpha from the local adapter's features against ``references``
    (training instances' features) drawn by ``generator``, then the two adapters mixed by alpha."""

    def __init__(self, model: AdapterModel, references: torch.Tensor, args: FedDPAArgs, generator: torch.Generator):
        super().__init__()
        self.model, self.head = model, model.head  # evaluate_model reads the device from the head
        self.references, self.args, self.generator = references, args, generator

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        backbone = self.model.backbone
        with mixed_adapters(backbone, {LOCAL: 1.0}):
            features = self.model.features(pixel_values)
        picks = torch.randint(len(self.references), (len(pixel_values), self.args.reference_instances),
                              generator=self.generator).to(features.device)
        alpha = instance_weights(features, self.references, picks, self.args.instance_weight_scale)
        with mixed_adapters(backbone, {GLOBAL: 1 - alpha, LOCAL: alpha}):
            return self.model(pixel_values)


class FedDPAClient(FedAvgLocalHeadClient):
    """FedAvg's client with a local head, plus ``local`` (its own adapter, never uploaded)."""

    def __init__(self, client_id: int, data: ClientData, model: AdapterModel, recipe: Recipe):
        super().__init__(client_id, data, model, recipe)
        self.args: FedDPAArgs = recipe.algorithm_args
        backbone = model.backbone
        if LOCAL not in backbone.peft_config:  # one model serves many clients: its second adapter is added once
            backbone.add_adapter(LOCAL, backbone.peft_config[GLOBAL])
            backbone.base_model.set_adapter(GLOBAL)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(client_seed(recipe.common_args.random_seed, client_id, purpose=11))
            for layer in backbone.modules():
                if isinstance(layer, LoraLayer):
                    layer.reset_lora_parameters(LOCAL, True)  # PEFT's init: A random, B = 0
        self.local: StateDict = self._local_state()
        self.rounds_trained = 0

    def _local_state(self) -> StateDict:
        return {k: v.detach().cpu().clone()
                for k, v in get_peft_model_state_dict(self.model.backbone, adapter_name=LOCAL).items()}

    def load(self) -> None:
        super().load()
        set_peft_model_state_dict(self.model.backbone, self.local, adapter_name=LOCAL)

    def train(self, round_idx: int) -> Upload:
        """The local adapter (from the second round this client trains), then the global one on the same batches;
        the head trains in both. ``last_train_stats``: the global phase's ``train_loss``, the local's
        ``local_train_loss``."""
        self.load()
        backbone = self.model.backbone
        stats = {}
        if self.rounds_trained:
            global_lora = [p for name, p in backbone.named_parameters() if ".lora_" in name and f".{GLOBAL}." in name]
            with (mixed_adapters(backbone, {GLOBAL: self.args.local_weight, LOCAL: 1 - self.args.local_weight}),
                  requires_grad(global_lora, False)):
                stats = {f"local_{k}": v for k, v in self.sgd(round_idx).items()}
            self.local = self._local_state()
        stats.update(self.sgd(round_idx))
        self.state = {"lora": self.model.get_lora_state(), "head": self.model.get_head_state()}
        self.rounds_trained += 1
        self.last_train_stats = stats
        return self.upload()

    @torch.no_grad()
    def _reference_features(self) -> torch.Tensor:
        """The local adapter's features of every training instance [n, hidden] (the pool the references are drawn
        from)."""
        loader = make_loader(self.data.train, self.recipe.validation_args.eval_batch_size, shuffle=False,
                             workers=self.loader_workers)
        device = self.model.head.weight.device
        self.model.eval()
        with mixed_adapters(self.model.backbone, {LOCAL: 1.0}):
            return torch.cat([self.model.features(batch["pixel_values"].to(device)) for batch in loader])

    def evaluate(self, splits: tuple[str, ...] = ("validation", "test")) -> dict[str, float]:
        """Each split with the adapters mixed per instance; the references are drawn from a generator seeded by the
        client, so every evaluation draws the same."""
        self.load()
        references = self._reference_features()
        out = {}
        for split in splits:
            generator = torch.Generator().manual_seed(client_seed(self.recipe.common_args.random_seed, self.client_id,
                                                                  purpose=12))
            model = InstanceWeightedModel(self.model, references, self.args, generator)
            loader = make_loader(getattr(self.data, split), self.recipe.validation_args.eval_batch_size,
                                 shuffle=False, workers=self.loader_workers)
            out.update({f"{split}_{key}": value for key, value in evaluate_model(model, loader).items()})
        return out


METHOD = Method("FedDPA", FedAvgLocalHeadServer, FedDPAClient, Args=FedDPAArgs)
