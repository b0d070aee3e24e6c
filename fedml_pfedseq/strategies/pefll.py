"""PeFLL (Scott, Zakerinia, Lampert, ICLR 2024) on federated adapter tuning: pFedHN's hypernetwork, with its
input computed by each client from its own data instead of learnt per client id.

An embedding network psi maps each training sample (x, y) to a vector; the client's descriptor d_i [E] is the mean
over its training samples (PeFLL's descriptor; labels included, PeFLL's default). x enters as the frozen backbone's
[CLS] features with LoRA disabled, in place of PeFLL's CNN embedder on pixels: they do not change as adapters
train, so they are computed once and a descriptor depends on psi alone. psi is PeFLL's MLP embedder (3 Linear
layers, width 20, onto E). The hypernetwork maps d_i to theta_i exactly as pFedHN's maps v_i (theta^0 plus
zero-initialised heads; the head stays local). d_i is not rescaled (the official code divides by statistics of
its first descriptor).

One round trip per round, pipelined (everything not said here is pFedHN's: Adam, lr 1e-3, one summed surrogate):
  round t, client i: receives theta_i^t = h_phi(d_i^{t-1}), psi^t and, from round 3, the descriptor update
      u_i = -dL/d(d_i^{t-2}) (how its update asks the descriptor to move, as Delta does for the adapter); trains
      theta_i^t -> Delta_i^t; computes d_i^t = mean psi^t(x, y); turns u_i into psi's gradient with
      ``update_proxy_gradient`` through psi^{t-2}, the network it computed d_i^{t-2} with, on its own data; uploads
      Delta_i^t, d_i^t and that gradient.
  server: the proxy gradient of sum_i <h_phi(d_i^{t-1}), -Delta_i^t> gives phi's gradient and each descriptor's
      (u_i, sent with the next payload); psi's gradient is the sum of the uploaded ones (the same surrogate);
      one Adam step on phi and psi; theta_i^{t+1} = h_phi(d_i^t).
So psi learns from the same feedback as phi, one round later, at the psi each descriptor was made with (the
client keeps the last two). Round 1's adapters come from d = 0 (no descriptor exists yet) and get no update.
With client sampling (K of N per round, as PeFLL samples), "the previous round" of a client is the last one it took
part in: the server keeps each client's latest descriptor and its pending update until the client next reports;
an absent client adds nothing to the step (a zero Delta) and its descriptor and pending update stay as they were.
What travels: server -> client i {"client_id", "lora": theta_i, "embedding_net": psi, "descriptor_update":
{"round", "update" [E]}}; client -> server {"client_id", "num_samples", "lora": Delta_i, "descriptor" [E],
"embedding_grad": psi's gradient}. The server never sees a sample, only means of embeddings and gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedml_pfedseq.adapter_model import AdapterModel
from fedml_pfedseq.algorithm_args import PeFLLArgs
from fedml_pfedseq.config import Recipe
from fedml_pfedseq.data.federated import ClientData
from fedml_pfedseq.hypernetwork import mlp
from fedml_pfedseq.lora_state import StateDict, check_finite
from fedml_pfedseq.method import Method
from fedml_pfedseq.models.seq_learner import update_proxy_gradient
from fedml_pfedseq.strategies.fedavg import Payload, Upload
from fedml_pfedseq.strategies.pfedhn import PFedHNClient, PFedHNServer
from fedml_pfedseq.training import make_loader


def embedding_network(feature_dim: int, num_labels: int, args: PeFLLArgs) -> nn.Sequential:
    """psi: [features | one-hot label] [n, H + C] -> embeddings [n, E]; built alike by the server and clients."""
    hidden = [args.pefll_embed_hidden_dim] * (args.pefll_embed_layers - 1)
    return mlp([feature_dim + num_labels, *hidden, args.hn_embedding_dim])


class PeFLLServer(PFedHNServer):
    """pFedHN's server with client descriptors as inputs and an embedding network trained from clients' gradients."""

    def __init__(self, num_clients: int, initial_state: dict[str, StateDict], recipe: Recipe):
        super().__init__(num_clients, initial_state, recipe)
        self.embedding_net: nn.Sequential = self.networks["embedding_net"]
        self.descriptors = torch.zeros(num_clients, self.args.hn_embedding_dim, device=self.device)  # [N, E]
        self.descriptor_rounds: list[int | None] = [None] * num_clients  # when each was computed; None: the zeros
        self.descriptor_updates: dict[int, dict] = {}  # client -> {"round", "update" [E]} for its next payload

    def _input_networks(self, num_clients: int, initial_state: dict[str, StateDict]) -> dict[str, nn.Module]:
        """The embedding network; its input size comes from the initial head [C, H]."""
        num_labels, feature_dim = initial_state["head"]["weight"].shape
        return {"embedding_net": embedding_network(feature_dim, num_labels, self.args)}

    def _inputs(self) -> torch.Tensor:
        return self.descriptors.detach().requires_grad_()  # a leaf, for the descriptors' gradient

    def _payloads(self, generated: torch.Tensor) -> dict[int, dict]:
        payloads = super()._payloads(generated)
        psi = {k: v.detach().cpu().clone() for k, v in self.embedding_net.state_dict().items()}  # one for all
        for i, payload in payloads.items():
            payload["embedding_net"] = psi
            if i in self.descriptor_updates:
                payload["descriptor_update"] = self.descriptor_updates[i]
        return payloads

    def _check_uploads(self, uploads: dict[int, Upload]) -> None:
        """Each upload carries a finite descriptor [E] and, where a descriptor update was sent, psi's gradient."""
        size = self.args.hn_embedding_dim
        params = dict(self.embedding_net.named_parameters())
        for i, upload in uploads.items():
            descriptor = upload.get("descriptor")
            if not isinstance(descriptor, torch.Tensor) or descriptor.shape != (size,):
                raise ValueError(f"client {i}: upload needs a descriptor of shape ({size},), got {descriptor!r}")
            check_finite({"descriptor": descriptor}, f"client {i} descriptor")
            if i in self.descriptor_updates:
                grad = upload.get("embedding_grad")
                if not isinstance(grad, dict) or grad.keys() != params.keys() or any(
                        grad[k].shape != p.shape for k, p in params.items()):
                    raise KeyError(f"client {i}: upload lacks the embedding-network gradient for its round-"
                                   f"{self.descriptor_updates[i]['round']} descriptor, or its keys or shapes differ")
                check_finite(grad, f"client {i} embedding_grad")

    def _apply_input_gradient(self, input_grad: torch.Tensor, uploads: dict[int, Upload]) -> None:
        """psi's gradient: the sum of the reporting clients' (the same surrogate as phi's); then, for each client
        that reported, the update -dL/d(d_i) of the descriptor its adapter came from, for its next payload (none
        for round 1's zeros). An absent client keeps its pending update: its zero Delta says nothing."""
        answered = sorted(i for i in self.descriptor_updates if i in uploads)  # asked for psi's gradient, reported
        for name, p in self.embedding_net.named_parameters():
            p.grad = (torch.stack([uploads[i]["embedding_grad"][name] for i in answered]).sum(0).to(self.device)
                      if answered else None)
        for i in uploads:
            if (computed := self.descriptor_rounds[i]) is not None:
                self.descriptor_updates[i] = {"round": computed, "update": -input_grad[i].detach().cpu()}

    def _accept_inputs(self, uploads: dict[int, Upload]) -> None:
        """The reporting clients' new descriptors; the others' stay."""
        for i, upload in uploads.items():
            self.descriptors[i] = upload["descriptor"].to(self.device)
            self.descriptor_rounds[i] = self.round


class PeFLLClient(PFedHNClient):
    """pFedHN's client plus its descriptor and, from round 3, the embedding network's gradient on its own data."""

    def __init__(self, client_id: int, data: ClientData, model: AdapterModel, recipe: Recipe):
        super().__init__(client_id, data, model, recipe)
        self.device = next(model.head.parameters()).device
        with torch.random.fork_rng(devices=[]):  # its weights always come from the server: leave the RNG as it was
            self.embedding_net = embedding_network(model.head.in_features, model.head.out_features,
                                                   recipe.algorithm_args).to(self.device)
        self.received_net: StateDict = {}  # psi^t of the last payload
        self.descriptor_update: dict | None = None
        self.used_nets: dict[int, StateDict] = {}  # round -> the psi that round's descriptor was computed with
        self.features: torch.Tensor | None = None  # [n, H + C], computed once

    def receive(self, payload: Payload) -> None:
        super().receive(payload)
        if "embedding_net" not in payload:
            raise KeyError(f"client {self.client_id}: payload lacks 'embedding_net'; PeFLL sends it every round")
        self.received_net = payload["embedding_net"]
        self.descriptor_update = payload.get("descriptor_update")

    def train(self, round_idx: int) -> Upload:
        upload = super().train(round_idx)
        with torch.no_grad():
            upload["descriptor"] = self.describe(self.received_net).cpu()
        self.used_nets[round_idx] = self.received_net
        if self.descriptor_update is not None:
            upload["embedding_grad"] = self.embedding_gradient(self.descriptor_update)
        return upload

    def descriptor_inputs(self) -> torch.Tensor:
        """[n, H + C]: each training sample's frozen [CLS] features (LoRA disabled) and one-hot label."""
        if self.features is None:
            self.model.eval()
            batches = make_loader(self.data.train, self.recipe.validation_args.eval_batch_size, shuffle=False)
            rows = []
            with torch.no_grad(), self.model.backbone.disable_adapter():
                for batch in batches:
                    features = self.model.backbone(pixel_values=batch["pixel_values"].to(self.device)).logits
                    labels = F.one_hot(batch["labels"].to(self.device), self.model.head.out_features)
                    rows.append(torch.cat([features, labels.to(features.dtype)], dim=1))
            self.features = torch.cat(rows)
        return self.features

    def describe(self, net_state: StateDict) -> torch.Tensor:
        """The descriptor [E]: the mean over training samples of psi's embedding."""
        self.embedding_net.load_state_dict(net_state)
        return self.embedding_net(self.descriptor_inputs()).mean(0)

    def embedding_gradient(self, message: dict) -> StateDict:
        """psi's gradient (d d_i / d psi)^T dL/d(d_i) for the descriptor of round ``message["round"]``, at the psi it
        was computed with; the descriptor update u = -dL/d(d_i) plays the role of the update."""
        computed = message["round"]
        if computed not in self.used_nets:
            raise KeyError(f"client {self.client_id}: descriptor update for round {computed}, whose embedding "
                           f"network it no longer holds (holds rounds {sorted(self.used_nets)})")
        descriptor = self.describe(self.used_nets[computed])
        self.used_nets = {r: state for r, state in self.used_nets.items() if r > computed}
        names, params = zip(*self.embedding_net.named_parameters())
        grads = update_proxy_gradient(descriptor, list(params), message["update"].to(self.device))
        return {name: grad.detach().cpu() for name, grad in zip(names, grads)}


METHOD = Method("PeFLL", PeFLLServer, PeFLLClient, Args=PeFLLArgs)
