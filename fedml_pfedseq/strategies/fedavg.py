"""FedAvg (McMahan et al. 2017) on the LoRA adapter and the head: the base every other method overrides.

What travels is declared by ``shared_parts``: the server sends client i a payload {"client_id", part: state...}
and the client answers with an upload {"client_id", "num_samples", part: delta...} where each delta is what local
training changed in that part. The server keeps what it sent, so it rebuilds each client's trained state as
sent + delta (spec, round step 2) and averages them weighted by sample counts (eq. 1). ``lora_factors`` narrows the
"lora" part to some of LoRA's factors (FFA-LoRA sends B only, FedSA-LoRA A only): the others stay where they are,
the server's in its global state, each client's in its own.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from fedml_pfedseq.adapter_model import AdapterModel
from fedml_pfedseq.config import Recipe
from fedml_pfedseq.data.federated import ClientData, client_seed
from fedml_pfedseq.lora_state import StateDict, add, check_finite, lora_factors, subtract, weighted_average
from fedml_pfedseq.method import Method
from fedml_pfedseq.training import evaluate_model, loader_workers, make_loader, train_epochs

Payload = dict  # {"client_id": int, "<part>": StateDict, ...}: what the server sends one client
Upload = dict  # {"client_id": int, "num_samples": int, "<part>": StateDict delta, ...}: what a client sends


class FedAvgServer:
    """Averages every shared part and sends the same global state to all clients."""

    shared_parts: tuple[str, ...] = ("lora", "head")
    lora_factors: tuple[str, ...] = ("A", "B")  # the LoRA factors that travel in the "lora" part
    global_adapter = True  # global_state["lora"] is the clients' aggregate (saved and pushed as adapters/global)

    def __init__(self, num_clients: int, initial_state: dict[str, StateDict], recipe: Recipe):
        self.num_clients = num_clients
        self.recipe = recipe
        self.global_state = {part: initial_state[part] for part in self.shared_parts}
        self.sent: dict[int, Payload] = {}
        self.last_round_stats: dict[str, float] = {}  # server-side measurements of the last round, if any

    def initial_payloads(self) -> dict[int, Payload]:
        return self._send({i: self.global_state for i in range(self.num_clients)})

    def _send(self, states: dict[int, dict[str, StateDict]]) -> dict[int, Payload]:
        """Record what each client gets (to rebuild its trained state later) and wrap it as payloads: of the "lora"
        part, the factors that travel."""
        self.sent = {i: {"client_id": i, **{part: lora_factors(state, self.lora_factors) if part == "lora" else state
                                            for part, state in states[i].items()}} for i in states}
        return self.sent

    def check_upload(self, i: int, upload: Upload) -> None:
        """Refuse (ValueError/KeyError naming client i and the problem) an upload that must not reach the
        aggregate: another sender, a bad sample count, missing or unexpected keys, NaN/Inf, wrong shape or dtype."""
        if not isinstance(upload, dict) or upload.get("client_id") != i:
            raise ValueError(f"upload in slot {i} claims to come from client "
                             f"{upload.get('client_id') if isinstance(upload, dict) else upload!r}")
        if i not in self.sent:
            raise KeyError(f"client {i}: the server sent it nothing to train on")
        n = upload.get("num_samples")
        if type(n) is not int or n < 1:
            raise ValueError(f"client {i}: num_samples must be a positive int (it weights the average), got {n!r}")
        for part in self.shared_parts:
            if part not in upload:
                raise KeyError(f"client {i}: upload lacks {part!r}; this method expects {self.shared_parts}")
            if not isinstance(upload[part], dict) or upload[part].keys() != self.sent[i][part].keys():
                raise KeyError(f"client {i}: {part} update has keys that differ from what it was sent")
            for key, delta in upload[part].items():
                sent = self.sent[i][part][key]
                if not isinstance(delta, torch.Tensor) or delta.shape != sent.shape or delta.dtype != sent.dtype:
                    got = f"{delta.dtype} {tuple(delta.shape)}" if isinstance(delta, torch.Tensor) else repr(delta)
                    raise ValueError(f"client {i}: {part} update {key!r} is {got}, "  # broadcasting would hide it
                                     f"expected {sent.dtype} {tuple(sent.shape)}")
            check_finite(upload[part], f"client {i} {part} update")

    def trained_states(self, uploads: dict[int, Upload]) -> dict[int, dict[str, StateDict]]:
        """Each client's state after local training: what the server sent it plus the delta it reported (every
        upload checked first, so a bad one changes nothing)."""
        for i, upload in uploads.items():
            self.check_upload(i, upload)
        return {i: {part: add(self.sent[i][part], upload[part]) for part in self.shared_parts}
                for i, upload in uploads.items()}

    def lora_updates(self, uploads: dict[int, Upload]) -> list[StateDict]:
        """Every client's LoRA update in client order, zeros for a client that did not report: in the servers that
        step on sum_i <theta_i, -Delta_i> (proxy gradients), a zero update adds nothing, so an absent client drops
        out of that round's step."""
        zeros = {key: torch.zeros_like(value) for key, value in next(iter(uploads.values()))["lora"].items()}
        return [uploads[i]["lora"] if i in uploads else zeros for i in range(self.num_clients)]

    def aggregate(self, uploads: dict[int, Upload]) -> dict[int, Payload]:
        states = self.trained_states(uploads)
        weights = [uploads[i]["num_samples"] for i in states]
        self.global_state = {part: {**self.global_state[part], **weighted_average([states[i][part] for i in states],
                                                                                 weights)}
                             for part in self.shared_parts}  # what does not travel stays as it was
        return self._send({i: self.global_state for i in range(self.num_clients)})


    def save_artifacts(self, output_dir) -> None:
        """Write server-side models at the end of a run (FedAvg has none beyond the metrics)."""


class FedAvgClient:
    """Loads what it receives, evaluates it with its current head, trains LoRA + head, reports deltas."""

    shared_parts: tuple[str, ...] = ("lora", "head")
    lora_factors: tuple[str, ...] = ("A", "B")  # the LoRA factors that travel in the "lora" part (as its server's)

    def __init__(self, client_id: int, data: ClientData, model: AdapterModel, recipe: Recipe):
        self.client_id = client_id
        self.data = data
        self.model = model
        self.recipe = recipe
        seed = recipe.common_args.random_seed
        self.state: dict[str, StateDict] = {
            "lora": model.get_lora_state(),  # replaced by the first payload for methods that share it
            "head": model.init_head_state(client_seed(seed, client_id, purpose=3)),
        }
        self.received: dict[str, StateDict] = {}
        self.last_train_stats: dict[str, float] = {}

    @property
    def loader_workers(self) -> int:
        return loader_workers(self.recipe.device_args)

    @property
    def num_samples(self) -> int:
        return len(self.data.train)

    def receive(self, payload: Payload) -> None:
        if payload.get("client_id", self.client_id) != self.client_id:
            raise ValueError(f"client {self.client_id} received the payload of client {payload['client_id']}")
        missing = [part for part in self.shared_parts if part not in payload]
        if missing:
            raise KeyError(f"client {self.client_id}: payload lacks {missing}; this method expects {self.shared_parts}")
        self.received = {part: payload[part] for part in self.shared_parts}
        self.state.update({part: {**self.state[part], **received} for part, received in self.received.items()})

    def load(self) -> None:
        """Put this client's state into the (possibly shared) model."""
        self.model.set_lora_state(self.state["lora"])
        self.model.set_head_state(self.state["head"])

    def evaluate(self, splits: tuple[str, ...] = ("validation", "test")) -> dict[str, float]:
        self.load()
        batch_size = self.recipe.validation_args.eval_batch_size
        out = {}
        for split in splits:
            loader = make_loader(getattr(self.data, split), batch_size, shuffle=False, workers=self.loader_workers)
            for key, value in evaluate_model(self.model, loader).items():
                out[f"{split}_{key}"] = value
        return out

    def round_loader(self, round_idx: int) -> DataLoader:
        """This round's shuffled training batches, seeded by client and round (the same in every engine)."""
        seed = client_seed(self.recipe.common_args.random_seed, self.client_id, purpose=1000 + round_idx)
        return make_loader(self.data.train, self.recipe.train_args.batch_size, shuffle=True, seed=seed,
                           workers=self.loader_workers)

    def upload(self) -> Upload:
        """What local training changed in each shared part (``self.state`` - what was received), with n_i."""
        deltas = {part: subtract({k: self.state[part][k] for k in self.received[part]}, self.received[part])
                  for part in self.shared_parts}
        return {"client_id": self.client_id, "num_samples": self.num_samples, **deltas}

    def sgd(self, round_idx: int, epochs: int | None = None, extra_loss=None) -> dict[str, float]:
        """Local SGD on the model as loaded (its trainable parameters) over this round's batches: ``epochs``
        passes (default train_args.epochs), ``extra_loss`` added to each batch's cross-entropy."""
        args = self.recipe.train_args
        return train_epochs(self.model, self.round_loader(round_idx), args.epochs if epochs is None else epochs,
                            args.learning_rate,
                            args.momentum, args.weight_decay, extra_loss=extra_loss)

    def train(self, round_idx: int) -> Upload:
        self.load()
        self.last_train_stats = self.sgd(round_idx)
        self.state = {"lora": self.model.get_lora_state(), "head": self.model.get_head_state()}
        return self.upload()


METHOD = Method("FedAvg", FedAvgServer, FedAvgClient)
